"""Content scanners: the builtin heuristics and clients for rspamd, spamd and clamd.

Each scanner turns (envelope, message) into a ``ScanResult``: clean, spam or
virus, with a score, the score that makes spam, and the reasons.  abuse.py
runs the configured ones side by side and combines their results.

* **builtin** (``content_signals``): no daemon.  Signals read from the
  message itself: GTUBE and EICAR (so the whole path can be checked without
  any daemon), Message-ID and Date missing, a From: domain unrelated to the
  envelope sender's, URL density, executable attachments.  abuse.py adds the
  signals that need the sender's history (many new recipients, a volume
  jump) and turns the sum into a verdict (docs/abuse.md lists every weight).
* **rspamd**: ``POST /checkv2`` on its normal worker (HTTP/1.1).
* **spamd**: SpamAssassin's SPAMC/SPAMD protocol, ``SYMBOLS`` request.
* **clamd**: ClamAV's ``zINSTREAM`` over TCP or a unix socket.

Why no client libraries: each daemon is asked one kind of request on a
local socket.  rspamd's is one HTTP POST answered with Content-Length (no
TLS, redirects, cookies or chunked bodies), ~40 lines on asyncio streams
against aiohttp's or httpx's dependency trees.  For spamd, aiospamc (the
maintained asyncio client) pulls in typer, loguru and certifi for what is
one request line, two headers and a status line here.  clamd has no
maintained asyncio client.  Every request has one deadline
(``abuse.scan_timeout``); any failure is a ``ScannerError``.

Config keys read (through abuse.py): abuse.rspamd_url, abuse.spamd,
abuse.clamd, abuse.scan_timeout.
"""

from __future__ import annotations

import asyncio
import base64
import email.header
import json
import re
from typing import NamedTuple

from ._core import (
    HEADER_BOUNDARY,
    HEADER_DATE,
    HEADER_MESSAGE_ID,
    HEADER_NAME,
    LiteralSet,
    header_facts,
)
from .config import parse_hostport
from .errors import FastrelayError
from .logs import printable
from .spool import Envelope

CLEAN = "clean"
SPAM = "spam"
VIRUS = "virus"

# The Generic Test for Unsolicited Bulk Email: every spam filter calls it spam.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# The EICAR anti-virus test file: every virus scanner calls it a virus.  An
# attachment that holds it is base64 from its first byte, so its encoding
# starts with the same 64 characters.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_BASE64 = base64.b64encode(EICAR)[:64]
# All three looked for in one pass (three bytes.find passes were most of a large message's scan).
TEST_STRINGS = LiteralSet([GTUBE, EICAR, EICAR_BASE64])
FOUND_GTUBE, FOUND_EICAR = 1, 2 | 4

# Attachment types that run code when opened on Windows (Gmail blocks the same).
BAD_EXTENSIONS = ("exe", "scr", "js", "jse", "vbs", "vbe", "bat", "cmd", "com", "pif", "cpl",
                  "msi", "jar", "ps1", "hta", "wsf", "wsh", "lnk", "reg", "scf")
# Matched only where "name" occurs in a header section (see _bad_attachment).
_BAD_ATTACHMENT = re.compile(
    rb'name\*?=[ \t]*"?([^"\r\n;]{0,200}\.(?:' + b"|".join(e.encode() for e in BAD_EXTENSIONS)
    + rb'))"?[ \t]*(?:;|\r?$)', re.IGNORECASE | re.MULTILINE)
_DOMAIN = re.compile(rb"@([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)")
_BOUNDARY = re.compile(rb'boundary[ \t]*=[ \t]*"?([^";\r\n]{1,70})', re.IGNORECASE)

# Builtin weights (docs/abuse.md).
W_GTUBE = 1000.0
W_BAD_ATTACHMENT = 5.0
W_NO_MESSAGE_ID = 1.0
W_NO_DATE = 1.0
W_NO_FROM = 1.0
W_FROM_UNRELATED = 2.0
W_URL_DENSITY = 2.0
URL_DENSITY_MIN = 10        # URLs ("scheme://")
URL_DENSITY_BYTES = 250     # fewer body bytes than this per URL is dense
URL_SCAN_BYTES = 32 * 1024  # URLs are counted in the first 32 KiB of the body
PART_HEADER_MAX = 8192      # a MIME part's header section, at most
MAX_BOUNDARIES = 20         # nested multiparts looked into, at most


class ScannerError(FastrelayError):
    """A scanner is down, timed out or answered something we cannot read."""


