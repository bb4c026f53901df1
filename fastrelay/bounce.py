"""Delivery status notifications: the bounce message returned to a sender.

A DSN is an RFC 3464 report inside an RFC 6522 ``multipart/report``:

1. a ``text/plain`` part for people, one line per failed recipient;
2. a ``message/delivery-status`` part: per-message fields (Reporting-MTA,
   Arrival-Date) then, per recipient, Final-Recipient, Action, Status (RFC 3463),
   Remote-MTA, Diagnostic-Code and Last-Attempt-Date;
3. the original message's header section as ``text/rfc822-headers``
   (headers only, as Postfix does by default: the body may be large and
   the sender already has it).

When an address or the original headers are not ASCII (SMTPUTF8 mail), the
report uses the RFC 6533 types ``message/global-delivery-status``
(address type ``utf-8``) and ``message/global-headers``.

The DSN comes from the null sender (RFC 5321 §4.5.5) so that it can never
cause another bounce, and carries ``Auto-Submitted: auto-replied`` (RFC 3834).

Config keys read: server.hostname (Reporting-MTA and the From: address).
"""

from __future__ import annotations

import email.utils
import secrets
from typing import NamedTuple

# Keep generated lines well inside RFC 5322's 998-octet limit.
MAX_FIELD = 900
# Original headers returned, at most (a message can be almost all header).
MAX_RETURNED_HEADERS = 64 * 1024


class FailedRecipient(NamedTuple):
    """One recipient to report on."""

    address: str
    status: str             # RFC 3463 code, e.g. "5.1.1"
    detail: str             # human-readable reason (the log's status text)
    diagnostic: str = ""    # the remote reply ("550 5.1.1 ..."), if a server gave one
    remote_mta: str = ""    # the remote host that gave it
    action: str = "failed"  # RFC 3464 §2.3.3: failed | delayed | delivered | relayed | expanded


class Notification(NamedTuple):
    """A ready DSN: its content and what its envelope needs."""

    content: bytes
    utf8: bool          # needs SMTPUTF8 at the next hop
    eight_bit: bool     # has 8-bit content


def original_headers(body: bytes) -> bytes:
    """The header section of a message (up to and including the line before the blank line)."""
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[:end + 2]
    if len(headers) > MAX_RETURNED_HEADERS:
        cut = headers.rfind(b"\r\n", 0, MAX_RETURNED_HEADERS)
        headers = headers[:cut + 2] if cut > 0 else headers[:MAX_RETURNED_HEADERS] + b"\r\n"
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    return headers


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD - 3] + "..."


def build_dsn(*, reporting_mta: str, dsn_queue_id: str, original_queue_id: str, sender: str,
              arrival: float, failed: list[FailedRecipient], original: bytes, now: float,
              retry_until: float | None = None) -> Notification:
    """The whole DSN message, CRLF line ends, ready to be spooled.

    With ``retry_until`` it is a delay warning (every recipient's action is
    "delayed", RFC 3464 §2.3.3): the message is still queued and will be
    tried until then."""
    headers = original_headers(original)
    utf8_addresses = not (sender.isascii() and all(f.address.isascii() for f in failed))
    utf8_headers = not headers.isascii()
    boundary = f"{dsn_queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    date = email.utils.formatdate(now, localtime=True)
    status_type = "message/global-delivery-status" if utf8_addresses else "message/delivery-status"
    headers_type = "message/global-headers" if utf8_headers else "text/rfc822-headers"
    address_type = "utf-8" if utf8_addresses else "rfc822"

    if retry_until is None:
        subject = "Undelivered Mail Returned to Sender"
        text = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
            "",
            "                   The mail system",
            "",
        ]
    else:
        # Postfix's wording for its delay_warning_time notices.
        subject = "Delayed Mail (still being retried)"
        hours = max(0.0, now - arrival) / 3600
        text = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for {hours:.1f} hour(s).",
            f"It will be retried until {email.utils.formatdate(retry_until, localtime=True)}.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "                   The mail system",
            "",
        ]
    for f in failed:
        text.append(_clip(f"<{f.address}>: {f.detail}"))
        text.append("")

    report = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Fastrelay-Queue-ID: {original_queue_id}",
        f"X-Fastrelay-Sender: {address_type}; {sender}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}",
        "",
    ]
    for f in failed:
        report.append(f"Final-Recipient: {address_type}; {f.address}")
        report.append(f"Action: {f.action}")
        report.append(f"Status: {f.status}")
        if f.remote_mta:
            report.append(f"Remote-MTA: dns; {f.remote_mta}")
        if f.diagnostic:
            report.append(_clip(f"Diagnostic-Code: smtp; {f.diagnostic}"))
        else:
            report.append(_clip(f"Diagnostic-Code: X-Fastrelay; {f.detail}"))
        report.append(f"Last-Attempt-Date: {date}")
        if retry_until is not None:
            report.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until, localtime=True)}")
        report.append("")

    top = [
        f"Received: by {reporting_mta} (fastrelay) id {dsn_queue_id}; {date}",
        f"Date: {date}",
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)",
        f"To: {sender}",
        f"Subject: {subject}",
        f"Message-ID: <{dsn_queue_id}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *text,
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}",
        "",
        *report,
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: {headers_type}",
        "",
        "",
    ]
    head = "\r\n".join(top).encode("utf-8")
    # The headers end with their own CRLF; the delimiter's CRLF follows (RFC 2046 §5.1.1).
    content = head + headers + f"\r\n--{boundary}--\r\n".encode()
    return Notification(content, utf8_addresses, not content.isascii())
