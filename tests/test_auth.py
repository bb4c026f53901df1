"""SMTP AUTH (RFC 4954): PLAIN and LOGIN inside TLS only, app passwords, brute-force throttle.

One relay serves the module, with the throttle turned down so it shows in
seconds: the second failure from an IP within the window is answered after
1 s, the third after 2 s and it locks the IP out for 8 s (454 4.7.0).  Every
test uses its own client address (127.0.0.x), so failures counted for one
test never slow another: the throttle is per client IP, which is also what
the brute-force test checks.

Users of the account "acme" (acme.test):
  alice@acme.test      one password (conftest.ALICE_PASSWORD)
  dev@acme.test        three app passwords, one per device
  device@acme.test     no password at all
  nolicence@acme.test  correct password, but no mail licence
  suspended@acme.test  correct password, but suspended
Rules: "roaming" (registered users, AUTH + TLS, any IP) and "office"
(my domains, 127.0.0.10 only) so a transaction can start without AUTH.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator

import argon2
import pytest
from conftest import (
    ALICE_PASSWORD,
    HOSTNAME,
    Certs,
    RawClient,
    RelayProcess,
    free_port,
    queue_id_of,
    spooled,
    start_tls,
    write_config,
)

from fastrelay.config import ServerConfig
from fastrelay.server import AuthThrottle

SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (Debian package swaks)")

ALICE = "alice@acme.test"
DEV = "dev@acme.test"
DEVICE_PASSWORDS = {"phone": "phone-app-password", "laptop": "laptop-app-password", "printer": "printer-app-pw"}
RCPT = "carol@example.net"
HELO = "client.acme.test"

AUTH_OK = b"235 2.7.0 Accepted"
AUTH_FAILED = b"535 5.7.8 Username and Password not accepted."
AUTH_MISMATCH = b"535 5.7.8 Authorization identity must match the authenticated user"
ALREADY_AUTH = b"503 5.7.0 Already authenticated"
UNKNOWN_MECHANISM = b"504 5.7.4 Unrecognized authentication type"
NEED_STARTTLS = b"530 5.7.0 Must issue a STARTTLS command first."
AUTH_REQUIRED = b"530 5.5.1 Authentication Required."
LOCKED_OUT = b"454 4.7.0 Too many login attempts, please try again later."
USERNAME_PROMPT = b"334 VXNlcm5hbWU6"
PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6"

THROTTLE = """
auth_failures_before_delay = 1
auth_failures_before_lockout = 3
auth_failure_window = 600
auth_lockout = 8
"""

ACCOUNTS = """
[[accounts]]
name = "acme"
domains = ["acme.test"]

[[accounts.users]]
address = "alice@acme.test"
passwords = ["{alice_hash}"]

[[accounts.users]]
address = "dev@acme.test"
passwords = [{dev_hashes}]

[[accounts.users]]
address = "device@acme.test"   # no password: sends only through IP rules

[[accounts.users]]
address = "nolicence@acme.test"
passwords = ["{alice_hash}"]
mail_license = false

[[accounts.users]]
address = "suspended@acme.test"
passwords = ["{alice_hash}"]
suspended = true

[[accounts.rules]]
name = "roaming"
allowed_senders = "registered_users"
require_auth = true
require_tls = true