class ScanResult(NamedTuple):
    """One scanner's opinion of one message."""

    scanner: str
    verdict: str                 # CLEAN, SPAM or VIRUS
    score: float = 0.0
    threshold: float = 0.0       # the score that makes spam (0 for virus scanners)
    reasons: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.verdict == VIRUS:
            return f"{self.scanner}:virus({', '.join(self.reasons)})"
        if not self.threshold:
            return f"{self.scanner}:{self.verdict}"   # a virus scanner: no score
        return f"{self.scanner}:{self.verdict} {self.score:.1f}/{self.threshold:.1f}"


class Signal(NamedTuple):
    """One builtin heuristic that fired."""

    name: str
    weight: float
    detail: str = ""

    def reason(self) -> str:
        return f"{self.name}({self.weight:g}{': ' + self.detail if self.detail else ''})"


class ContentFacts(NamedTuple):
    """What the builtin scan read from the message, for abuse.py."""

    signals: list[Signal]
    virus: str                   # the test signature found, or ""
    subject_raw: bytes | None    # the Subject: field as sent

    @property
    def subject(self) -> str:
        """Decoded (RFC 2047), at most 200 characters; "" when there is none.  Only
        spam and viruses need it (the notices), so it is not decoded for clean mail."""
        if self.subject_raw is None:
            return ""
        # An encoded word can carry anything: line ends would break the notices' lines,
        # escapes and bidi overrides would reach an administrator's terminal
        # (`fastrelay quarantine list`) and the log.  Shown as spaces.
        return printable(_decode_header(self.subject_raw)[:200], " ")


def _bad_attachment(head: bytes, lowered: bytes, body: bytes, text_start: int) -> str:
    """The first MIME name/filename parameter with an executable extension, or "".

    Only header sections are searched: the message's own and each MIME
    part's.  Parts are found by their declared boundaries (RFC 2046 §5.1.1:
    a delimiter line is CRLF "--" boundary), so a large base64 attachment
    costs one ``find`` of a long, distinctive string per boundary, not a
    pass with a regex.  ``lowered`` is b"\\n" + head.lower(); the text
    (after the blank line) starts at ``text_start`` in ``body``.
    """
    at = lowered.find(b"name")
    while at >= 0:  # the message's own header (a single-part attachment)
        m = _BAD_ATTACHMENT.match(head, at - 1)
        if m is not None:
            return m.group(1).decode("utf-8", errors="replace").strip()
        at = lowered.find(b"name", at + 4)
    boundaries = _BOUNDARY.findall(head) if b"boundary" in lowered else []
    seen = 0
    while boundaries and seen < MAX_BOUNDARIES:
        seen += 1
        delimiter = b"\r\n--" + boundaries.pop()
        # From the CRLF that ends the header section: a delimiter on the text's first
        # line is found with the CRLF before it, like every other one.
        at = body.find(delimiter, text_start - 2)
        while at >= 0:
            start = body.find(b"\r\n", at + len(delimiter))   # the end of the delimiter line
            if start < 0:
                break
            end = body.find(b"\r\n\r\n", start)
            end = min(len(body) if end < 0 else end + 2, start + PART_HEADER_MAX)
            name = _name_parameter(body, start, end)
            if name:
                return name
            boundaries += _BOUNDARY.findall(body, start, end)  # a nested multipart
            at = body.find(delimiter, end)
            if at < 0:
                break
    return ""


def _name_parameter(data: bytes, start: int, end: int) -> str:
    for needle in (b"name", b"NAME", b"Name"):
        at = data.find(needle, start, end)
        while at >= 0:
            m = _BAD_ATTACHMENT.match(data, at, end)
            if m is not None:
                return m.group(1).decode("utf-8", errors="replace").strip()
            at = data.find(needle, at + 4, end)
    return ""


def _decode_header(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    text = re.sub(r"\r?\n[ \t]", " ", text).strip()
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".>").strip()


