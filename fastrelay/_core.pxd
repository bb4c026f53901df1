# Declarations of fastrelay's compiled hot data: the CIDR set the relay
# decision consults for every connection, and the two rolling windows quota
# keeps per user.  The implementation and the reasoning behind each layout
# live in _core.pyx; this file lists every field with what it holds.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


# An address or range bound in a single 128-bit key space.  IPv4 uses the low
# 32 bits of `lo` with `hi` == 0; IPv6 uses all 128.  The two families are
# never compared with each other: each has its own segment table.
ctypedef struct U128:
    uint64_t hi                 # most significant 64 bits
    uint64_t lo                 # least significant 64 bits


# One add() call, kept until build() turns the log into segments.
ctypedef struct PendingRange:
    U128 start                  # first address of the range
    U128 end                    # last address of the range, inclusive
    int64_t payload             # caller's relay-rule index
    uint32_t order              # insertion order: keeps the sort stable
    uint8_t is_v6               # family; IPv4-mapped IPv6 networks are stored as IPv4
    uint8_t enabled             # 0: counted by len() but never matched


@cython.final
cdef class CidrSet:
    cdef PendingRange *_pending     # add() log; freed by build()
    cdef Py_ssize_t _pending_len    # entries used in _pending
    cdef Py_ssize_t _pending_cap    # entries allocated in _pending
    cdef Py_ssize_t _size           # ranges added, enabled or not: len()
    cdef bint _built                # build() ran: add() refused, lookup() allowed
    cdef uint32_t *_v4_start        # ascending first address of each IPv4 segment; [0] == 0
    cdef uint32_t *_v4_match        # per IPv4 segment: index into _matches
    cdef Py_ssize_t _v4_len         # IPv4 segments (>= 1 once built)
    cdef U128 *_v6_start            # ascending first address of each IPv6 segment; [0] == ::
    cdef uint32_t *_v6_match        # per IPv6 segment: index into _matches
    cdef Py_ssize_t _v6_len         # IPv6 segments (>= 1 once built)
    cdef tuple _matches             # interned payload tuples; [0] is the empty tuple

    cdef int _add_pending(self, U128 start, U128 end, int64_t payload,
                          bint is_v6, bint enabled) except -1
    cdef int _build_family(self, bint is_v6, list matches, dict interned) except -1
    cdef uint32_t _match_index(self, object address) noexcept


@cython.final
cdef class RateWindow:
    cdef double _span               # window length in seconds, as constructed
    cdef double _width              # bucket width in seconds: span / nbuckets
    cdef int64_t _head              # bucket number floor(t / width) of the newest bucket
    cdef uint64_t _total            # sum of all buckets, kept so total() never scans
    cdef void *_counts              # ring of per-bucket counts; NULL exactly when _total == 0
    cdef uint32_t _nbuckets         # ring length
    cdef uint32_t _head_idx         # ring position of bucket _head: _head mod _nbuckets
    cdef uint8_t _shift             # bytes per count = 1 << _shift: uint8, uint16 or uint32
    cdef bint _started              # _head is meaningful (some call has set the clock)

    cdef int _tick(self, double now) except -1
    cdef void _drop_counts(self) noexcept
    cdef int _widen(self, uint32_t need) except -1


# A slot of UniqueWindow's open-addressing table.
ctypedef struct KeySlot:
    uint64_t hash                   # stable key hash; 0 marks an empty slot
    double last_seen                # clock value of the key's latest add()


# An entry of UniqueWindow's expiry FIFO.
ctypedef struct Sighting:
    double time                     # clock value of the add() that queued it
    uint64_t hash                   # key hash it refers to


@cython.final
cdef class UniqueWindow:
    cdef double _span               # window length in seconds, as constructed
    cdef double _clock              # latest `now` seen; -inf before the first call
    cdef KeySlot *_slots            # open-addressing table; NULL while empty
    cdef uint32_t _slot_mask        # table capacity - 1 (capacity is a power of two)
    cdef uint32_t _count            # live keys in the table
    cdef Sighting *_fifo            # ring of sightings in time order; NULL while empty
    cdef uint32_t _fifo_mask        # ring capacity - 1 (capacity is a power of two)
    cdef uint32_t _fifo_head        # ring position of the oldest sighting
    cdef uint32_t _fifo_len         # sightings queued, live or stale

    cdef int _tick(self, double now) except -1
    cdef int _expire(self) except -1
    cdef Py_ssize_t _find(self, uint64_t h) noexcept
    cdef int _touch(self, uint64_t h, double t) except -1
    cdef void _delete_at(self, uint32_t i) noexcept
    cdef int _resize_slots(self, uint32_t capacity) except -1
    cdef int _resize_fifo(self, uint32_t capacity) except -1
    cdef void _release(self) noexcept
