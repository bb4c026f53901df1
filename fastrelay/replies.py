"""SMTP replies fastrelay sends, each with its RFC 3463 enhanced status code.

Replies are pre-encoded bytes so the hot path only writes them.  Texts that
reproduce the relay model's documented replies keep its codes and enhanced
codes (shared/reference/relay-model.md §1a, §3).
"""

from __future__ import annotations


def reply(code: int, enhanced: str, text: str) -> bytes:
    """One reply line; multi-line texts become ``code-`` continuation lines."""
    lines = text.split("\n")
    prefix = f"{code} {enhanced} " if enhanced else f"{code} "
    cont = f"{code}-{enhanced} " if enhanced else f"{code}-"
    out = [cont + line for line in lines[:-1]] + [prefix + lines[-1]]
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


def code_of(line: bytes) -> int:
    return int(line[:3])


# RFC 5321 §4.2 and RFC 3463; grouped by stage.
OK = reply(250, "2.0.0", "Ok")
SENDER_OK = reply(250, "2.1.0", "Ok")
RCPT_OK = reply(250, "2.1.5", "Ok")
RESET_OK = reply(250, "2.0.0", "Ok")
NOOP_OK = reply(250, "2.0.0", "Ok")
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
VRFY_CANNOT = reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
READY_TLS = reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = reply(235, "2.7.0", "Accepted")

SERVICE_UNAVAILABLE = reply(421, "4.3.2", "Service not available, closing transmission channel")
SHUTTING_DOWN = reply(421, "4.3.2", "Server shutting down, closing connection")
TOO_MANY_CONNECTIONS = reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = reply(421, "4.7.0", "Too many connections from your address, try again later")
TIMEOUT = reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors in this session, closing connection")
EHLO_REFUSED = reply(421, "4.7.0", "Try again later, closing connection. (EHLO)")
TEMP_LOCAL_ERROR = reply(451, "4.3.0", "Temporary local problem, try again later")
STORAGE_FULL = reply(452, "4.3.1", "Insufficient system storage")
DATA_MEMORY_FULL = reply(452, "4.3.1", "Insufficient system resources: too much mail in transit, try again later")
TOO_MANY_RCPTS = reply(452, "4.5.3", "Too many recipients for this transaction; start another transaction for the rest.")
AUTH_LOCKED_OUT = reply(454, "4.7.0", "Too many login attempts, please try again later.")
TLS_UNAVAILABLE = reply(454, "4.7.0", "TLS not available due to temporary reason")

SYNTAX_ERROR = reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = reply(500, "5.5.6", "Line too long (RFC 5321 §4.5.3.1.4: 512 octets at most)")
BARE_NEWLINE_COMMAND = reply(500, "5.5.2", "Syntax error: bare CR or LF in command; lines end with CRLF")
BAD_UTF8 = reply(500, "5.5.2", "Syntax error: invalid UTF-8")
EMPTY_HELO = reply(501, "5.5.4", "Empty HELO/EHLO argument not allowed, closing connection.")
BAD_HELO = reply(501, "5.5.4", "HELO/EHLO argument is not a valid host name or address literal")
ARGS_NOT_ALLOWED = reply(501, "5.5.4", "Syntax error: no parameters allowed")
BAD_PATH = reply(501, "5.1.3", "Bad address syntax")
BAD_SENDER_SYNTAX = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = reply(501, "5.1.3", "Bad recipient address syntax")
PATH_TOO_LONG = reply(501, "5.5.4", "Path too long (RFC 5321 §4.5.3.1: path 256, local part 64, domain 255 octets)")
BAD_BASE64 = reply(501, "5.5.2", "Cannot decode response (invalid base64)")
AUTH_CANCELLED = reply(501, "5.0.0", "Authentication cancelled")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
EXPN_DISABLED = reply(502, "5.5.1", "EXPN not available")
BAD_SEQUENCE = reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = reply(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = reply(503, "5.5.1", "Sender already specified")
ALREADY_TLS = reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = reply(503, "5.7.0", "Already authenticated")
AUTH_IN_TRANSACTION = reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
NULL_SENDER_ONE_RCPT = reply(
    550, "5.5.3", "A message with an empty envelope sender (MAIL FROM:<>) may have only one recipient"
)
UNKNOWN_MECHANISM = reply(504, "5.7.4", "Unrecognized authentication type")
NEED_STARTTLS = reply(530, "5.7.0", "Must issue a STARTTLS command first.")
AUTH_REQUIRED = reply(530, "5.5.1", "Authentication Required.")
AUTH_FAILED = reply(535, "5.7.8", "Username and Password not accepted.")
AUTH_IDENTITY_MISMATCH = reply(535, "5.7.8", "Authorization identity must match the authenticated user")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# RFC 3463 X.4.6: routing loop detected (RFC 5321 §6.3).
TOO_MANY_HOPS = reply(554, "5.4.6", "Too many hops: mail loop detected")
UNKNOWN_PARAMETER = reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NEED_SMTPUTF8 = reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
BARE_NEWLINE_DATA = reply(
    554, "5.6.0", "Message refused: bare CR or LF in content; lines must end with CRLF (RFC 5321 §2.3.8)"
)
LONG_LINE_DATA = reply(
    554, "5.6.0", "Message refused: a line is longer than 998 octets (RFC 5322 §2.1.1)"
)
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")