def _related(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


# FROM_UNRELATED answers remembered: a sender's mail carries the same From: field
# again and again, and finding its domain is most of the check.
FROM_CACHE = 4096
_from_answers: dict[tuple[bytes, str, tuple[str, ...]], str] = {}


def _from_unrelated(from_raw: bytes, sender: str, account_domains: tuple[str, ...]) -> str:
    """The FROM_UNRELATED detail, or "" when the From: domain is the envelope sender's or the account's."""
    key = (from_raw, sender, account_domains)
    answer = _from_answers.get(key)
    if answer is not None:
        return answer
    # The address's domain is the last "@domain" in the field (display names come first).
    domains = _DOMAIN.findall(from_raw)
    from_domain = domains[-1].decode("ascii").lower() if domains else ""
    sender_domain = _domain_of(sender)
    answer = ""
    if from_domain and not _related(from_domain, sender_domain) and not any(
            _related(from_domain, d) for d in account_domains):
        answer = f"From: {from_domain}, envelope sender {sender_domain}"
    if len(_from_answers) >= FROM_CACHE:
        _from_answers.clear()
    _from_answers[key] = answer
    return answer


def content_signals(envelope: Envelope, body: bytes, account_domains: tuple[str, ...]) -> ContentFacts:
    """The builtin heuristics that need only the message (pure; cheap for small bodies)."""
    signals: list[Signal] = []
    virus = ""
    found = TEST_STRINGS.found(body)
    if found & FOUND_EICAR:
        virus = "EICAR-Test-File"
    if found & FOUND_GTUBE:
        signals.append(Signal("GTUBE", W_GTUBE))
    # One compiled walk over the header section (and the URLs of the text's start).
    flags, head_len, text_start, from_start, from_end, subject_start, subject_end, urls = \
        header_facts(body, URL_SCAN_BYTES)
    if not flags & HEADER_MESSAGE_ID:
        signals.append(Signal("NO_MESSAGE_ID", W_NO_MESSAGE_ID))
    if not flags & HEADER_DATE:
        signals.append(Signal("NO_DATE", W_NO_DATE))
    if from_start < 0:
        signals.append(Signal("NO_FROM", W_NO_FROM))
    elif envelope.sender:
        unrelated = _from_unrelated(body[from_start:from_end], envelope.sender, account_domains)
        if unrelated:
            signals.append(Signal("FROM_UNRELATED", W_FROM_UNRELATED, unrelated))
    scanned = min(len(body) - text_start, URL_SCAN_BYTES)
    if urls >= URL_DENSITY_MIN and scanned < urls * URL_DENSITY_BYTES:
        signals.append(Signal("URL_DENSITY", W_URL_DENSITY, f"{urls} URLs in {scanned} bytes"))
    if flags & (HEADER_NAME | HEADER_BOUNDARY):   # else no name parameter can be there
        head = body[:head_len]
        attachment = _bad_attachment(head, b"\n" + head.lower(), body, text_start)
        if attachment:
            signals.append(Signal("BAD_ATTACHMENT", W_BAD_ATTACHMENT, attachment[-60:]))
    return ContentFacts(signals, virus, body[subject_start:subject_end] if subject_start >= 0 else None)


# --- daemons -------------------------------------------------------------------------------


def _field(value: str) -> str:
    """A header value we send: no line breaks can be smuggled in."""
    return value.replace("\r", " ").replace("\n", " ")


class RspamdClient:
    """``POST /checkv2`` to rspamd's normal worker."""

    name = "rspamd"

    def __init__(self, url: str, timeout: float) -> None:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        self.host, self.port = parse_hostport(hostport, 11333)
        self.path = "/" + path.strip("/") + "/checkv2" if path.strip("/") else "/checkv2"
        self.timeout = timeout

    async def scan(self, envelope: Envelope, body: bytes) -> ScanResult:
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}", "Connection: close",
                f"Queue-Id: {envelope.queue_id}", f"From: {_field(envelope.sender)}"]
        head += [f"Rcpt: {_field(r)}" for r in envelope.recipients]
        if envelope.client_ip:
            head.append(f"IP: {envelope.client_ip}")
        if envelope.client_helo:
            head.append(f"Helo: {_field(envelope.client_helo)}")
        if envelope.auth_user:
            head.append(f"User: {_field(envelope.auth_user)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(request)
                    writer.write(body)
                    await writer.drain()
                    status, _, content = await _read_http_response(reader)
                finally:
                    writer.close()
        except TimeoutError:
            raise ScannerError(f"rspamd: no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise ScannerError(f"rspamd: {exc or type(exc).__name__}") from None
        if status != 200:
            raise ScannerError(f"rspamd: HTTP {status}: {content[:200]!r}")
        return self.parse(content)

    def parse(self, content: bytes) -> ScanResult:
        """rspamd's JSON answer; anything else is a ScannerError (the scan is asked again)."""
        try:
            answer = json.loads(content)
            action = str(answer["action"])
            score = float(answer["score"])
            threshold = float(answer.get("required_score", 0.0))
            symbols = answer.get("symbols") or {}
            ranked = sorted(symbols.values(), key=lambda s: -float(s.get("score", 0.0)))
            reasons = tuple(f"{s.get('name')}({float(s.get('score', 0.0)):g})" for s in ranked[:12])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScannerError(f"rspamd: unreadable answer ({exc}): {content[:200]!r}") from None
        # "soft reject" and "greylist" ask a receiving MTA to try later: meaningless
        # for mail our own users submit, so only the spam actions count.
        spam = action in ("reject", "add header", "rewrite subject")
        return ScanResult(self.name, SPAM if spam else CLEAN, score, threshold, (f"action={action}", *reasons))


async def _read_http_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of an HTTP/1.1 response with Content-Length (or to EOF)."""
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "identity").lower() != "identity":
        raise ValueError(f"unsupported Transfer-Encoding {headers['transfer-encoding']!r}")
    length = headers.get("content-length")
    content = await (reader.readexactly(int(length)) if length is not None else reader.read())
    return int(parts[1]), headers, content


class SpamdClient:
    """SpamAssassin's spamd: ``SYMBOLS SPAMC/1.5`` (the protocol spamc speaks)."""

    name = "spamd"

    def __init__(self, address: str, timeout: float) -> None:
        self.host, self.port = parse_hostport(address, 783)
        self.timeout = timeout

    async def scan(self, envelope: Envelope, body: bytes) -> ScanResult:
        request = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(body)}\r\n\r\n".encode()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(request)
                    writer.write(body)
                    await writer.drain()
                    # spamd reads Content-length bytes, answers and closes.
                    answer = await reader.read()
                finally:
                    writer.close()
        except TimeoutError:
            raise ScannerError(f"spamd: no answer within {self.timeout:g}s") from None
        except OSError as exc:
            raise ScannerError(f"spamd: {exc}") from None
        return self.parse(answer)

    def parse(self, answer: bytes) -> ScanResult:
        """spamd's answer to SYMBOLS; anything else is a ScannerError (the scan is asked again)."""
        head, _, symbols = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith("SPAMD/"):
            raise ScannerError(f"spamd: not a SPAMD answer: {answer[:120]!r}")
        if status[1] != "0":
            raise ScannerError(f"spamd: {lines[0]}")
        # Spam: True ; 1004.2 / 5.0
        m = None
        for line in lines[1:]:
            m = re.match(r"(?i)spam:\s*(true|false|yes|no)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)", line)
            if m:
                break
        if m is None:
            raise ScannerError(f"spamd: no Spam: header in {answer[:200]!r}")
        spam = m.group(1).lower() in ("true", "yes")
        try:
            score, threshold = float(m.group(2)), float(m.group(3))
        except ValueError:   # "1..5": the pattern takes digits and dots as they come
            raise ScannerError(f"spamd: unreadable score in {answer[:200]!r}") from None
        reasons = tuple(s for s in symbols.decode("latin-1").strip().replace("\r\n", ",").split(",") if s)
        return ScanResult(self.name, SPAM if spam else CLEAN, score, threshold, reasons)


class ClamdClient:
    """ClamAV's clamd: ``zINSTREAM`` over TCP or a unix socket."""

    name = "clamd"
    CHUNK = 64 * 1024

    def __init__(self, address: str, timeout: float) -> None:
        self.socket_path = address if address.startswith("/") else ""
        self.host, self.port = ("", 0) if self.socket_path else parse_hostport(address, 3310)
        self.timeout = timeout

    async def scan(self, envelope: Envelope, body: bytes) -> ScanResult:
        try:
            async with asyncio.timeout(self.timeout):
                if self.socket_path:
                    reader, writer = await asyncio.open_unix_connection(self.socket_path)
                else:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(b"zINSTREAM\0")
                    view = memoryview(body)
                    for i in range(0, len(body), self.CHUNK):
                        chunk = view[i:i + self.CHUNK]
                        writer.write(len(chunk).to_bytes(4, "big"))
                        writer.write(chunk)
                        await writer.drain()
                    writer.write(b"\0\0\0\0")
                    await writer.drain()
                    answer = await reader.readuntil(b"\0")
                finally:
                    writer.close()
        except TimeoutError:
            raise ScannerError(f"clamd: no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ScannerError(f"clamd: {exc or type(exc).__name__}") from None
        text = answer.rstrip(b"\0").decode("utf-8", errors="replace").strip()
        # "stream: OK", "stream: Eicar-Signature FOUND", "INSTREAM size limit exceeded. ERROR"
        if text.endswith(" FOUND"):
            name = text.removeprefix("stream:").removesuffix(" FOUND").strip()
            return ScanResult(self.name, VIRUS, reasons=(name,))
        if text.endswith("OK"):
            return ScanResult(self.name, CLEAN)
        raise ScannerError(f"clamd: {text[:200]}")


DaemonClient = RspamdClient | SpamdClient | ClamdClient
