"""Parsing of MAIL FROM / RCPT TO arguments (RFC 5321 §4.1.2, RFC 6531).

Strict on purpose: the path must be in angle brackets, local part and domain
are checked, and the size limits of RFC 5321 §4.5.3.1 apply (local part 64,
domain 255, path 256 octets).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from . import replies

# RFC 5321 §4.1.2 atext, plus any non-ASCII character (RFC 6531 UTF8-non-ascii).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]+"
_DOT_STRING = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[A-Za-z0-9\u0080-\U0010FFFF](?:[A-Za-z0-9\-\u0080-\U0010FFFF]{0,61}[A-Za-z0-9\u0080-\U0010FFFF])?$")


@dataclass(slots=True)
class PathArgument:
    address: str                 # "" for the null path <>
    params: dict[str, str]       # upper-cased keyword -> value ("" when none)
    non_ascii: bool


def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].upper() == "IPV6:":
            literal = literal[5:]
            try:
                return ipaddress.ip_address(literal).version == 6
            except ValueError:
                return False
        try:
            return ipaddress.ip_address(literal).version == 4
        except ValueError:
            return False
    labels = domain.split(".")
    return all(_LABEL.match(label) for label in labels)


# The common case in one match: an ASCII dot-atom local part and a host-name
# domain, no quoting, no source route.  Everything else takes the full parser.
_SIMPLE = re.compile(
    r"(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*)"
    r"@(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)>"
)


def parse_path_argument(arg: str, keyword: str, allow_null: bool) -> PathArgument | bytes:
    """Parse ``FROM:<path> params`` (keyword "FROM:") or ``TO:<path> params``.

    Returns the parsed argument or the SMTP error reply to send.
    """
    n = len(keyword)
    if arg[n:n + 1] == "<" and arg[:n].upper() == keyword:
        m = _SIMPLE.match(arg, n + 1)
        if m is not None and len(m.group("local")) <= 64 and m.end() - n - 2 <= 256:
            after = arg[m.end():]
            if not after:
                return PathArgument(arg[n + 1:m.end() - 1], {}, False)
            if after[0] == " ":
                params: dict[str, str] = {}
                for token in after.split():
                    key, _, value = token.partition("=")
                    params[key.upper()] = value
                return PathArgument(arg[n + 1:m.end() - 1], params, False)
    bad = replies.BAD_SENDER_SYNTAX if allow_null else replies.BAD_RCPT_SYNTAX
    if arg[: len(keyword)].upper() != keyword:
        return replies.reply(501, "5.5.4", f"Syntax: {'MAIL FROM' if allow_null else 'RCPT TO'}:<address>")
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        return replies.reply(501, "5.5.4", f"Syntax: {'MAIL FROM' if allow_null else 'RCPT TO'}:<address> (angle brackets required)")
    # Find the closing bracket outside any quoted local part.
    in_quote = escaped = False
    end = -1
    for i in range(1, len(rest)):
        c = rest[i]
        if escaped:
            escaped = False
        elif c == "\\" and in_quote:
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            end = i
            break
    if end < 0:
        return bad
    path = rest[1:end]
    after = rest[end + 1:]
    if after and not after.startswith(" "):
        return bad
    params = {}
    for token in after.split():
        key, _, value = token.partition("=")
        params[key.upper()] = value
    if not path.isprintable():
        # RFC 6531 admits any non-ASCII character, but a C1 control, a bidi override or a
        # zero-width space in an address is no one's mailbox: it is a way to make the log,
        # the queue listing or an administrator's terminal show something else.
        return bad
    if len(path.encode("utf-8")) > 256:
        return replies.PATH_TOO_LONG
    if path.startswith("@"):
        # RFC 5321 §4.1.2: a source route is accepted and ignored.
        _, colon, path = path.partition(":")
        if not colon:
            return bad
    if not path:
        if allow_null:
            return PathArgument("", params, False)
        return bad
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        return bad
    if len(local.encode("utf-8")) > 64 or len(domain.encode("utf-8")) > 255:
        return replies.PATH_TOO_LONG
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        return bad
    if not _valid_domain(domain):
        return bad
    return PathArgument(path, params, not path.isascii())