[[accounts.rules]]
name = "office"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ { range = "127.0.0.10/32" } ]
"""


@pytest.fixture(scope="module")
def auth_relay(tmp_path_factory: pytest.TempPathFactory, certs: Certs, alice_hash: str) -> Iterator[RelayProcess]:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    dev_hashes = ", ".join(f'"{hasher.hash(p)}"' for p in DEVICE_PASSWORDS.values())
    accounts = ACCOUNTS.replace("{alice_hash}", alice_hash).replace("{dev_hashes}", dev_hashes)
    directory = tmp_path_factory.mktemp("auth-relay")
    port, tls_port = free_port(), free_port()
    config_path = write_config(directory, certs, port, tls_port, accounts=accounts, server_extra=THROTTLE)
    relay = RelayProcess(directory, port, tls_port, certs, config_path)
    relay.start()
    yield relay
    if relay.proc is not None and relay.proc.poll() is None:
        relay.stop()


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}")


def tls_client(relay: RelayProcess, source: str, helo: bytes = b"EHLO " + HELO.encode()) -> RawClient:
    """Connected, STARTTLS done, EHLO sent again inside TLS."""
    client = RawClient(relay.port, source=source)
    assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
    assert client.cmd(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
    start_tls(client, relay.certs.client_context())
    if helo:
        assert client.cmd(helo).startswith(b"250")
    return client


def timed(client: RawClient, line: bytes) -> tuple[bytes, float]:
    start = time.monotonic()
    reply = client.cmd(line)
    return reply, time.monotonic() - start


def send_as(relay: RelayProcess, source: str, user: str, password: str, sender: str) -> str:
    """AUTH with smtplib over STARTTLS and send one message; return its queue id."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=HELO, source_address=(source, 0), timeout=15) as s:
        s.starttls(context=relay.certs.client_context())
        assert s.login(user, password) == (235, b"2.7.0 Accepted")
        assert s.mail(sender) == (250, b"2.1.0 Ok")
        assert s.rcpt(RCPT) == (250, b"2.1.5 Ok")
        code, msg = s.data(b"Subject: auth test\r\n\r\nhello\r\n")
        assert code == 250, msg
        return queue_id_of(msg)


# --- AUTH only inside TLS -----------------------------------------------------------------


def test_auth_advertised_only_inside_tls(auth_relay: RelayProcess) -> None:
    client = RawClient(auth_relay.port, source="127.0.0.31")
    try:
        ehlo = client.cmd(b"EHLO " + HELO.encode()).split(b"\r\n")
        assert b"250-STARTTLS" in ehlo or b"250 STARTTLS" in ehlo
        assert not any(b"AUTH" in line for line in ehlo)
        assert client.cmd(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        start_tls(client, auth_relay.certs.client_context())
        ehlo = client.cmd(b"EHLO " + HELO.encode()).split(b"\r\n")
        assert b"250 AUTH PLAIN LOGIN" in ehlo or b"250-AUTH PLAIN LOGIN" in ehlo
        assert not any(b"STARTTLS" in line for line in ehlo)
    finally:
        client.close()
    ctx = auth_relay.certs.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", auth_relay.tls_port, local_hostname=HELO, context=ctx,
                          source_address=("127.0.0.31", 0), timeout=15) as s:
        s.ehlo()
        assert s.has_extn("auth") and s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


@pytest.mark.parametrize("line", [
    b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD),
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH CRAM-MD5",
])
def test_auth_outside_tls_refused(auth_relay: RelayProcess, line: bytes) -> None:
    client = RawClient(auth_relay.port, source="127.0.0.32")
    try:
        assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
        assert client.cmd(line) == NEED_STARTTLS
        # Not authenticated, and AUTH is what the only rule for this IP needs.
        assert client.cmd(b"MAIL FROM:<alice@acme.test>") == NEED_STARTTLS
        assert client.cmd(b"NOOP") == b"250 2.0.0 Ok"
    finally:
        client.close()
    assert "auth: [127.0.0.32]" not in auth_relay.log()  # nothing attempted, nothing counted


# --- success --------------------------------------------------------------------------------


def test_auth_plain_with_smtplib_and_send(auth_relay: RelayProcess) -> None:
    queue_id = send_as(auth_relay, "127.0.0.33", ALICE, ALICE_PASSWORD, ALICE)
    envelope, header, _ = spooled(auth_relay, queue_id)
    assert envelope.auth_user == ALICE  # type: ignore[attr-defined]
    assert envelope.sender == ALICE  # type: ignore[attr-defined]
    assert envelope.rule == "roaming"  # type: ignore[attr-defined]
    assert b"(Authenticated sender: alice@acme.test)" in header
    assert b"with ESMTPSA id " + queue_id.encode() in header
    auth_relay.wait_log("auth: [127.0.0.33] authenticated as alice@acme.test")


def test_auth_login_with_smtplib(auth_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", auth_relay.port, local_hostname=HELO, source_address=("127.0.0.34", 0),
                      timeout=15) as s:
        s.starttls(context=auth_relay.certs.client_context())
        s.ehlo()
        s.user, s.password = ALICE, ALICE_PASSWORD
        assert s.auth("LOGIN", s.auth_login, initial_response_ok=False) == (235, b"2.7.0 Accepted")
        assert s.mail(ALICE) == (250, b"2.1.0 Ok")


