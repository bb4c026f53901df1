# cython: auto_pickle=False, autotestdict=False
"""fastrelay's compiled hot data: CidrSet, RateWindow, UniqueWindow, LiteralSet, header_facts, commit_records.

Only the structures touched on every connection or every message live here;
the policy built on top of them (which rule wins, what a limit means, where
state is persisted) stays in readable Python in policy.py and quota.py.

Config keys read: none.  Callers pass every parameter explicitly, and the
clock is always the caller's `now` (float seconds), so the structures can be
driven by tests without patching time.

Thread safety: none beyond the GIL.  Every method runs start to finish
without releasing it, so one event loop thread may use an object freely;
sharing one across threads that release the GIL around calls is not supported.
The exceptions: LiteralSet.found releases it but only reads a set that
never changes after construction, so any thread may search with one; and
commit_records, a function with no shared state, releases it around its
disk writes (the spool's writer thread calls it).
"""

cimport cython
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport INFINITY, floor, isfinite
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr, memcmp, memcpy

import ipaddress
import os

# The shapes of to_state() output, importable for annotations (and
# mirrored in _core.pyi).
RateWindowState = tuple[float, int, float, float | None, list[int]]
UniqueWindowState = tuple[float, float | None, list[tuple[int, float]]]


cdef extern from "Python.h":
    # Read-only views of a str's storage.  For an ASCII str the data
    # is the text itself, NUL terminated, one byte per character: parsing it
    # in place is what keeps CidrSet.lookup and key hashing allocation free.
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void *PyUnicode_DATA(object o)
    char *PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)

cdef extern from "<sys/socket.h>":
    int AF_INET
    int AF_INET6

cdef extern from "<arpa/inet.h>" nogil:
    # inet_pton is strict where we want strictness: IPv4 needs exactly four
    # decimal octets without leading zeros, as Python's ipaddress (>= 3.9.5)
    # does, so the two agree on what an address is.
    int inet_pton(int af, const char *src, void *dst)


# =========================================================================
# Addresses
# =========================================================================

# Family codes returned by the parsers.  0 is "unparsable", so a parse result
# can be tested for truth.
cdef enum:
    FAMILY_NONE = 0
    FAMILY_V4 = 4
    FAMILY_V6 = 6

# Longest address text (before any '%zone') we try to parse; the longest
# valid one, IPv6 with an embedded IPv4 tail, has 45 characters.
cdef enum:
    MAX_ADDRESS_TEXT = 63