def test_auth_plain_initial_response_and_continuation(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.35")
    try:
        assert client.cmd(b"AUTH PLAIN") == b"334 "
        assert client.cmd(plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()
    client = tls_client(auth_relay, "127.0.0.35")
    try:
        assert client.cmd(b"auth plain " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_auth_login_both_forms(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.36")
    try:
        assert client.cmd(b"AUTH LOGIN") == USERNAME_PROMPT
        assert client.cmd(b64(ALICE)) == PASSWORD_PROMPT
        assert client.cmd(b64(ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()
    client = tls_client(auth_relay, "127.0.0.36")
    try:
        assert client.cmd(b"AUTH LOGIN " + b64(ALICE)) == PASSWORD_PROMPT
        assert client.cmd(b64(ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_auth_over_implicit_tls(auth_relay: RelayProcess) -> None:
    ctx = auth_relay.certs.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", auth_relay.tls_port, local_hostname=HELO, context=ctx,
                          source_address=("127.0.0.37", 0), timeout=15) as s:
        assert s.login(ALICE, ALICE_PASSWORD) == (235, b"2.7.0 Accepted")
        assert s.mail(ALICE) == (250, b"2.1.0 Ok")


def test_user_name_is_case_insensitive_and_canonical(auth_relay: RelayProcess) -> None:
    queue_id = send_as(auth_relay, "127.0.0.38", "Alice@ACME.test", ALICE_PASSWORD, ALICE)
    envelope, _, _ = spooled(auth_relay, queue_id)
    assert envelope.auth_user == ALICE  # type: ignore[attr-defined]


@pytest.mark.parametrize("device", list(DEVICE_PASSWORDS))
def test_each_app_password_works(auth_relay: RelayProcess, device: str) -> None:
    queue_id = send_as(auth_relay, "127.0.0.39", DEV, DEVICE_PASSWORDS[device], DEV)
    envelope, _, _ = spooled(auth_relay, queue_id)
    assert (envelope.auth_user, envelope.sender) == (DEV, DEV)  # type: ignore[attr-defined]


def test_app_password_of_another_user_does_not_work(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.40")
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, DEVICE_PASSWORDS["phone"])) == AUTH_FAILED
    finally:
        client.close()


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_with_swaks(auth_relay: RelayProcess, mechanism: str) -> None:
    assert SWAKS is not None
    result = subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(auth_relay.port), "--local-interface", "127.0.0.41",
         "--helo", HELO, "--tls", "--tls-ca-path", str(auth_relay.certs.ca_file), "--tls-verify",
         "--tls-sni", HOSTNAME,
         "--auth", mechanism, "--auth-user", ALICE, "--auth-password", ALICE_PASSWORD,
         "--from", ALICE, "--to", RCPT, "--header", f"Subject: swaks {mechanism}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  235 2.7.0 Accepted" in result.stdout
    queued = [line for line in result.stdout.splitlines() if "Ok: queued as" in line]
    assert len(queued) == 1
    queue_id = queued[0].rsplit(" ", 1)[1]
    envelope, _, content = spooled(auth_relay, queue_id)
    assert envelope.auth_user == ALICE  # type: ignore[attr-defined]
    assert f"Subject: swaks {mechanism}".encode() in content


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "lines"), [
    pytest.param("127.0.0.42", [b"AUTH PLAIN " + plain(ALICE, "wrong-password")], id="plain-wrong-password"),
    pytest.param("127.0.0.43", [b"AUTH PLAIN " + plain("nobody@acme.test", ALICE_PASSWORD)], id="plain-unknown-user"),
    pytest.param("127.0.0.44", [b"AUTH LOGIN", b64(ALICE), b64("wrong-password")], id="login-wrong-password"),
    pytest.param("127.0.0.45", [b"AUTH PLAIN " + plain("nolicence@acme.test", ALICE_PASSWORD)],
                 id="unlicensed-user"),
    pytest.param("127.0.0.46", [b"AUTH PLAIN " + plain("suspended@acme.test", ALICE_PASSWORD)],
                 id="suspended-user"),
    pytest.param("127.0.0.47", [b"AUTH PLAIN " + plain(ALICE, "")], id="empty-password"),
    pytest.param("127.0.0.54", [b"AUTH PLAIN " + plain("device@acme.test", "")], id="user-without-passwords"),
    pytest.param("127.0.0.55", [b"AUTH LOGIN " + b64("device@acme.test"), b64(ALICE_PASSWORD)],
                 id="user-without-passwords-any-password"),
])
def test_bad_credentials(auth_relay: RelayProcess, source: str, lines: list[bytes]) -> None:
    client = tls_client(auth_relay, source)
    try:
        for line in lines[:-1]:
            assert client.cmd(line).startswith(b"334 ")
        assert client.cmd(lines[-1]) == AUTH_FAILED
        # Not authenticated: the rule that needs AUTH does not admit.
        assert client.cmd(b"MAIL FROM:<alice@acme.test>") == AUTH_REQUIRED
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK  # may try again
        assert client.cmd(b"MAIL FROM:<alice@acme.test>") == b"250 2.1.0 Ok"
    finally:
        client.close()
    auth_relay.wait_log(f"auth: [{source}] failed for ")


@pytest.mark.parametrize(("user", "state"), [
    ("nolicence@acme.test", "has no mail licence"),
    ("suspended@acme.test", "is suspended"),
])
def test_valid_password_of_blocked_user_is_logged(auth_relay: RelayProcess, user: str, state: str) -> None:
    source = "127.0.0.56" if "nolicence" in user else "127.0.0.57"
    client = tls_client(auth_relay, source)
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(user, ALICE_PASSWORD)) == AUTH_FAILED
    finally:
        client.close()
    auth_relay.wait_log(f"auth: {user} gave a valid password but {state}")
    auth_relay.wait_log(f"auth: [{source}] failed for {user!r}: bad credentials")


def test_smtplib_login_failure_raises(auth_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", auth_relay.port, local_hostname=HELO, source_address=("127.0.0.48", 0),
                      timeout=15) as s:
        s.starttls(context=auth_relay.certs.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login(ALICE, "not-it")
        assert info.value.smtp_code == 535
        assert info.value.smtp_error == b"5.7.8 Username and Password not accepted."


def test_second_auth_refused(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.49")
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
        assert client.cmd(b"AUTH PLAIN " + plain(DEV, DEVICE_PASSWORDS["phone"])) == ALREADY_AUTH
        assert client.cmd(b"AUTH LOGIN") == ALREADY_AUTH
        # Still alice, not dev.
        assert client.cmd(b"MAIL FROM:<dev@acme.test>") == b"250 2.1.0 Ok"
        assert client.cmd(b"RCPT TO:<carol@example.net>") == b"250 2.1.5 Ok"
        assert client.cmd(b"DATA").startswith(b"354")
        queue_id = queue_id_of(client.cmd(b"Subject: x\r\n\r\nx\r\n."))
    finally:
        client.close()
    envelope, _, _ = spooled(auth_relay, queue_id)
    assert envelope.auth_user == ALICE  # type: ignore[attr-defined]


def test_authorization_identity_must_be_the_user(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.50")
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD, authzid=DEV)) == AUTH_MISMATCH
        assert client.cmd(b"MAIL FROM:<dev@acme.test>") == AUTH_REQUIRED
        # The same identity (in any case) is fine.
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD, authzid="ALICE@acme.test")) == AUTH_OK
    finally:
        client.close()
    auth_relay.wait_log("auth: [127.0.0.50] failed for 'alice@acme.test': authorization identity differs")


def test_a_long_user_name_is_cut_in_the_log(auth_relay: RelayProcess) -> None:
    """A failed AUTH logs the client's user name, quoted and cut: an AUTH line may carry 12 KB of it."""
    name = "\u00e9" + "x" * 8999
    client = tls_client(auth_relay, "127.0.0.51")
    try:
        assert client.cmd(b"AUTH LOGIN " + base64.b64encode(name.encode()))[:3] == b"334"
        assert client.cmd(base64.b64encode(b"wrong")) == AUTH_FAILED
    finally:
        client.close()
    line = auth_relay.wait_log("auth: [127.0.0.51] failed for")
    logged = next(entry for entry in line.splitlines() if "auth: [127.0.0.51] failed for" in entry)
    assert f"failed for '{name[:100]}' (+8900 characters): bad credentials" in logged
    assert len(logged) < 300


@pytest.mark.parametrize("mechanism", [b"CRAM-MD5", b"XOAUTH2 dXNlcj1h", b"DIGEST-MD5", b"GSSAPI", b""])
def test_unknown_mechanism(auth_relay: RelayProcess, mechanism: bytes) -> None:
    client = tls_client(auth_relay, "127.0.0.51")
    try:
        assert client.cmd((b"AUTH " + mechanism).rstrip()) == UNKNOWN_MECHANISM
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_auth_cancelled_and_bad_base64(auth_relay: RelayProcess) -> None:
    client = tls_client(auth_relay, "127.0.0.52")
    try:
        assert client.cmd(b"AUTH LOGIN") == USERNAME_PROMPT
        assert client.cmd(b"*") == b"501 5.0.0 Authentication cancelled"
        assert client.cmd(b"AUTH PLAIN") == b"334 "
        assert client.cmd(b"*") == b"501 5.0.0 Authentication cancelled"
        assert client.cmd(b"AUTH PLAIN not!base64") == b"501 5.5.2 Cannot decode response (invalid base64)"
        assert client.cmd(b"AUTH PLAIN " + b64("no-separators")) == \
            b"501 5.5.2 Cannot decode response (invalid base64)"
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_auth_sequence_errors(auth_relay: RelayProcess) -> None:
    # Inside TLS but before the new EHLO that RFC 3207 asks for.
    client = tls_client(auth_relay, "127.0.0.10", helo=b"")
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == b"503 5.5.1 Send HELO/EHLO first"
        assert client.cmd(b"HELO " + HELO.encode()).startswith(b"250 ")
        # AUTH is an ESMTP extension: not after HELO.
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == b"503 5.5.1 Send HELO/EHLO first"
        assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
        # Not inside a mail transaction (the office rule admits this IP without AUTH).
        assert client.cmd(b"MAIL FROM:<bob@acme.test>") == b"250 2.1.0 Ok"
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == \
            b"503 5.5.1 AUTH not permitted during a mail transaction"
        assert client.cmd(b"RSET") == b"250 2.0.0 Ok"
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_starttls_forgets_nothing_it_should_keep(auth_relay: RelayProcess) -> None:
    """Credentials sent in plain text before STARTTLS are refused and never checked."""
    client = RawClient(auth_relay.port, source="127.0.0.53")
    try:
        assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
        assert client.cmd(b"AUTH LOGIN " + b64(ALICE)) == NEED_STARTTLS
        assert client.cmd(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        start_tls(client, auth_relay.certs.client_context())
        assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
        assert client.cmd(b"MAIL FROM:<alice@acme.test>") == AUTH_REQUIRED
    finally:
        client.close()


# --- brute force ------------------------------------------------------------------------------


def test_brute_force_is_slowed_then_locked_out_per_ip(auth_relay: RelayProcess) -> None:
    attacker, bystander = "127.0.0.60", "127.0.0.61"
    client = tls_client(auth_relay, attacker)
    try:
        reply, _ = timed(client, b"AUTH PLAIN " + plain(ALICE, "guess-1"))
        assert reply == AUTH_FAILED
        # Failure 2 is answered after 1 s, failure 3 after 2 s (and locks the IP).
        reply, elapsed = timed(client, b"AUTH PLAIN " + plain(ALICE, "guess-2"))
        assert reply == AUTH_FAILED
        assert elapsed >= 0.9
        reply, elapsed = timed(client, b"AUTH LOGIN " + b64(ALICE))
        assert reply == PASSWORD_PROMPT
        reply, elapsed = timed(client, b64("guess-3"))
        assert reply == AUTH_FAILED
        assert elapsed >= 1.9
        # Locked: even the right password is not checked, on this connection or a new one.
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == LOCKED_OUT
        assert client.cmd(b"AUTH LOGIN") == LOCKED_OUT
    finally:
        client.close()
    again = tls_client(auth_relay, attacker)
    try:
        assert again.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == LOCKED_OUT
        assert again.cmd(b"MAIL FROM:<alice@acme.test>") == AUTH_REQUIRED
    finally:
        again.close()
    auth_relay.wait_log(f"auth: {attacker} locked out for 8s after 3 failures")

    # Another IP is not affected: its first failure is a plain 535, and it can log in.
    other = tls_client(auth_relay, bystander)
    try:
        assert other.cmd(b"AUTH PLAIN " + plain(ALICE, "typo")) == AUTH_FAILED
        assert other.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        other.close()

    # The lockout ends (auth_lockout = 8 s after the third failure).
    deadline = time.monotonic() + 20
    while True:
        probe = tls_client(auth_relay, attacker)
        try:
            reply = probe.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD))
        finally:
            probe.close()
        if reply == AUTH_OK:
            break
        assert reply == LOCKED_OUT
        assert time.monotonic() < deadline, "the lockout did not end"
        time.sleep(0.5)


def test_success_does_not_wipe_failures(auth_relay: RelayProcess) -> None:
    """Whoever holds one valid password must not reset the count between guesses at others'."""
    source = "127.0.0.62"
    client = tls_client(auth_relay, source)
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(DEV, "guess-1")) == AUTH_FAILED
    finally:
        client.close()
    client = tls_client(auth_relay, source)
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()
    client = tls_client(auth_relay, source)
    try:
        reply, elapsed = timed(client, b"AUTH PLAIN " + plain(DEV, "guess-2"))
        assert reply == AUTH_FAILED
        assert elapsed >= 0.9  # the second failure is slowed although a success came between
        assert client.cmd(b"AUTH PLAIN " + plain(DEV, "guess-3")) == AUTH_FAILED
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == LOCKED_OUT
    finally:
        client.close()


def test_tls_handshake_required_for_auth_even_with_bad_client_tls(auth_relay: RelayProcess) -> None:
    """A client that fails the handshake never reaches AUTH; the relay stays up for others."""
    client = RawClient(auth_relay.port, source="127.0.0.63")
    try:
        assert client.cmd(b"EHLO " + HELO.encode()).startswith(b"250-")
        assert client.cmd(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        ctx = ssl.create_default_context()  # does not trust the test CA
        with pytest.raises(ssl.SSLCertVerificationError):
            start_tls(client, ctx)
    finally:
        client.close()
    queue_id = send_as(auth_relay, "127.0.0.64", ALICE, ALICE_PASSWORD, ALICE)
    assert spooled(auth_relay, queue_id)[0].auth_user == ALICE  # type: ignore[attr-defined]


def test_reload_lifts_lockouts(auth_relay: RelayProcess) -> None:
    source = "127.0.0.65"
    client = tls_client(auth_relay, source)
    try:
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert client.cmd(b"AUTH PLAIN " + plain(ALICE, guess)) == AUTH_FAILED
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == LOCKED_OUT
    finally:
        client.close()
    before = auth_relay.log().count("reload: config")
    auth_relay.reload()
    deadline = time.monotonic() + 15
    while auth_relay.log().count("reload: config") == before:
        assert time.monotonic() < deadline, "no reload in the log"
        time.sleep(0.05)
    client = tls_client(auth_relay, source)
    try:
        assert client.cmd(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == AUTH_OK
    finally:
        client.close()


def test_failures_from_many_addresses_are_forgotten_once_out_of_the_window() -> None:
    """Each client address that fails AUTH once used to stay in memory for good: a botnet,
    or one IPv6 host walking its /64, could grow the relay without bound.  Failures older
    than auth_failure_window are swept, and at most MAX_TRACKED addresses are kept."""
    cfg = ServerConfig(auth_failure_window=600.0)
    throttle = AuthThrottle(cfg)
    for i in range(50_000):
        throttle.fail(f"2001:db8::{i:x}", now=1000.0 + i * 0.001)
    assert throttle.tracked() <= AuthThrottle.MAX_TRACKED
    # Past the window, the next failures find the old ones gone.
    for i in range(10):
        throttle.fail(f"192.0.2.{i}", now=1000.0 + 50 + 601.0)
    assert throttle.tracked() <= 10 + AuthThrottle.SWEEP_EVERY
    # A lockout within the window still holds.
    for _ in range(cfg.auth_failures_before_lockout):
        throttle.fail("198.51.100.7", now=2000.0)
    assert throttle.locked("198.51.100.7", 2000.0 + 1)
    assert not throttle.locked("198.51.100.8", 2000.0 + 1)