cdef inline uint64_t _load_be64(const unsigned char *p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
            | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
            | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline int _from_packed(const unsigned char *p, Py_ssize_t n, U128 *out) noexcept nogil:
    cdef uint64_t hi, lo
    if n == 4:
        out.hi = 0
        out.lo = ((<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16)
                  | (<uint64_t>p[2] << 8) | <uint64_t>p[3])
        return FAMILY_V4
    if n == 16:
        hi = _load_be64(p)
        lo = _load_be64(p + 8)
        # RFC 4291 §2.5.5.2: ::ffff:a.b.c.d is the IPv4 host a.b.c.d seen
        # through a dual-stack socket; rules written for IPv4 must see it.
        if hi == 0 and (lo >> 32) == 0xFFFF:
            out.hi = 0
            out.lo = lo & 0xFFFFFFFFULL
            return FAMILY_V4
        out.hi = hi
        out.lo = lo
        return FAMILY_V6
    return FAMILY_NONE


cdef int _parse_text(const char *s, Py_ssize_t n, bint allow_zone, U128 *out) noexcept nogil:
    # inet_pton wants a NUL-terminated string and knows nothing of zones, so
    # copy into a stack buffer, cutting at '%'.  A zone ("fe80::1%eth0", as
    # getpeername reports link-local peers) is accepted on IPv6 only and, as
    # ipaddress does, must be non-empty and contain no second '%'.
    cdef char buf[MAX_ADDRESS_TEXT + 1]
    cdef unsigned char raw[16]
    cdef Py_ssize_t i
    cdef Py_ssize_t cut = n
    cdef bint colon = False
    cdef char c
    if n <= 0:
        return FAMILY_NONE
    for i in range(n):
        c = s[i]
        if c == 0:
            # An embedded NUL would silently end the C string early.
            return FAMILY_NONE
        if cut != n:
            if c == b'%':
                return FAMILY_NONE
        elif c == b'%':
            cut = i
        else:
            if i == MAX_ADDRESS_TEXT:
                return FAMILY_NONE
            if c == b':':
                colon = True
            buf[i] = c
    buf[cut] = 0
    if cut != n and (not allow_zone or not colon or cut == n - 1):
        return FAMILY_NONE
    if colon:
        if inet_pton(AF_INET6, buf, raw) != 1:
            return FAMILY_NONE
        return _from_packed(raw, 16, out)
    if inet_pton(AF_INET, buf, raw) != 1:
        return FAMILY_NONE
    return _from_packed(raw, 4, out)


cdef inline int _parse_address(object address, U128 *out) noexcept:
    # The transport hands us either the peername string or packed bytes.
    # Non-ASCII text cannot be an address; refusing it before touching its
    # storage is what keeps every miss free of Python allocation.
    if isinstance(address, str):
        if not PyUnicode_IS_ASCII(address):
            return FAMILY_NONE
        return _parse_text(<const char *>PyUnicode_DATA(address),
                           PyUnicode_GET_LENGTH(address), True, out)
    if isinstance(address, bytes):
        return _from_packed(<const unsigned char *>PyBytes_AS_STRING(address),
                            PyBytes_GET_SIZE(address), out)
    return FAMILY_NONE


cdef inline bint _u128_lt(U128 a, U128 b) noexcept nogil:
    return a.hi < b.hi or (a.hi == b.hi and a.lo < b.lo)


cdef inline bint _u128_eq(U128 a, U128 b) noexcept nogil:
    return a.hi == b.hi and a.lo == b.lo


cdef inline U128 _u128_next(U128 a) noexcept nogil:
    a.lo += 1
    if a.lo == 0:
        a.hi += 1
    return a


cdef int _compare_ranges(const void *pa, const void *pb) noexcept nogil:
    # Start ascending; for equal starts the wider range first, so it is
    # already on the stack when the ranges nested in it arrive; then
    # insertion order, so equal ranges keep a deterministic order.
    cdef const PendingRange *a = <const PendingRange *>pa
    cdef const PendingRange *b = <const PendingRange *>pb
    if _u128_lt(a.start, b.start):
        return -1
    if _u128_lt(b.start, a.start):
        return 1
    if _u128_lt(b.end, a.end):
        return -1
    if _u128_lt(a.end, b.end):
        return 1
    return -1 if a.order < b.order else (1 if a.order > b.order else 0)


# =========================================================================
# CidrSet
# =========================================================================

# Why segments and a binary search.
#
# Every range the product accepts is an aligned CIDR block, and any two CIDR
# blocks are either disjoint or nested.  So build() can cut each address
# space into maximal segments on which the answer never changes, and give
# every segment the one tuple of payloads it answers with.  A lookup is then
# a single branch-free binary search over a plain sorted C array of segment
# starts (uint32 for IPv4, a 128-bit pair for IPv6), with no per-range work,
# however deeply ranges nest or however many share a /16: O(log n), and the
# hit path returns a prebuilt tuple, so neither hits nor misses allocate.
# There are at most 2n + 1 segments per family.  Scanning back from the
# address over the ranges that start within 65,536 of it, as the range limit
# would allow, costs O(ranges in that /16), up to 65,536 /32s; a table per
# block would need a second level for the same reason; segments need neither.
#
# Answers are interned: every distinct answer is one tuple in _matches, and a
# segment stores only its index (uint32).  Index 0 is the empty tuple, which
# is what every miss returns.  The 65,536-address limit on a range is what
# the product enforces at add(); the structure itself would not need it.
#
# Disabled ranges are dropped when answers are computed, so they cost nothing
# at lookup time.  A payload appears at most once per answer, and answers are
# in ascending payload order (not insertion order): callers treat payloads as
# rule indexes, and a rule listing two overlapping networks is one match.

cdef enum:
    V4_MIN_PREFIX = 16      # 2**(32 - 16) == 65,536 addresses
    V6_MIN_PREFIX = 112     # 2**(128 - 112) == 65,536 addresses


cdef inline void _emit(U128 *starts, uint32_t *matches, Py_ssize_t *n,
                       U128 at, uint32_t match) noexcept nogil:
    # Record "from `at` on, the answer is `match`", keeping segments maximal:
    # a later word about the same address overrides the earlier one, and a
    # segment that answers like its predecessor is merged into it.
    cdef Py_ssize_t k = n[0]
    if k > 0 and _u128_eq(starts[k - 1], at):
        matches[k - 1] = match
        if k > 1 and matches[k - 2] == match:
            n[0] = k - 1
        return
    if k > 0 and matches[k - 1] == match:
        return
    starts[k] = at
    matches[k] = match
    n[0] = k + 1


cdef uint32_t _intern_with(list matches, dict interned, uint32_t parent,
                           int64_t payload) except? 0xFFFFFFFFU:
    cdef tuple base = <tuple>matches[parent]
    p = payload
    if p in base:
        return parent
    answer = tuple(sorted(base + (p,)))
    index = interned.get(answer)
    if index is None:
        index = len(matches)
        matches.append(answer)
        interned[answer] = index
    return <uint32_t>index


cdef inline void *_shrink(void *p, size_t size) noexcept:
    # Give back the slack of a build buffer; keep it whole if realloc balks.
    cdef void *q = PyMem_Realloc(p, size)
    return q if q != NULL else p


ctypedef struct _OpenRange:
    U128 end                        # last address of an enclosing range
    uint32_t match                  # answer inside it (before nested ranges)


@cython.final
cdef class CidrSet:
    """IPv4 and IPv6 CIDR ranges, each with an int payload and an enabled flag.

    add() ranges, build() once, then lookup() or contains() addresses.
    lookup() returns the payloads of every enabled range containing the
    address, each once, in ascending payload order; a miss, or an address
    that cannot be parsed, returns the empty tuple.
    """

    def __dealloc__(self):
        PyMem_Free(self._pending)
        PyMem_Free(self._v4_start)
        PyMem_Free(self._v4_match)
        PyMem_Free(self._v6_start)
        PyMem_Free(self._v6_match)

    def __len__(self):
        return self._size

    def __repr__(self):
        return f"<CidrSet ranges={self._size} built={bool(self._built)}>"

    def add(self, network, int64_t payload, bint enabled=True):
        """Add `network` ("192.0.2.0/24", "2001:db8::/112" or one address).

        Raises ValueError for text that is not an address or CIDR, a range
        with host bits set, or a range wider than 65,536 addresses (prefix
        shorter than /16 for IPv4 or /112 for IPv6), and RuntimeError once
        build() has run.
        """
        cdef U128 start, end
        cdef int family
        cdef int prefix, max_prefix, min_prefix, host_bits
        cdef uint64_t host_mask
        if self._built:
            raise RuntimeError("CidrSet.add() after build(): the set is frozen; "
                               "build a new CidrSet instead")
        if not isinstance(network, str):
            raise TypeError(f"CidrSet.add(): network must be str, not "
                            f"{type(network).__name__}")
        text = <str>network
        address_text, slash, prefix_text = text.partition("/")
        is_v6_text = ":" in address_text
        max_prefix = 128 if is_v6_text else 32
        min_prefix = V6_MIN_PREFIX if is_v6_text else V4_MIN_PREFIX
        if slash:
            if not (prefix_text.isascii() and prefix_text.isdigit()
                    and 1 <= len(prefix_text) <= 3):
                raise ValueError(f"CidrSet.add({text!r}): prefix length must be a "
                                 f"number from 0 to {max_prefix}")
            prefix = int(prefix_text)
            if prefix > max_prefix:
                raise ValueError(f"CidrSet.add({text!r}): prefix length must be a "
                                 f"number from 0 to {max_prefix}")
        else:
            prefix = max_prefix
        encoded = address_text.encode("ascii") if address_text.isascii() else b""
        family = _parse_text(encoded, len(encoded), False, &start)
        if family == FAMILY_NONE:
            raise ValueError(f"CidrSet.add({text!r}): not an IPv4 or IPv6 address "
                             f"or CIDR range")
        if prefix < min_prefix:
            raise ValueError(
                f"CidrSet.add({text!r}): range is wider than the 65,536-address "
                f"limit; {'IPv6' if is_v6_text else 'IPv4'} prefix must be "
                f"/{min_prefix} or longer")
        # Host bits are at most 16, so they always sit in `lo`.  For an
        # IPv4-mapped network the count is the same in either notation.
        host_bits = max_prefix - prefix
        host_mask = (<uint64_t>1 << host_bits) - 1
        if start.lo & host_mask:
            try:
                hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
            except ValueError:
                hint = ""
            raise ValueError(f"CidrSet.add({text!r}): host bits set{hint}")
        end = start
        end.lo |= host_mask
        self._add_pending(start, end, payload, family == FAMILY_V6, enabled)

    cdef int _add_pending(self, U128 start, U128 end, int64_t payload,
                          bint is_v6, bint enabled) except -1:
        cdef Py_ssize_t cap
        cdef PendingRange *grown
        if self._pending_len == self._pending_cap:
            cap = self._pending_cap * 2 if self._pending_cap else 16
            if cap > 0xFFFFFFFFLL:
                raise OverflowError("CidrSet: too many ranges")
            grown = <PendingRange *>PyMem_Realloc(self._pending,
                                                  cap * sizeof(PendingRange))
            if grown == NULL:
                raise MemoryError()
            self._pending = grown
            self._pending_cap = cap
        cdef PendingRange *r = &self._pending[self._pending_len]
        r.start = start
        r.end = end
        r.payload = payload
        r.order = <uint32_t>self._pending_len
        r.is_v6 = is_v6
        r.enabled = enabled
        self._pending_len += 1
        self._size += 1
        return 0

    def build(self):
        """Freeze the set and compute the lookup tables.  Idempotent."""
        if self._built:
            return
        matches = [()]
        interned = {(): 0}
        self._build_family(False, matches, interned)
        self._build_family(True, matches, interned)
        self._matches = tuple(matches)
        PyMem_Free(self._pending)
        self._pending = NULL
        self._pending_len = self._pending_cap = 0
        self._built = True

    cdef int _build_family(self, bint is_v6, list matches, dict interned) except -1:
        # One sweep over the ranges in start order with a stack of the ranges
        # still open: entering a range starts a segment with the parent's
        # answer plus its payload, leaving one restores the parent's answer.
        cdef Py_ssize_t i, n = 0, depth = 0, nseg = 0
        cdef PendingRange *ranges = NULL
        cdef _OpenRange *stack = NULL
        cdef U128 *starts = NULL
        cdef uint32_t *answers = NULL
        cdef uint32_t *v4 = NULL
        cdef uint32_t parent, match
        cdef U128 zero, top
        cdef PendingRange *r
        zero.hi = zero.lo = 0
        top.hi = 0xFFFFFFFFFFFFFFFFULL if is_v6 else 0
        top.lo = 0xFFFFFFFFFFFFFFFFULL if is_v6 else 0xFFFFFFFFULL
        try:
            for i in range(self._pending_len):
                n += self._pending[i].is_v6 == is_v6
            ranges = <PendingRange *>PyMem_Malloc((n + 1) * sizeof(PendingRange))
            stack = <_OpenRange *>PyMem_Malloc((n + 1) * sizeof(_OpenRange))
            starts = <U128 *>PyMem_Malloc((2 * n + 1) * sizeof(U128))
            answers = <uint32_t *>PyMem_Malloc((2 * n + 1) * sizeof(uint32_t))
            if ranges == NULL or stack == NULL or starts == NULL or answers == NULL:
                raise MemoryError()
            n = 0
            for i in range(self._pending_len):
                if self._pending[i].is_v6 == is_v6:
                    ranges[n] = self._pending[i]
                    n += 1
            qsort(ranges, n, sizeof(PendingRange), _compare_ranges)

            _emit(starts, answers, &nseg, zero, 0)
            for i in range(n):
                r = &ranges[i]
                # Laminar ranges: an open range either contains r or ended
                # before it, so closing from the top of the stack suffices.
                while depth > 0 and _u128_lt(stack[depth - 1].end, r.start):
                    depth -= 1
                    if not _u128_eq(stack[depth].end, top):
                        _emit(starts, answers, &nseg, _u128_next(stack[depth].end),
                              stack[depth - 1].match if depth > 0 else 0)
                parent = stack[depth - 1].match if depth > 0 else 0
                match = (_intern_with(matches, interned, parent, r.payload)
                         if r.enabled else parent)
                _emit(starts, answers, &nseg, r.start, match)
                stack[depth].end = r.end
                stack[depth].match = match
                depth += 1
            while depth > 0:
                depth -= 1
                if not _u128_eq(stack[depth].end, top):
                    _emit(starts, answers, &nseg, _u128_next(stack[depth].end),
                          stack[depth - 1].match if depth > 0 else 0)

            if is_v6:
                self._v6_start = <U128 *>_shrink(starts, nseg * sizeof(U128))
                self._v6_match = <uint32_t *>_shrink(answers, nseg * sizeof(uint32_t))
                starts = NULL
                answers = NULL
                self._v6_len = nseg
            else:
                v4 = <uint32_t *>PyMem_Malloc(nseg * sizeof(uint32_t))
                if v4 == NULL:
                    raise MemoryError()
                for i in range(nseg):
                    v4[i] = <uint32_t>starts[i].lo
                self._v4_start = v4
                self._v4_match = <uint32_t *>_shrink(answers, nseg * sizeof(uint32_t))
                answers = NULL
                self._v4_len = nseg
        finally:
            PyMem_Free(ranges)
            PyMem_Free(stack)
            PyMem_Free(starts)
            PyMem_Free(answers)
        return 0

    cdef uint32_t _match_index(self, object address) noexcept:
        cdef U128 a
        cdef int family = _parse_address(address, &a)
        cdef const uint32_t *base4
        cdef const U128 *base6
        cdef Py_ssize_t n, half
        cdef uint32_t a4
        # Branch-free lower-bound search for the last segment start <= a:
        # the loop runs exactly ceil(log2 n) times and the conditional move
        # avoids mispredictions.  _start[0] is 0, so a segment always exists.
        if family == FAMILY_V4:
            a4 = <uint32_t>a.lo
            base4 = self._v4_start
            n = self._v4_len
            while n > 1:
                half = n >> 1
                base4 = base4 + half if base4[half] <= a4 else base4
                n -= half
            return self._v4_match[base4 - self._v4_start]
        if family == FAMILY_V6:
            base6 = self._v6_start
            n = self._v6_len
            while n > 1:
                half = n >> 1
                base6 = base6 + half if not _u128_lt(a, base6[half]) else base6
                n -= half
            return self._v6_match[base6 - self._v6_start]
        return 0

    def lookup(self, address):
        """Payloads of the enabled ranges containing `address`, ascending.

        `address` is a str ("203.0.113.7", "2001:db8::1", "::ffff:192.0.2.1",
        "fe80::1%eth0") or packed bytes (4 or 16).  IPv4-mapped IPv6 is
        looked up as IPv4.  Anything unparsable answers the empty tuple.
        """
        if not self._built:
            raise RuntimeError("CidrSet.lookup() before build()")
        return self._matches[self._match_index(address)]

    def contains(self, address):
        """True if some enabled range contains `address`."""
        if not self._built:
            raise RuntimeError("CidrSet.contains() before build()")
        return self._match_index(address) != 0

    def _check_invariants(self):
        """Raise AssertionError if the built tables are inconsistent (tests)."""
        cdef Py_ssize_t i
        if not self._built:
            return
        if self._v4_len < 1 or self._v4_start[0] != 0:
            raise AssertionError("IPv4 segments must start at 0")
        if self._v6_len < 1 or self._v6_start[0].hi != 0 or self._v6_start[0].lo != 0:
            raise AssertionError("IPv6 segments must start at ::")
        for i in range(self._v4_len):
            if self._v4_match[i] >= len(self._matches):
                raise AssertionError("IPv4 answer index out of range")
            if i and not (self._v4_start[i - 1] < self._v4_start[i]):
                raise AssertionError("IPv4 segment starts not ascending")
            if i and self._v4_match[i - 1] == self._v4_match[i]:
                raise AssertionError("IPv4 segments not maximal")
        for i in range(self._v6_len):
            if self._v6_match[i] >= len(self._matches):
                raise AssertionError("IPv6 answer index out of range")
            if i and not _u128_lt(self._v6_start[i - 1], self._v6_start[i]):
                raise AssertionError("IPv6 segment starts not ascending")
            if i and self._v6_match[i - 1] == self._v6_match[i]:
                raise AssertionError("IPv6 segments not maximal")
        for answer in self._matches:
            if list(answer) != sorted(set(answer)):
                raise AssertionError("answer not ascending and distinct")

    def _segment_count(self):
        """(IPv4 segments, IPv6 segments) after build (tests, benchmarks)."""
        return (self._v4_len, self._v6_len)


# =========================================================================
# RateWindow
# =========================================================================

# Why a ring of small counters, created lazily and widened on demand.
#
# Quota keeps two 24-hour windows for each of up to ~100,000 users, so the
# per-object size is what matters.  A ring of per-bucket counts indexed by
# bucket number (floor(t / width) mod nbuckets) gives O(1) add and, with a
# running total, O(1) total(); time moving forward clears only the buckets it
# passes, at most nbuckets of them, and a window that is empty is not
# scanned at all.  A plain uint32 ring of 288 buckets costs 1,152 bytes: for
# 100,000 users with two such windows and a 10-key UniqueWindow that measured
# 302 MiB of RSS, over the 300 MB budget; with byte rings it is 135 MiB.  Nearly every bucket of a person's
# 5-minute traffic fits in a byte, so the ring starts as uint8 and is widened
# to uint16 and then uint32 the first time a bucket needs it (a rare, O(n)
# copy that happens at most twice).  The ring is allocated on the first
# non-zero add and freed whenever the window drains, so idle users cost only
# the object.
#
# Cost per object (64-bit CPython 3.11): 80 bytes of object (header, vtable
# pointer and fields; no GC header, as there are no Python fields), plus
# nbuckets << _shift bytes of ring while the window holds anything.  For
# (86400, 288): 80 + 288 = 368 bytes, both from pymalloc size classes;
# 656 bytes with uint16 counts; 1,232 (+16 of malloc header) with uint32.
#
# Time semantics.  An event at time t counts in bucket floor(t / width); at
# time now the window holds the current bucket and the nbuckets - 1 before
# it, so an event leaves between span - width and span after it happened.
# The clock never goes back: a call whose `now` is earlier than the newest
# bucket is treated as happening in the newest bucket, so a clock step back
# neither frees quota nor counts anything twice.

# |now / width| must stay below 2**48 so that to_state()'s head_time, a
# product of bucket number and width, divides back to the exact bucket.
cdef double BUCKET_NUMBER_LIMIT = 281474976710656.0
cdef enum:
    MAX_BUCKETS = 16777216


cdef inline uint32_t _ring_get(const void *ring, uint8_t shift, uint32_t i) noexcept nogil:
    if shift == 0:
        return (<const uint8_t *>ring)[i]
    if shift == 1:
        return (<const uint16_t *>ring)[i]
    return (<const uint32_t *>ring)[i]


cdef inline void _ring_set(void *ring, uint8_t shift, uint32_t i, uint32_t v) noexcept nogil:
    if shift == 0:
        (<uint8_t *>ring)[i] = <uint8_t>v
    elif shift == 1:
        (<uint16_t *>ring)[i] = <uint16_t>v
    else:
        (<uint32_t *>ring)[i] = v


@cython.cdivision(True)
cdef inline uint32_t _ring_index(int64_t bucket, uint32_t nbuckets) noexcept nogil:
    cdef int64_t r = bucket % <int64_t>nbuckets
    return <uint32_t>(r + nbuckets if r < 0 else r)


cdef inline int _check_count(int64_t n, str what) except -1:
    if n < 0:
        raise ValueError(f"{what}: n must be >= 0, got {n}")
    return 0


@cython.final
cdef class RateWindow:
    """Rolling-window counter: `buckets` buckets of span / buckets seconds."""

    def __cinit__(self, double span, int buckets):
        if not (isfinite(span) and span > 0.0):
            raise ValueError(f"RateWindow: span must be a positive number of seconds, "
                             f"got {span!r}")
        if not (1 <= buckets <= MAX_BUCKETS):
            raise ValueError(f"RateWindow: buckets must be from 1 to {MAX_BUCKETS}, "
                             f"got {buckets!r}")
        self._span = span
        self._nbuckets = <uint32_t>buckets
        self._width = span / buckets

    def __dealloc__(self):
        PyMem_Free(self._counts)

    def __repr__(self):
        return (f"<RateWindow span={self._span!r} buckets={self._nbuckets} "
                f"total={self._total}>")

    @property
    def span(self):
        """Window length in seconds."""
        return self._span

    @property
    def buckets(self):
        """Number of buckets."""
        return self._nbuckets

    @property
    def width(self):
        """Bucket width in seconds (span / buckets)."""
        return self._width

    cdef void _drop_counts(self) noexcept:
        PyMem_Free(self._counts)
        self._counts = NULL
        self._total = 0
        self._shift = 0

    cdef int _tick(self, double now) except -1:
        cdef double q = now / self._width
        cdef int64_t bucket, steps
        cdef uint32_t i, v
        # Written so that NaN fails the test too.
        if not (q > -BUCKET_NUMBER_LIMIT and q < BUCKET_NUMBER_LIMIT):
            raise ValueError(f"RateWindow: now must be a finite time in seconds, "
                             f"got {now!r}")
        bucket = <int64_t>floor(q)
        if not self._started:
            self._started = True
        elif bucket <= self._head:
            return 0
        elif self._total != 0:
            steps = bucket - self._head
            if steps >= self._nbuckets:
                self._drop_counts()
            else:
                i = self._head_idx
                while steps > 0:
                    i += 1
                    if i == self._nbuckets:
                        i = 0
                    v = _ring_get(self._counts, self._shift, i)
                    if v:
                        self._total -= v
                        _ring_set(self._counts, self._shift, i, 0)
                        if self._total == 0:
                            break
                    steps -= 1
                if self._total == 0:
                    self._drop_counts()
        self._head = bucket
        self._head_idx = _ring_index(bucket, self._nbuckets)
        return 0

    cdef int _widen(self, uint32_t need) except -1:
        cdef uint8_t shift = 1 if need <= 0xFFFF else 2
        cdef void *ring = PyMem_Malloc(<size_t>self._nbuckets << shift)
        cdef uint32_t i
        if ring == NULL:
            raise MemoryError()
        for i in range(self._nbuckets):
            _ring_set(ring, shift, i, _ring_get(self._counts, self._shift, i))
        PyMem_Free(self._counts)
        self._counts = ring
        self._shift = shift
        return 0

    def add(self, int64_t n, double now):
        """Count `n` events at time `now`."""
        cdef uint64_t v
        _check_count(n, "RateWindow.add")
        self._tick(now)
        if n == 0:
            return
        if self._counts == NULL:
            self._counts = PyMem_Calloc(self._nbuckets, 1)
            if self._counts == NULL:
                raise MemoryError()
            self._shift = 0
        v = <uint64_t>_ring_get(self._counts, self._shift, self._head_idx) + <uint64_t>n
        if v > 0xFFFFFFFFULL:
            raise OverflowError("RateWindow.add: more than 4,294,967,295 events "
                                "in one bucket")
        if v > ((<uint64_t>1 << (8 << self._shift)) - 1):
            self._widen(<uint32_t>v)
        _ring_set(self._counts, self._shift, self._head_idx, <uint32_t>v)
        self._total += <uint64_t>n

    def subtract(self, int64_t n, double now):
        """Take back up to `n` events from the newest bucket; return how many.

        For giving back a count that turned out not to happen (quota.py's
        release after a failed spool write).  Only the newest bucket is
        touched, never older ones, and never below zero: a refund that
        arrives after its bucket has closed gives nothing back rather than
        freeing quota that other events used.  quota_redis.py's release
        script does the same, so both backends agree.
        """
        cdef uint32_t v, taken
        _check_count(n, "RateWindow.subtract")
        self._tick(now)
        if n == 0 or self._counts == NULL:
            return 0
        v = _ring_get(self._counts, self._shift, self._head_idx)
        taken = v if <uint64_t>n >= v else <uint32_t>n
        if taken:
            _ring_set(self._counts, self._shift, self._head_idx, v - taken)
            self._total -= taken
            if self._total == 0:
                self._drop_counts()
        return taken

    def total(self, double now):
        """Events counted in the window at time `now`."""
        self._tick(now)
        return self._total

    def would_exceed(self, int64_t n, int64_t limit, double now):
        """True if adding `n` now would take the total above `limit`."""
        _check_count(n, "RateWindow.would_exceed")
        self._tick(now)
        if limit < 0:
            return True
        # total < 2**56 and n < 2**63, so the unsigned sum cannot wrap.
        return self._total + <uint64_t>n > <uint64_t>limit

    def is_empty(self, double now):
        """True if nothing is counted in the window at time `now`."""
        self._tick(now)
        return self._total == 0

    def to_state(self):
        """(span, buckets, width, head_time, counts) as plain Python data.

        head_time is the start time of the newest bucket, or None if the
        window has never been used; counts run oldest bucket first.
        """
        cdef uint32_t j, nb = self._nbuckets
        if self._counts == NULL:
            counts = [0] * nb
        else:
            counts = [_ring_get(self._counts, self._shift, (self._head_idx + 1 + j) % nb)
                      for j in range(nb)]
        head_time = self._head * self._width if self._started else None
        return (self._span, nb, self._width, head_time, counts)

    @classmethod
    def from_state(cls, state):
        """Rebuild a window from to_state() output (a tuple or a list)."""
        cdef RateWindow w
        cdef uint32_t j, peak = 0, nb
        cdef double q
        try:
            span, buckets, width, head_time, counts = state
        except (TypeError, ValueError):
            raise ValueError("RateWindow state must be "
                             "(span, buckets, width, head_time, counts)") from None
        w = RateWindow(span, buckets)
        nb = w._nbuckets
        if not abs(float(width) - w._width) <= 1e-9 * w._width:
            raise ValueError(f"RateWindow state: width {width!r} is not span / buckets")
        counts = list(counts)
        if len(counts) != nb:
            raise ValueError(f"RateWindow state: {len(counts)} counts for {nb} buckets")
        for c in counts:
            if not isinstance(c, int) or not 0 <= c <= 0xFFFFFFFF:
                raise ValueError(f"RateWindow state: bad bucket count {c!r}")
            if c > peak:
                peak = c
        if head_time is None:
            if peak:
                raise ValueError("RateWindow state: counts without a head_time")
            return w
        q = float(head_time) / w._width
        if not (q > -BUCKET_NUMBER_LIMIT and q < BUCKET_NUMBER_LIMIT):
            raise ValueError(f"RateWindow state: bad head_time {head_time!r}")
        w._started = True
        w._head = <int64_t>floor(q + 0.5)
        w._head_idx = _ring_index(w._head, nb)
        if peak:
            w._shift = 0 if peak <= 0xFF else (1 if peak <= 0xFFFF else 2)
            w._counts = PyMem_Calloc(nb, <size_t>1 << w._shift)
            if w._counts == NULL:
                raise MemoryError()
            for j in range(nb):
                _ring_set(w._counts, w._shift, (w._head_idx + 1 + j) % nb, counts[j])
                w._total += <uint32_t>counts[j]
        return w

    def _check_invariants(self):
        """Raise AssertionError if the ring is inconsistent (tests)."""
        cdef uint64_t s = 0
        cdef uint32_t i
        if (self._counts == NULL) != (self._total == 0):
            raise AssertionError("ring allocated iff total != 0")
        if self._counts != NULL:
            for i in range(self._nbuckets):
                s += _ring_get(self._counts, self._shift, i)
        if s != self._total:
            raise AssertionError(f"running total {self._total} != bucket sum {s}")
        if self._started and self._head_idx != _ring_index(self._head, self._nbuckets):
            raise AssertionError("head index out of step with head bucket")

    def _ring_bytes(self):
        """Bytes of ring currently allocated (tests, memory accounting)."""
        return 0 if self._counts == NULL else <size_t>self._nbuckets << self._shift


# =========================================================================
# UniqueWindow
# =========================================================================

# Why a table of hashes plus a FIFO of sightings.
#
# The question is "how many distinct recipients in the last span seconds",
# exactly, for every user, so the structure must cost O(1) per message and
# memory in proportion to recent recipients, with no Python object per key.
# Keys are reduced to a stable 64-bit hash (below) and kept in an
# open-addressing table of (hash, last_seen) with linear probing and
# backward-shift deletion (no tombstones, so probes stay short however many
# keys come and go).  Expiry is lazy: every add() that moves a key's
# last_seen queues (time, hash) in a FIFO ring; as the clock advances, the
# FIFO is popped while its head is older than the window, and a popped
# sighting deletes its key only if it is still the key's latest (its time
# equals last_seen); otherwise it is a stale sighting and is dropped.
# Since the clock never goes back, the FIFO is in time order and each key
# has exactly one live sighting, so count() is exact and O(1) amortized.
#
# Re-seeing a key leaves a stale sighting behind; when the ring fills and at
# least half of it is stale, it is compacted in place instead of grown, so
# its length stays within about twice the live key count.  Both arrays
# shrink when they become mostly empty and are freed when the window is
# empty.  Cost: 80 bytes of object, plus 16 bytes per table slot (load at
# most 3/4, capacity a power of two, at least 8) and 16 bytes per FIFO slot.
# With 10 keys: 80 + 256 + 256 = 592 bytes.
#
# Time semantics: a key counts while now - last_seen < span, i.e. it leaves
# exactly span seconds after its latest add().  As in RateWindow, a `now`
# earlier than the latest seen is treated as the latest seen.

cdef enum:
    MIN_CAPACITY = 8
    MAX_CAPACITY = 1073741824


# Stable key hash.  FNV-1a 64 over the UTF-8 bytes is simple, fixed by spec
# and independent of PYTHONHASHSEED, so a hash written to disk or Redis by
# one process means the same key to every other; its weak mixing of the last
# bytes is repaired by MurmurHash3's fmix64 finaliser, whose output bits each
# depend on every input bit, which the table's low-bit masking needs.
# Treating the result as uniform: for n keys in one window the chance that
# any two collide is about n**2 / 2**65, i.e. ~2.7e-12 for 10,000 keys; a
# collision would make two recipients count as one.  0 marks an empty table
# slot, so a key whose hash would be 0 gets 1 instead.
cdef inline uint64_t _fnv1a_fmix64(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= p[i]
        h *= 0x100000001B3ULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h if h != 0 else 1


cdef uint64_t _key_hash(object key) except 0:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    if PyUnicode_IS_ASCII(key):
        return _fnv1a_fmix64(<const unsigned char *>PyUnicode_DATA(key),
                             PyUnicode_GET_LENGTH(key))
    # surrogatepass: a str decoded with surrogateescape (undecodable SMTP
    # bytes) still hashes, deterministically, instead of raising.
    encoded = (<str>key).encode("utf-8", "surrogatepass")
    return _fnv1a_fmix64(<const unsigned char *>PyBytes_AS_STRING(encoded),
                         PyBytes_GET_SIZE(encoded))


def key_hash(key):
    """The stable 64-bit hash UniqueWindow uses for `key` (never 0)."""
    return _key_hash(key)


cdef inline uint32_t _capacity_for(uint64_t n) noexcept nogil:
    # Smallest power of two >= max(n, MIN_CAPACITY).
    cdef uint64_t c = MIN_CAPACITY
    while c < n:
        c <<= 1
    return <uint32_t>c


@cython.final
cdef class UniqueWindow:
    """Exact count of distinct keys seen within the last `span` seconds."""

    def __cinit__(self, double span):
        if not (isfinite(span) and span > 0.0):
            raise ValueError(f"UniqueWindow: span must be a positive number of seconds, "
                             f"got {span!r}")
        self._span = span
        self._clock = -INFINITY

    def __dealloc__(self):
        self._release()

    def __repr__(self):
        return f"<UniqueWindow span={self._span!r} count={self._count}>"

    @property
    def span(self):
        """Window length in seconds."""
        return self._span

    cdef void _release(self) noexcept:
        PyMem_Free(self._slots)
        PyMem_Free(self._fifo)
        self._slots = NULL
        self._fifo = NULL
        self._slot_mask = self._fifo_mask = 0
        self._count = self._fifo_head = self._fifo_len = 0

    cdef int _tick(self, double now) except -1:
        if not isfinite(now):
            raise ValueError(f"UniqueWindow: now must be a finite time in seconds, "
                             f"got {now!r}")
        if now > self._clock:
            self._clock = now
            self._expire()
        return 0

    cdef Py_ssize_t _find(self, uint64_t h) noexcept:
        cdef uint32_t i
        cdef uint64_t s
        if self._slots == NULL:
            return -1
        i = <uint32_t>h & self._slot_mask
        while True:
            s = self._slots[i].hash
            if s == h:
                return i
            if s == 0:
                return -1
            i = (i + 1) & self._slot_mask

    cdef void _delete_at(self, uint32_t i) noexcept:
        # Backward-shift deletion: pull later members of the probe run into
        # the hole unless that would move one before its home slot.
        cdef uint32_t mask = self._slot_mask
        cdef uint32_t j = i, home
        while True:
            j = (j + 1) & mask
            if self._slots[j].hash == 0:
                break
            home = <uint32_t>self._slots[j].hash & mask
            # Leave slot j where it is if its home lies cyclically in (i, j].
            if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue
            self._slots[i] = self._slots[j]
            i = j
        self._slots[i].hash = 0
        self._count -= 1

    cdef int _resize_slots(self, uint32_t capacity) except -1:
        cdef KeySlot *old = self._slots
        cdef uint32_t old_capacity = self._slot_mask + 1 if old != NULL else 0
        cdef KeySlot *fresh = <KeySlot *>PyMem_Calloc(capacity, sizeof(KeySlot))
        cdef uint32_t k, i, mask = capacity - 1
        if fresh == NULL:
            raise MemoryError()
        for k in range(old_capacity):
            if old[k].hash != 0:
                i = <uint32_t>old[k].hash & mask
                while fresh[i].hash != 0:
                    i = (i + 1) & mask
                fresh[i] = old[k]
        PyMem_Free(old)
        self._slots = fresh
        self._slot_mask = mask
        return 0

    cdef int _resize_fifo(self, uint32_t capacity) except -1:
        cdef Sighting *fresh = <Sighting *>PyMem_Malloc(capacity * sizeof(Sighting))
        cdef uint32_t k
        if fresh == NULL:
            raise MemoryError()
        for k in range(self._fifo_len):
            fresh[k] = self._fifo[(self._fifo_head + k) & self._fifo_mask]
        PyMem_Free(self._fifo)
        self._fifo = fresh
        self._fifo_mask = capacity - 1
        self._fifo_head = 0
        return 0

    cdef int _touch(self, uint64_t h, double t) except -1:
        # Record key `h` as seen at `t` (t >= its last_seen).  1 if new.
        cdef Py_ssize_t found = self._find(h)
        cdef uint32_t i, kept, k, mask
        cdef Sighting s
        cdef bint fresh = found < 0
        if not fresh:
            if self._slots[found].last_seen == t:
                return 0    # its live sighting already says t
            self._slots[found].last_seen = t
        else:
            if self._count >= MAX_CAPACITY // 2:
                raise MemoryError("UniqueWindow: too many keys")
            if self._slots == NULL:
                self._resize_slots(MIN_CAPACITY)
            elif (<uint64_t>self._count + 1) * 4 > (<uint64_t>self._slot_mask + 1) * 3:
                self._resize_slots((self._slot_mask + 1) * 2)
            i = <uint32_t>h & self._slot_mask
            while self._slots[i].hash != 0:
                i = (i + 1) & self._slot_mask
            self._slots[i].hash = h
            self._slots[i].last_seen = t
            self._count += 1
        # Queue the sighting.
        if self._fifo == NULL:
            self._resize_fifo(MIN_CAPACITY)
        elif self._fifo_len == self._fifo_mask + 1:
            # Live sightings number count - 1 here (the one being queued is
            # not in yet); if at most half the ring is live, squeeze out the
            # stale ones in place, otherwise grow.
            if <uint64_t>self._count * 2 <= self._fifo_len:
                mask = self._fifo_mask
                kept = 0
                for k in range(self._fifo_len):
                    s = self._fifo[(self._fifo_head + k) & mask]
                    found = self._find(s.hash)
                    if found >= 0 and self._slots[found].last_seen == s.time:
                        self._fifo[(self._fifo_head + kept) & mask] = s
                        kept += 1
                self._fifo_len = kept
            else:
                self._resize_fifo((self._fifo_mask + 1) * 2)
        self._fifo[(self._fifo_head + self._fifo_len) & self._fifo_mask].time = t
        self._fifo[(self._fifo_head + self._fifo_len) & self._fifo_mask].hash = h
        self._fifo_len += 1
        return 1 if fresh else 0

    cdef int _expire(self) except -1:
        cdef double cutoff = self._clock - self._span
        cdef Sighting s
        cdef Py_ssize_t found
        cdef uint32_t want
        while self._fifo_len:
            s = self._fifo[self._fifo_head]
            if s.time > cutoff:
                break
            self._fifo_head = (self._fifo_head + 1) & self._fifo_mask
            self._fifo_len -= 1
            found = self._find(s.hash)
            if found >= 0 and self._slots[found].last_seen == s.time:
                self._delete_at(<uint32_t>found)
        if self._count == 0:
            # No live key means no live sighting, and stale ones are always
            # older than their key's live one, so nothing is left to keep.
            self._release()
            return 0
        if <uint64_t>self._count * 8 < <uint64_t>self._slot_mask + 1:
            want = _capacity_for(<uint64_t>self._count * 2)
            if want < self._slot_mask + 1:
                self._resize_slots(want)
        if <uint64_t>self._fifo_len * 8 < <uint64_t>self._fifo_mask + 1:
            want = _capacity_for(<uint64_t>self._fifo_len * 2)
            if want < self._fifo_mask + 1:
                self._resize_fifo(want)
        return 0

    def add(self, key, double now):
        """Count `key` at `now`; True if it was not already in the window."""
        cdef uint64_t h = _key_hash(key)
        self._tick(now)
        return self._touch(h, self._clock) == 1

    def seen(self, key, double now):
        """True if `key` is in the window at `now` (does not refresh it)."""
        cdef uint64_t h = _key_hash(key)
        self._tick(now)
        return self._find(h) >= 0

    def count(self, double now):
        """Distinct keys in the window at `now`."""
        self._tick(now)
        return self._count

    def is_empty(self, double now):
        """True if no key is in the window at `now`."""
        self._tick(now)
        return self._count == 0

    def to_state(self):
        """(span, clock, [(hash, last_seen), ...]) as plain Python data.

        clock is the latest time seen, or None if the window was never used;
        pairs are in last_seen order.
        """
        cdef uint32_t k
        cdef Sighting s
        cdef Py_ssize_t found
        pairs = []
        for k in range(self._fifo_len):
            s = self._fifo[(self._fifo_head + k) & self._fifo_mask]
            found = self._find(s.hash)
            if found >= 0 and self._slots[found].last_seen == s.time:
                pairs.append((s.hash, s.time))
        clock = self._clock if isfinite(self._clock) else None
        return (self._span, clock, pairs)

    @classmethod
    def from_state(cls, state):
        """Rebuild a window from to_state() output (tuples or lists)."""
        cdef UniqueWindow w
        cdef double clock
        try:
            span, clock_value, pairs = state
        except (TypeError, ValueError):
            raise ValueError("UniqueWindow state must be (span, clock, pairs)") from None
        w = UniqueWindow(span)
        entries = []
        for pair in pairs:
            try:
                h, t = pair
                t = float(t)
            except (TypeError, ValueError):
                raise ValueError(f"UniqueWindow state: bad pair {pair!r}") from None
            if (not isinstance(h, int) or not (0 < h <= 0xFFFFFFFFFFFFFFFF)
                    or not isfinite(t)):
                raise ValueError(f"UniqueWindow state: bad pair {pair!r}")
            entries.append((t, h))
        if clock_value is None:
            if entries:
                raise ValueError("UniqueWindow state: pairs without a clock")
            return w
        clock = float(clock_value)
        if not isfinite(clock):
            raise ValueError(f"UniqueWindow state: bad clock {clock_value!r}")
        entries.sort()
        if entries and entries[len(entries) - 1][0] > clock:
            raise ValueError("UniqueWindow state: a key was seen after the clock")
        w._clock = clock
        for t, h in entries:
            w._touch(h, t)
        w._expire()
        return w

    def _check_invariants(self):
        """Raise AssertionError if table and FIFO disagree (tests)."""
        cdef uint32_t k, live = 0, used = 0
        cdef Sighting s
        cdef Py_ssize_t found
        cdef double previous = -INFINITY
        if self._count == 0:
            if self._slots != NULL or self._fifo != NULL or self._fifo_len:
                raise AssertionError("empty window must hold no memory")
            return
        for k in range(self._slot_mask + 1):
            if self._slots[k].hash != 0:
                used += 1
                if self._find(self._slots[k].hash) != k:
                    raise AssertionError("key not reachable from its home slot")
                if not (self._clock - self._span < self._slots[k].last_seen <= self._clock):
                    raise AssertionError("key outside the window kept")
        if used != self._count:
            raise AssertionError(f"count {self._count} != occupied slots {used}")
        if <uint64_t>self._count * 4 > (<uint64_t>self._slot_mask + 1) * 3:
            raise AssertionError("table over 3/4 full")
        for k in range(self._fifo_len):
            s = self._fifo[(self._fifo_head + k) & self._fifo_mask]
            if s.time < previous:
                raise AssertionError("FIFO out of time order")
            previous = s.time
            found = self._find(s.hash)
            if found >= 0 and self._slots[found].last_seen == s.time:
                live += 1
        if live != self._count:
            raise AssertionError(f"{live} live sightings for {self._count} keys")

    def _memory_bytes(self):
        """Bytes of table and FIFO currently allocated (tests, accounting)."""
        return ((self._slot_mask + 1) * sizeof(KeySlot) if self._slots != NULL else 0) + \
               ((self._fifo_mask + 1) * sizeof(Sighting) if self._fifo != NULL else 0)


# ---------------------------------------------------------------------------
# Message content: one pass, read by read
# ---------------------------------------------------------------------------
#
# Not a data structure, but the one per-byte loop on the accept path: the
# server must know whether the content has a bare CR or LF (SMTP smuggling),
# whether any line starts with a dot (RFC 5321 §4.5.2 unstuffing), whether
# it is 8-bit, and whether a line is longer than RFC 5322 allows.  Five
# passes of bytes.count()/find()/isascii() over a 100 KiB message cost more
# than the rest of its transaction; this is one pass that mostly skips
# ordinary bytes.  The server feeds it each read as it comes, so that a
# large message is not scanned again after its last byte, while its client
# waits: a line and a CRLF may be cut between reads.

CONTENT_BARE_NEWLINE = 1
CONTENT_LEADING_DOT = 2
CONTENT_8BIT = 4
CONTENT_LONG_LINE = 8
cdef Py_ssize_t _MAX_LINE = 998   # octets, CRLF and a stuffing dot not counted (RFC 5322 §2.1.1)
MAX_CONTENT_LINE = _MAX_LINE

cdef uint64_t _HIGH_BITS = 0x8080808080808080ULL
cdef uint64_t _BYTES_14 = 0x0E0E0E0E0E0E0E0EULL


cdef class ContentScan:
    """The flags of content fed in pieces: CONTENT_BARE_NEWLINE | CONTENT_LEADING_DOT
    | CONTENT_8BIT | CONTENT_LONG_LINE, as of the whole."""

    cdef public int flags
    cdef int _prev                 # the last byte fed (LF before the first)
    cdef Py_ssize_t _line          # octets of the current line so far, its CR and a leading dot not counted

    def __cinit__(self):
        self.reset()

    def reset(self):
        self.flags = 0
        self._prev = 10
        self._line = 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def feed(self, const unsigned char[::1] data, bint final=False):
        """Scan the next piece; with ``final``, the content ends with it.

        A CR ending a piece is judged with the next piece's first byte.
        Returns ``flags``."""
        cdef Py_ssize_t n = data.shape[0]
        cdef Py_ssize_t i = 0, j, stop, start
        cdef uint64_t w
        cdef int flags = self.flags
        if n == 0:
            if final:
                self._finish()
            return self.flags
        cdef const unsigned char *p = &data[0]
        if (p[0] == 10) != (self._prev == 13):   # a LF without its CR, or a CR without its LF
            flags |= 1
        # Where the current line started, relative to p: before p when it
        # began in an earlier piece.  A stuffing dot is not the line's.
        start = -self._line
        if self._prev == 10:
            start = 0
            if p[0] == 46:
                flags |= 2
                start = 1
        # Eight bytes at a time: most words of text hold no byte below 14 (no CR
        # or LF) and, once one 8-bit byte was seen, nothing else to look for.
        while i + 8 <= n:
            memcpy(&w, p + i, 8)
            if w & _HIGH_BITS:
                flags |= 4
            if ((w - _BYTES_14) & ~w & _HIGH_BITS) == 0:
                i += 8
                continue
            stop = i + 8
            for j in range(i, stop):
                flags |= _byte_flags(p, n, j, final, self._prev, &start)
            i = stop
        for j in range(i, n):
            if p[j] >= 128:
                flags |= 4
            flags |= _byte_flags(p, n, j, final, self._prev, &start)
        self._line = n - start if start <= n else 0
        self._prev = p[n - 1]
        self.flags = flags
        if final:
            self._finish()
        return self.flags

    def finish(self):
        """The content ended with the last piece fed; returns ``flags``."""
        self._finish()
        return self.flags

    cdef void _finish(self):
        # The content ended on this piece: a CR or a line left open is all there is.
        if self._prev == 13:
            self.flags |= 1
        if self._line - (1 if self._prev == 13 else 0) > _MAX_LINE:
            self.flags |= 8


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline int _byte_flags(const unsigned char *p, Py_ssize_t n, Py_ssize_t j, bint final, int prev,
                            Py_ssize_t *start) noexcept nogil:
    """ContentScan.feed's look at byte j (8-bit aside); a LF moves ``start`` to the next line."""
    cdef unsigned char c = p[j]
    cdef int flags = 0
    if c == 13:
        if j + 1 < n:
            if p[j + 1] != 10:
                flags |= 1
        elif final:
            flags |= 1
    elif c == 10:
        if j > 0 and p[j - 1] != 13:   # the first byte was judged against prev
            flags |= 1
        if j - start[0] > _MAX_LINE:   # maybe too long: its CR is not the line's
            if j - start[0] - ((p[j - 1] == 13) if j > 0 else (prev == 13)) > _MAX_LINE:
                flags |= 8
        start[0] = j + 1
        if j + 1 < n and p[j + 1] == 46:
            flags |= 2
            start[0] = j + 2
    return flags


def scan_content(const unsigned char[::1] data):
    """The flags of ``data`` as a whole content (see ContentScan)."""
    scan = ContentScan()
    return scan.feed(data, True)


@cython.boundscheck(False)
@cython.wraparound(False)
def find_end_of_data(bytes data, Py_ssize_t start=0):
    """Index of the first ``\\r\\n.\\r\\n`` in ``data`` at or after ``start``, or -1.

    bytes.find spends its time on the CRLF that ends every line; a lone "."
    is rarer, and memchr finds it with vector instructions.
    """
    cdef const unsigned char *p = <const unsigned char *>data
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t i = start + 2
    cdef const unsigned char *hit
    if start < 0:
        i = 2
    while i + 2 < n:
        hit = <const unsigned char *>memchr(p + i, 46, n - 2 - i)
        if hit == NULL:
            return -1
        i = hit - p
        if p[i - 2] == 13 and p[i - 1] == 10 and p[i + 1] == 13 and p[i + 2] == 10:
            return i - 2
        i += 1
    return -1


# =========================================================================
# Test signatures
# =========================================================================

# The builtin scan looks for a few long test strings (GTUBE, EICAR and
# EICAR's base64 form) in every message.  Three bytes.find passes cost 35 µs
# on a 100 KiB body, more than the rest of the scan; Wu-Manber shifts on
# two-byte blocks look at one window in about sixty and find all of them in
# one pass.  No library fits: pyahocorasick reads every byte.

cdef int _LITERAL_SET_MAX = 32           # needles per set (a bit each in the result)
cdef Py_ssize_t _PREFETCH_AHEAD = 2048   # bytes: about thirty steps of a long needle's shift

cdef extern from *:
    """
    #define _fastrelay_prefetch(p) __builtin_prefetch((const void *)(p))
    """
    void _prefetch "_fastrelay_prefetch"(const void *p) noexcept nogil


@cython.final
cdef class LiteralSet:
    """Which of a few long byte strings occur in a buffer: one pass, GIL released."""

    cdef list _needles
    cdef Py_ssize_t _window               # the shortest needle's length
    cdef uint8_t _shift[65536]            # how far a window ending in this block may move

    def __init__(self, needles):
        needles = [bytes(n) for n in needles]
        if not 0 < len(needles) <= _LITERAL_SET_MAX:
            raise ValueError(f"a LiteralSet holds 1 to {_LITERAL_SET_MAX} needles")
        cdef Py_ssize_t window = min(len(n) for n in needles)
        if not 2 <= window <= 256:
            raise ValueError("every needle must be 2 to 256 bytes long (the shortest sets the window)")
        self._needles = needles
        self._window = window
        cdef Py_ssize_t i, block
        cdef const unsigned char *p
        for i in range(65536):
            self._shift[i] = window - 1
        for needle in needles:
            p = <const unsigned char *>PyBytes_AS_STRING(needle)
            # The block ending at i + 1 lies window - 2 - i bytes before a window's end.
            for i in range(window - 1):
                block = (p[i] << 8) | p[i + 1]
                if window - 2 - i < self._shift[block]:
                    self._shift[block] = window - 2 - i

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def found(self, const unsigned char[::1] data):
        """A bit per needle (1 << its index) that occurs somewhere in ``data``."""
        cdef Py_ssize_t n = data.shape[0]
        cdef Py_ssize_t count = len(self._needles)
        if n < self._window:
            return 0
        cdef const unsigned char *p = &data[0]
        cdef const unsigned char *needles[32]
        cdef Py_ssize_t lengths[32]
        cdef Py_ssize_t k
        for k in range(count):
            needles[k] = <const unsigned char *>PyBytes_AS_STRING(self._needles[k])
            lengths[k] = PyBytes_GET_SIZE(self._needles[k])
        cdef uint32_t all_found = (<uint32_t>1 << count) - 1 if count < 32 else 0xFFFFFFFFu
        cdef uint32_t found = 0
        cdef Py_ssize_t end = self._window - 1, start
        cdef uint8_t shift
        with nogil:
            while end < n:
                # Each step's address depends on the last step's load: on a body
                # that is not in the cache every step waited for memory.  Asking
                # for the lines 2 KiB ahead keeps them coming (21 -> 9 µs on a
                # cold 100 KiB body, as fast as a cached one; 512 bytes ahead
                # was too close to help); a prefetch past the end is harmless.
                _prefetch(p + end + _PREFETCH_AHEAD)
                shift = self._shift[(p[end - 1] << 8) | p[end]]
                if shift:
                    end += shift
                    continue
                start = end - self._window + 1
                for k in range(count):
                    if start + lengths[k] <= n and memcmp(p + start, needles[k], lengths[k]) == 0:
                        found |= <uint32_t>1 << k
                if found == all_found:
                    break
                end += 1
        return found


# =========================================================================
# Header facts for the builtin scanner
# =========================================================================

# The builtin scan (scanners.py) asks the same few questions of every
# message's header section: where it ends, whether Message-ID and Date are
# there, where From and Subject are, whether a MIME name or boundary
# parameter could follow, and how many "://" the first bytes of the text
# hold.  In Python that is a dozen finds and slices with a lower-cased copy
# of the header (5 µs a message, more than the rest of the verdict); here it
# is one walk over the header's lines.  The heuristics themselves stay in
# scanners.py.

HEADER_MESSAGE_ID = 1   # a Message-ID: field
HEADER_DATE = 2         # a Date: field
HEADER_NAME = 4         # "name" somewhere in the header section (any case)
HEADER_BOUNDARY = 8     # "boundary" somewhere in the header section (any case)


cdef inline unsigned char _ascii_lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline bint _is_space(unsigned char c) noexcept nogil:
    # What bytes.strip() removes: space, \t, \n, \v, \f, \r.
    return c == 32 or 9 <= c <= 13


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline bint _lower_at(const unsigned char *p, Py_ssize_t n, Py_ssize_t i,
                           const char *lower, Py_ssize_t m) noexcept nogil:
    """p[i:i+m] equals ``lower`` (lower-case ASCII) ignoring case."""
    cdef Py_ssize_t k
    if i + m > n:
        return False
    for k in range(m):
        if _ascii_lower(p[i + k]) != <unsigned char>lower[k]:
            return False
    return True


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _lower_find(const unsigned char *p, Py_ssize_t n, const char *lower, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char first = <unsigned char>lower[0]
    for i in range(n - m + 1):
        if _ascii_lower(p[i]) == first and _lower_at(p, n, i, lower, m):
            return i
    return -1


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _crlf_from(const unsigned char *p, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Index of the first CRLF at or after i, or -1."""
    cdef const unsigned char *lf
    if i < 0:
        i = 0
    while i + 1 < n:
        lf = <const unsigned char *>memchr(p + i + 1, 10, n - i - 1)
        if lf == NULL:
            return -1
        if (lf - 1)[0] == 13:
            return lf - 1 - p
        i = lf - p
    return -1


@cython.boundscheck(False)
@cython.wraparound(False)
def header_facts(bytes body, Py_ssize_t url_scan_bytes):
    """(flags, head_len, text_start, from_start, from_end, subject_start, subject_end, urls).

    The header section is ``body[:head_len]``: up to and with the CRLF before
    the first empty line, or the whole body when there is none (then
    ``text_start`` is ``len(body)``).  A field is the first line of the
    section starting, in any case, with its name and colon; its value runs
    over folded lines (RFC 5322 §2.2.3) and is given stripped as bytes.strip
    would, -1, -1 when there is no such field.  ``urls`` counts "://" in the
    first ``url_scan_bytes`` bytes of the text."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t head = n, text = n, i, j, end, start
    cdef Py_ssize_t spans[4]                   # from_start, from_end, subject_start, subject_end
    cdef int flags = 0
    cdef Py_ssize_t urls = 0, stop
    cdef const unsigned char *at
    spans[0] = spans[1] = spans[2] = spans[3] = -1
    # The end of the header section: the first CRLF CRLF.
    i = _crlf_from(p, n, 0)
    while i >= 0:
        if i + 3 < n and p[i + 2] == 13 and p[i + 3] == 10:
            head = i + 2
            text = i + 4
            break
        i = _crlf_from(p, n, i + 1)
    # Each line start: position 0 and after every LF of the section.
    i = 0
    while i < head:
        if not flags & HEADER_MESSAGE_ID and _lower_at(p, head, i, b"message-id:", 11):
            flags |= HEADER_MESSAGE_ID
        elif not flags & HEADER_DATE and _lower_at(p, head, i, b"date:", 5):
            flags |= HEADER_DATE
        elif spans[0] < 0 and _lower_at(p, head, i, b"from:", 5):
            spans[0] = i + 5
        elif spans[2] < 0 and _lower_at(p, head, i, b"subject:", 8):
            spans[2] = i + 8
        at = <const unsigned char *>memchr(p + i, 10, head - i)
        if at == NULL:
            break
        i = at - p + 1
    for j in (0, 2):
        start = spans[j]
        if start < 0:
            continue
        end = _crlf_from(p, head, start)
        while end >= 0 and end + 2 < head and (p[end + 2] == 32 or p[end + 2] == 9):
            end = _crlf_from(p, head, end + 2)
        if end < 0:
            end = head
        while start < end and _is_space(p[start]):
            start += 1
        while end > start and _is_space(p[end - 1]):
            end -= 1
        spans[j], spans[j + 1] = start, end
    if _lower_find(p, head, b"name", 4) >= 0:
        flags |= HEADER_NAME
    if _lower_find(p, head, b"boundary", 8) >= 0:
        flags |= HEADER_BOUNDARY
    # URLs: every ":" followed by "//", colons found with memchr.
    stop = text + min(n - text, url_scan_bytes) if url_scan_bytes > 0 else text
    i = text
    while i < stop:
        at = <const unsigned char *>memchr(p + i, 58, stop - i)
        if at == NULL:
            break
        i = at - p + 1
        if i + 1 < stop and p[i] == 47 and p[i + 1] == 47:
            urls += 1
            i += 2
    return flags, head, text, spans[0], spans[1], spans[2], spans[3], urls


# =========================================================================
# Spool commit
# =========================================================================
#
# The spool's group commit (spool.py) writes a batch of records and
# fdatasyncs it on a writer thread.  Done from Python, every CRC over a large
# part, the pwritev and the fdatasync release the GIL and take it back: a
# dozen hand-offs per batch, each of which can wait out the event loop
# thread's switch interval (5 ms) while the clients wait for their 250.
# Here the whole batch is one GIL release.  zlib's own crc32 (the one
# Python's zlib.crc32 calls), so the records stay what spool.read_records
# checks.

cdef extern from "<zlib.h>" nogil:
    unsigned long zlib_crc32 "crc32"(unsigned long crc, const unsigned char *buf, unsigned int length)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset)

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR

cdef extern from "Python.h":
    int PyObject_GetBuffer(object obj, Py_buffer *view, int flags) except -1
    void PyBuffer_Release(Py_buffer *view)
    int PyBUF_SIMPLE

# The record header, as spool.py's _HEADER ("<4scxxxIQI"): magic, kind, three
# pad bytes, envelope length, body length, CRC-32 of envelope and body.
cdef enum:
    RECORD_HEADER_SIZE = 24
    IOV_MAX = 1024           # Linux: the most parts one pwritev takes
    CRC_CHUNK = 1 << 30      # zlib's crc32 takes an unsigned int length

cdef inline void _put_le(unsigned char *at, uint64_t value, int size) noexcept nogil:
    cdef int i
    for i in range(size):
        at[i] = <unsigned char>(value >> (8 * i))

cdef uint32_t _crc(uint32_t crc, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef unsigned int step
    while n > 0:
        step = <unsigned int>(n if n < CRC_CHUNK else CRC_CHUNK)
        crc = <uint32_t>zlib_crc32(crc, p, step)
        p += step
        n -= step
    return crc

cdef int _pwrite_all(int fd, iovec *iov, Py_ssize_t count, int64_t offset) noexcept nogil:
    """Write every part at ``offset`` on, going on after partial writes; 0 or an errno."""
    cdef Py_ssize_t i = 0
    cdef ssize_t n
    while i < count:
        n = pwritev(fd, iov + i, <int>(count - i if count - i < IOV_MAX else IOV_MAX), offset)
        if n < 0:
            if errno == EINTR:
                continue
            return errno
        offset += n
        while i < count and <size_t>n >= iov[i].iov_len:
            n -= iov[i].iov_len
            i += 1
        if n:
            iov[i].iov_base = <char *>iov[i].iov_base + n
            iov[i].iov_len -= n
    return 0

def commit_records(int fd, int64_t offset, bytes magic, list frames, bint sync=True):
    """Write ``frames`` ((kind, envelope, body parts) each) as spool records at ``offset``.

    Makes each record's header (CRC included), writes them all with pwritev
    and, with ``sync``, fdatasyncs, in one release of the GIL.  Returns the
    bytes written; raises OSError with nothing promised about what reached
    the file (the spool cuts it off).  The buffers must not change meanwhile
    (the spool hands over bytes, or bytearrays nobody touches any more).
    """
    if len(magic) != 4:
        raise ValueError("magic must be 4 bytes")
    cdef Py_ssize_t nframes = len(frames), nparts = 0, nbufs = 0, k = 0, i
    cdef object frame, part
    for frame in frames:
        nparts += 2 + len(frame[2])
    # iov: header, envelope, body parts, for each record in turn; starts[i]:
    # where record i's header is (starts[nframes]: the end).
    cdef unsigned char *headers = <unsigned char *>PyMem_Calloc(nframes + 1, RECORD_HEADER_SIZE)
    cdef iovec *iov = <iovec *>PyMem_Malloc((nparts + 1) * sizeof(iovec))
    cdef Py_buffer *bufs = <Py_buffer *>PyMem_Malloc((nparts + 1) * sizeof(Py_buffer))
    cdef Py_ssize_t *starts = <Py_ssize_t *>PyMem_Malloc((nframes + 1) * sizeof(Py_ssize_t))
    cdef unsigned char *h
    cdef int error = 0
    cdef int64_t total = 0
    if headers == NULL or iov == NULL or bufs == NULL or starts == NULL:
        PyMem_Free(headers); PyMem_Free(iov); PyMem_Free(bufs); PyMem_Free(starts)
        raise MemoryError()
    try:
        for i in range(nframes):
            frame = frames[i]
            kind = frame[0]
            if not isinstance(kind, bytes) or len(kind) != 1:
                raise ValueError("a record kind is one byte")
            h = headers + i * RECORD_HEADER_SIZE
            memcpy(h, <const char *>magic, 4)
            h[4] = (<const unsigned char *>PyBytes_AS_STRING(kind))[0]
            starts[i] = k
            iov[k].iov_base = h
            iov[k].iov_len = RECORD_HEADER_SIZE
            k += 1
            PyObject_GetBuffer(frame[1], &bufs[nbufs], PyBUF_SIMPLE)
            iov[k].iov_base = bufs[nbufs].buf
            iov[k].iov_len = bufs[nbufs].len
            nbufs += 1
            k += 1
            for part in frame[2]:
                PyObject_GetBuffer(part, &bufs[nbufs], PyBUF_SIMPLE)
                iov[k].iov_base = bufs[nbufs].buf
                iov[k].iov_len = bufs[nbufs].len
                nbufs += 1
                k += 1
        starts[nframes] = k
        with nogil:
            error = _commit(fd, offset, headers, iov, starts, nframes, sync, &total)
    finally:
        for i in range(nbufs):
            PyBuffer_Release(&bufs[i])
        PyMem_Free(headers); PyMem_Free(iov); PyMem_Free(bufs); PyMem_Free(starts)
    if error:
        raise OSError(error, os.strerror(error))
    return total

cdef int _commit(int fd, int64_t offset, unsigned char *headers, iovec *iov, const Py_ssize_t *starts,
                 Py_ssize_t nframes, bint sync, int64_t *total) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint32_t crc
    cdef uint64_t body_len
    cdef unsigned char *h
    cdef int error
    for i in range(nframes):
        h = headers + i * RECORD_HEADER_SIZE
        j = starts[i] + 1                       # the envelope
        crc = _crc(0, <const unsigned char *>iov[j].iov_base, iov[j].iov_len)
        _put_le(h + 8, iov[j].iov_len, 4)
        body_len = 0
        for j in range(starts[i] + 2, starts[i + 1]):
            crc = _crc(crc, <const unsigned char *>iov[j].iov_base, iov[j].iov_len)
            body_len += iov[j].iov_len
        _put_le(h + 12, body_len, 8)
        _put_le(h + 20, crc, 4)
        total[0] += RECORD_HEADER_SIZE + iov[starts[i] + 1].iov_len + body_len
    error = _pwrite_all(fd, iov, starts[nframes], offset)
    if error or not sync:
        return error
    while fdatasync(fd) != 0:
        if errno != EINTR:
            return errno
    return 0
