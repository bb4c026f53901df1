"""Who may relay (issue 3): accounts, rules, allowed senders, rewriting, HELO.

One relay process with one rich config serves every socket test in this
module; each client picks its own loopback address (127.0.0.x, and ::1 when
the machine has IPv6 loopback) so one config covers IP allowed, IP not
allowed, a disabled range and the relaxed-HELO range side by side.

The same table of cases (``CASES``) is run three ways, and all three must
give the same MAIL FROM reply:

* over SMTP against the running relay (smtplib, real STARTTLS and AUTH),
  with the spooled envelope checked for rewriting;
* in process through ``RelayPolicy.decide`` on a ``Directory`` built from
  the very same config file (``load_config``);
* through ``fastrelay explain`` (in process via ``cli.main``, and a few as a
  real subprocess).

Accounts in the config (every IP is a /32 unless said otherwise):

acme    acme.test, acme-mail.test
        office    my_domains        127.0.0.10 (127.0.0.11 disabled), ::1
        crm       registered_users  127.0.0.20/31
        scanners  any               127.0.0.30
        legacy    my_domains        127.0.0.60 (127.0.0.61 disabled), allow_unqualified_helo
globex  globex.test
        tls-office   my_domains        127.0.0.70 + TLS
        office-auth  any               127.0.0.80 + AUTH
        roaming      registered_users  AUTH + TLS (any IP)
initech initech.test, initech-apps.test
        apps      any               AUTH + TLS (any IP)
hooli   hooli.test                  no rule at all
127.0.0.99 is registered nowhere.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    ALICE_PASSWORD,
    HOSTNAME,
    ROOT,
    Certs,
    RawClient,
    RelayProcess,
    free_port,
    queue_id_of,
    spooled,
    start_tls,
)

from fastrelay import cli, replies
from fastrelay.config import load_config
from fastrelay.policy import (
    DECISION_MEMO_ENTRIES,
    Directory,
    RelayPolicy,
    SessionFacts,
    Step,
    normalize_address,
)

RCPT = "carol@example.net"
RCPT2 = "dave@example.net"
ELSEWHERE = "client.elsewhere.test"   # a qualified HELO that names no account
DOCS = "See docs/relay-errors.md in the fastrelay documentation."

# Replies, by their fixed beginnings (the rest is explanatory text).
OK = "250 2.1.0 Ok"
INVALID_CREDENTIALS = "550 5.7.1 Invalid credentials for relay [{ip}]. "
SENDING_DENIED = "550 5.7.0 Mail Sending denied. "
NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first."
AUTH_REQUIRED = "530 5.5.1 Authentication Required."
EHLO_REFUSED = "421 4.7.0 Try again later, closing connection. (EHLO)"


def relay_denied(domains: str) -> str:
    return ("550 5.7.0 Mail relay denied [{ip}]. Invalid credentials for relay for one of the "
            f"domains in: {domains} (as obtained from HELO and MAIL FROM). ")


ACCOUNTS = """
[[accounts]]
name = "acme"
domains = ["acme.test", "acme-mail.test"]
super_admins = ["admin@acme.test"]

[[accounts.users]]
address = "alice@acme.test"
passwords = ["{alice_hash}"]

[[accounts.users]]
address = "bob@acme.test"

[[accounts.users]]
address = "nolicence@acme.test"
passwords = ["{alice_hash}"]
mail_license = false

[[accounts.users]]
address = "suspended@acme.test"
passwords = ["{alice_hash}"]
suspended = true

[[accounts.rules]]
name = "office"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [
  { range = "127.0.0.10/32", description = "office" },
  { range = "127.0.0.11/32", description = "old office, switched off", enabled = false },
  { range = "::1/128", description = "IPv6 office" },
]

[[accounts.rules]]
name = "crm"
allowed_senders = "registered_users"
only_allowed_ips = true
ips = [ { range = "127.0.0.20/31", description = "crm servers" } ]

[[accounts.rules]]
name = "scanners"
allowed_senders = "any"
only_allowed_ips = true
ips = [ { range = "127.0.0.30/32", description = "scan-to-mail" } ]

[[accounts.rules]]
name = "legacy"
allowed_senders = "my_domains"
only_allowed_ips = true
allow_unqualified_helo = true
ips = [
  { range = "127.0.0.60/32", description = "old printer" },
  { range = "127.0.0.61/32", description = "retired printer", enabled = false },
]

[[accounts]]
name = "globex"
domains = ["globex.test"]

[[accounts.users]]
address = "gina@globex.test"
passwords = ["{alice_hash}"]

[[accounts.users]]
address = "gus@globex.test"

[[accounts.rules]]
name = "tls-office"
allowed_senders = "my_domains"
only_allowed_ips = true
require_tls = true
ips = [ { range = "127.0.0.70/32" } ]

[[accounts.rules]]
name = "office-auth"
allowed_senders = "any"
only_allowed_ips = true
require_auth = true
ips = [ { range = "127.0.0.80/32" } ]

[[accounts.rules]]
name = "roaming"
allowed_senders = "registered_users"
require_auth = true
require_tls = true

[[accounts]]
name = "initech"
domains = ["initech.test", "initech-apps.test"]

[[accounts.users]]
address = "ian@initech.test"
passwords = ["{alice_hash}"]

[[accounts.rules]]
name = "apps"
allowed_senders = "any"
require_auth = true
require_tls = true

[[accounts]]
name = "hooli"
domains = ["hooli.test"]
"""


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this machine")


@dataclass
class PolicyRelay:
    relay: RelayProcess
    port6: int | None          # the [::1] listener, if the machine has IPv6 loopback


def write_policy_config(directory: Path, certs: Certs, alice_hash: str,
                        port: int, tls_port: int, port6: int | None) -> Path:
    listen = [f"127.0.0.1:{port}"] + ([f"[::1]:{port6}"] if port6 else [])
    text = textwrap.dedent(f"""
        [server]
        hostname = "{HOSTNAME}"
        listen = {listen!r}
        listen_tls = ["127.0.0.1:{tls_port}"]
        tls_cert = "{certs.cert}"
        tls_key = "{certs.key}"
        spool_dir = "spool"
        """).replace("'", '"') + ACCOUNTS.replace("{alice_hash}", alice_hash) + textwrap.dedent("""
        [delivery]
        enabled = false   # accepted mail stays in the spool, where the tests read it

        [logging]
        level = "debug"
        """)
    path = directory / "relay.toml"
    path.write_text(text)
    return path


@dataclass
class PolicyConfig:
    path: Path
    port: int
    tls_port: int
    port6: int | None          # the [::1] listener, if the machine has IPv6 loopback


@pytest.fixture(scope="module")
def policy_config(tmp_path_factory: pytest.TempPathFactory, certs: Certs, alice_hash: str) -> PolicyConfig:
    directory = tmp_path_factory.mktemp("policy-relay")
    port, tls_port = free_port(), free_port()
    port6 = None
    if HAS_IPV6:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port6 = int(s.getsockname()[1])
    path = write_policy_config(directory, certs, alice_hash, port, tls_port, port6)
    return PolicyConfig(path, port, tls_port, port6)


@pytest.fixture(scope="module")
def policy_relay(policy_config: PolicyConfig, certs: Certs) -> Iterator[PolicyRelay]:
    pc = policy_config
    relay = RelayProcess(pc.path.parent, pc.port, pc.tls_port, certs, pc.path)
    relay.start()
    yield PolicyRelay(relay, pc.port6)
    if relay.proc is not None and relay.proc.poll() is None:
        relay.stop()


@pytest.fixture(scope="module")
def policy(policy_config: PolicyConfig) -> RelayPolicy:
    """The decision in process, built from the relay's own config file (no process needed)."""
    return RelayPolicy(Directory(load_config(policy_config.path)))


# --- the table of cases ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    ip: str
    helo: str
    sender: str
    expect: str                      # the reply's beginning; {ip} is the client IP
    tls: bool = False
    auth: str | None = None
    account: str | None = None       # the account the decision names (admitted or not)
    rule: str | None = None          # the admitting rule
    spool_sender: str | None = None  # after rewriting; None: the sender unchanged

    @property
    def admitted(self) -> bool:
        return self.expect == OK

    def reply(self) -> str:
        return self.expect.format(ip=self.ip)


CASES = [
    # my_domains: the account's domains and their subdomains, nothing else.
    Case("my_domains-own-domain", "127.0.0.10", ELSEWHERE, "bob@acme.test", OK, account="acme", rule="office"),
    Case("my_domains-second-domain", "127.0.0.10", ELSEWHERE, "x@acme-mail.test", OK, account="acme", rule="office"),
    Case("my_domains-subdomain", "127.0.0.10", ELSEWHERE, "x@mail.acme.test", OK, account="acme", rule="office"),
    Case("my_domains-deep-subdomain", "127.0.0.10", ELSEWHERE, "x@a.b.acme-mail.test", OK, account="acme", rule="office"),
    Case("my_domains-upper-case-domain", "127.0.0.10", ELSEWHERE, "Bob@ACME.Test", OK, account="acme", rule="office",
         spool_sender="Bob@acme.test"),
    Case("my_domains-lookalike-domain", "127.0.0.10", ELSEWHERE, "x@notacme.test", INVALID_CREDENTIALS),
    Case("my_domains-lookalike-domain-helo-names-account", "127.0.0.10", "pc.acme.test", "x@notacme.test",
         INVALID_CREDENTIALS, account="acme"),
    Case("my_domains-suffix-trick", "127.0.0.10", ELSEWHERE, "x@acme.test.evil.test", INVALID_CREDENTIALS),
    Case("my_domains-foreign-sender-helo-names-account", "127.0.0.10", "pc.acme.test", "x@gmail.test",
         INVALID_CREDENTIALS, account="acme"),
    Case("my_domains-null-sender-helo-names-account", "127.0.0.10", "pc.acme.test", "", OK, account="acme",
         rule="office"),
    Case("my_domains-null-sender-no-proof", "127.0.0.10", ELSEWHERE, "", INVALID_CREDENTIALS),
    Case("my_domains-unlicensed-user", "127.0.0.10", ELSEWHERE, "nolicence@acme.test", SENDING_DENIED, account="acme"),
    Case("my_domains-suspended-user", "127.0.0.10", ELSEWHERE, "suspended@acme.test", SENDING_DENIED, account="acme"),
    # The IP: a disabled range is no range; an unknown IP is relay denied.
    Case("ip-disabled-range", "127.0.0.11", ELSEWHERE, "bob@acme.test", relay_denied(f"{ELSEWHERE}, acme.test"),
         account="acme"),
    Case("ip-disabled-range-foreign-sender", "127.0.0.11", ELSEWHERE, "x@gmail.test",
         relay_denied(f"{ELSEWHERE}, gmail.test")),
    Case("ip-not-registered", "127.0.0.99", ELSEWHERE, "bob@acme.test", relay_denied(f"{ELSEWHERE}, acme.test"),
         account="acme"),
    Case("ip-not-registered-no-account", "127.0.0.99", ELSEWHERE, "x@gmail.test",
         relay_denied(f"{ELSEWHERE}, gmail.test")),
    Case("ip-not-registered-null-sender", "127.0.0.99", ELSEWHERE, "", relay_denied(ELSEWHERE)),
    Case("ip-other-accounts-range", "127.0.0.70", ELSEWHERE, "bob@acme.test", relay_denied(f"{ELSEWHERE}, acme.test"),
         account="acme"),
    # registered_users: a registered, licensed, not suspended user of the account.
    Case("registered-user", "127.0.0.20", ELSEWHERE, "bob@acme.test", OK, account="acme", rule="crm"),
    Case("registered-user-second-ip-of-range", "127.0.0.21", ELSEWHERE, "alice@acme.test", OK, account="acme",
         rule="crm"),
    Case("registered-user-case-insensitive", "127.0.0.20", ELSEWHERE, "BOB@acme.test", OK, account="acme",
         rule="crm"),
    Case("registered-not-a-user", "127.0.0.20", ELSEWHERE, "carol@acme.test", SENDING_DENIED, account="acme"),
    Case("registered-subdomain-not-a-user", "127.0.0.20", ELSEWHERE, "bob@mail.acme.test", SENDING_DENIED,
         account="acme"),
    Case("registered-unlicensed", "127.0.0.20", ELSEWHERE, "nolicence@acme.test", SENDING_DENIED, account="acme"),
    Case("registered-suspended", "127.0.0.20", ELSEWHERE, "suspended@acme.test", SENDING_DENIED, account="acme"),
    Case("registered-null-sender", "127.0.0.20", "crm.acme.test", "", SENDING_DENIED, account="acme"),
    Case("registered-foreign-sender-no-proof", "127.0.0.20", ELSEWHERE, "x@gmail.test", INVALID_CREDENTIALS),
    # any: foreign or empty senders become postmaster@<domain from AUTH, else HELO>.
    Case("any-own-domain-kept", "127.0.0.30", ELSEWHERE, "bob@acme.test", OK, account="acme", rule="scanners"),
    Case("any-foreign-rewritten-from-helo", "127.0.0.30", "scan.acme.test", "x@gmail.test", OK, account="acme",
         rule="scanners", spool_sender="postmaster@acme.test"),
    Case("any-foreign-rewritten-from-helo-subdomain", "127.0.0.30", "printer.floor2.acme-mail.test", "x@gmail.test",
         OK, account="acme", rule="scanners", spool_sender="postmaster@acme-mail.test"),
    Case("any-null-rewritten-from-helo", "127.0.0.30", "scan.acme.test", "", OK, account="acme", rule="scanners",
         spool_sender="postmaster@acme.test"),
    Case("any-foreign-no-proof", "127.0.0.30", ELSEWHERE, "x@gmail.test", INVALID_CREDENTIALS),
    Case("any-null-no-proof", "127.0.0.30", ELSEWHERE, "", INVALID_CREDENTIALS),
    Case("any-address-literal-helo-is-no-proof", "127.0.0.30", "[127.0.0.30]", "x@gmail.test", INVALID_CREDENTIALS),
    Case("any-suspended-user", "127.0.0.30", ELSEWHERE, "suspended@acme.test", SENDING_DENIED, account="acme"),
    # The sender's domain names the account before HELO does: another account's
    # sender from acme's scanner is judged by that account's rules.
    Case("any-sender-of-other-account", "127.0.0.30", "scan.acme.test", "gus@globex.test", NEED_STARTTLS,
         account="globex"),
    # TLS and AUTH conditions; OR across rules, AND inside one.
    Case("tls-required-in-tls", "127.0.0.70", ELSEWHERE, "gus@globex.test", OK, tls=True, account="globex",
         rule="tls-office"),
    Case("tls-required-not-in-tls", "127.0.0.70", ELSEWHERE, "gus@globex.test", NEED_STARTTLS, account="globex"),
    Case("tls-rule-foreign-sender", "127.0.0.70", "gw.globex.test", "x@gmail.test", INVALID_CREDENTIALS, tls=True,
         account="globex"),
    Case("ip-and-auth-rewritten-from-auth", "127.0.0.80", ELSEWHERE, "x@gmail.test", OK, tls=True,
         auth="gina@globex.test", account="globex", rule="office-auth", spool_sender="postmaster@globex.test"),
    Case("ip-and-auth-own-sender", "127.0.0.80", ELSEWHERE, "gus@globex.test", OK, tls=True,
         auth="gina@globex.test", account="globex", rule="office-auth"),
    Case("ip-and-auth-without-auth", "127.0.0.80", ELSEWHERE, "gus@globex.test", AUTH_REQUIRED, tls=True,
         account="globex"),
    Case("ip-and-auth-wrong-ip", "127.0.0.81", ELSEWHERE, "x@gmail.test", SENDING_DENIED, tls=True,
         auth="gina@globex.test", account="globex"),
    Case("roaming-user", "127.0.0.99", ELSEWHERE, "gina@globex.test", OK, tls=True, auth="gina@globex.test",
         account="globex", rule="roaming"),
    Case("roaming-not-in-tls", "127.0.0.99", ELSEWHERE, "gina@globex.test", NEED_STARTTLS, account="globex"),
    Case("roaming-without-auth", "127.0.0.99", ELSEWHERE, "gina@globex.test", AUTH_REQUIRED, tls=True,
         account="globex"),
    Case("roaming-sender-not-a-user", "127.0.0.99", ELSEWHERE, "nobody@globex.test", SENDING_DENIED, tls=True,
         auth="gina@globex.test", account="globex"),
    Case("roaming-sender-user-of-other-account", "127.0.0.99", ELSEWHERE, "alice@acme.test", SENDING_DENIED,
         tls=True, auth="gina@globex.test", account="globex"),
    # AUTH names the account before the sender and HELO do.
    Case("auth-rewrite-beats-helo", "127.0.0.99", "app.initech-apps.test", "x@gmail.test", OK, tls=True,
         auth="ian@initech.test", account="initech", rule="apps", spool_sender="postmaster@initech.test"),
    Case("auth-rewrite-null-sender", "127.0.0.99", ELSEWHERE, "", OK, tls=True, auth="ian@initech.test",
         account="initech", rule="apps", spool_sender="postmaster@initech.test"),
    Case("auth-account-beats-sender-account", "127.0.0.10", ELSEWHERE, "bob@acme.test", OK, tls=True,
         auth="ian@initech.test", account="initech", rule="apps", spool_sender="postmaster@initech.test"),
    Case("any-auth-rule-without-auth", "127.0.0.99", ELSEWHERE, "x@initech.test", AUTH_REQUIRED, tls=True,
         account="initech"),
    # An account without rules relays nothing.
    Case("account-without-rules", "127.0.0.99", ELSEWHERE, "x@hooli.test", relay_denied(f"{ELSEWHERE}, hooli.test"),
         account="hooli"),
    Case("account-without-rules-from-registered-ip", "127.0.0.10", ELSEWHERE, "x@hooli.test",
         relay_denied(f"{ELSEWHERE}, hooli.test"), account="hooli"),
    # The relaxed HELO range: the name identifies nothing but the IP admits.
    Case("legacy-unqualified-helo", "127.0.0.60", "printer", "bob@acme.test", OK, account="acme", rule="legacy"),
]

IPV6_CASES = [
    Case("ipv6-own-domain", "::1", ELSEWHERE, "bob@acme.test", OK, account="acme", rule="office"),
    Case("ipv6-foreign-sender", "::1", ELSEWHERE, "x@gmail.test", INVALID_CREDENTIALS),
]


def case_params(cases: list[Case]) -> list[object]:
    return [pytest.param(c, id=c.id) for c in cases]


# --- talking to the relay -----------------------------------------------------------

MESSAGE = (
    b"From: someone@example.com\r\n"
    b"To: carol@example.net\r\n"
    b"Subject: policy test\r\n"
    b"\r\n"
    b"hello\r\n"
)


@dataclass
class Outcome:
    mail: str                    # "code text" of the MAIL FROM reply
    rcpts: list[str]
    queue_id: str | None = None


def _text(code: int, msg: bytes) -> str:
    return f"{code} {msg.decode()}"


def transact(relay: RelayProcess, *, ip: str, helo: str, sender: str, rcpts: tuple[str, ...] = (RCPT,),
             tls: bool = False, auth: str | None = None, host: str = "127.0.0.1",
             port: int | None = None, implicit_tls: bool = False) -> Outcome:
    """One SMTP transaction with smtplib from source address ``ip``; DATA if a RCPT passed."""
    if implicit_tls:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, relay.tls_port, local_hostname=helo, source_address=(ip, 0),
                                              timeout=15, context=relay.certs.client_context())
    else:
        smtp = smtplib.SMTP(host, port or relay.port, local_hostname=helo, source_address=(ip, 0), timeout=15)
    with smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        if tls and not implicit_tls:
            code, _ = smtp.starttls(context=relay.certs.client_context())
            assert code == 220
            assert smtp.ehlo()[0] == 250
        if auth is not None:
            code, _ = smtp.login(auth, ALICE_PASSWORD)
            assert code == 235
        outcome = Outcome(_text(*smtp.mail(sender)), [])
        if not outcome.mail.startswith("250 "):
            return outcome
        for rcpt in rcpts:
            outcome.rcpts.append(_text(*smtp.rcpt(rcpt)))
        if any(r.startswith("250 ") for r in outcome.rcpts):
            code, msg = smtp.data(MESSAGE)
            assert code == 250, msg
            outcome.queue_id = queue_id_of(msg)
        else:
            smtp.rset()
    return outcome


def run_case(pr: PolicyRelay, case: Case) -> Outcome:
    host = "::1" if case.ip == "::1" else "127.0.0.1"
    port = pr.port6 if case.ip == "::1" else None
    return transact(pr.relay, ip=case.ip, helo=case.helo, sender=case.sender, tls=case.tls, auth=case.auth,
                    host=host, port=port)


def explain(config: Path, case: Case, capsys: pytest.CaptureFixture[str], *rcpts: str) -> tuple[int, str]:
    """``fastrelay explain`` in process (cli.main, the same code as the console script)."""
    argv = ["explain", "--config", str(config), "--ip", case.ip, "--helo", case.helo, "--from", case.sender]
    for rcpt in rcpts or (RCPT,):
        argv += ["--rcpt", rcpt]
    if case.auth:
        argv += ["--auth", case.auth]
    if case.tls:
        argv.append("--tls")
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().out


def explained_mail_reply(out: str, sender: str) -> str:
    prefix = f"MAIL FROM:<{normalize_address(sender) if sender else ''}>: "
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out
    return lines[0][len(prefix):]


def check_refusal_text(reply: str) -> None:
    """Every policy refusal but the two short 530s points to the docs."""
    if reply.startswith("550 "):
        assert reply.endswith(DOCS), reply


# --- over SMTP ------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES))
def test_relay_decision_over_smtp(policy_relay: PolicyRelay, case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    relay = policy_relay.relay
    outcome = run_case(policy_relay, case)
    assert outcome.mail.startswith(case.reply()), outcome.mail
    check_refusal_text(outcome.mail)
    # explain says exactly what the server said.
    rc, out = explain(relay.config_path, case, capsys)
    assert explained_mail_reply(out, case.sender) == outcome.mail
    assert rc == (0 if case.admitted else 1)
    if not case.admitted:
        assert outcome.queue_id is None
        return
    assert outcome.rcpts == ["250 2.1.5 Ok"]
    assert outcome.queue_id is not None
    envelope, _, content = spooled(relay, outcome.queue_id)
    expected_sender = case.spool_sender if case.spool_sender is not None else normalize_address(case.sender) \
        if case.sender else ""
    assert envelope.sender == expected_sender  # type: ignore[attr-defined]
    if case.spool_sender is not None and case.spool_sender != normalize_address(case.sender):
        assert envelope.original_sender == case.sender  # type: ignore[attr-defined]
        assert f"sender rewritten to <{case.spool_sender}>" in out
        relay.wait_log(f"rewrite: from=<{case.sender}> to=<{case.spool_sender}> client=[{case.ip}] "
                       f"account={case.account} rule={case.rule}")
    else:
        assert envelope.original_sender is None  # type: ignore[attr-defined]
    assert envelope.account == case.account  # type: ignore[attr-defined]
    assert envelope.rule == case.rule  # type: ignore[attr-defined]
    assert envelope.recipients == [RCPT]  # type: ignore[attr-defined]
    assert envelope.client_ip == case.ip  # type: ignore[attr-defined]
    assert envelope.auth_user == case.auth  # type: ignore[attr-defined]
    assert (envelope.tls is not None) == case.tls  # type: ignore[attr-defined]
    assert content == MESSAGE


@needs_ipv6
@pytest.mark.parametrize("case", case_params(IPV6_CASES))
def test_ipv6_client(policy_relay: PolicyRelay, policy: RelayPolicy, case: Case) -> None:
    outcome = run_case(policy_relay, case)
    assert outcome.mail.startswith(case.reply()), outcome.mail
    decision = policy.decide(SessionFacts(case.ip, case.helo, case.tls, case.auth), case.sender)
    assert decision.reply.decode().rstrip("\r\n") == outcome.mail
    if case.admitted:
        assert outcome.queue_id is not None
        envelope, _, _ = spooled(policy_relay.relay, outcome.queue_id)
        assert envelope.client_ip == "::1"  # type: ignore[attr-defined]
        assert envelope.rule == "office"  # type: ignore[attr-defined]


def test_implicit_tls_satisfies_require_tls(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.70", helo=ELSEWHERE, sender="gus@globex.test", implicit_tls=True)
    assert outcome.mail == OK
    assert outcome.queue_id is not None
    envelope, _, _ = spooled(relay, outcome.queue_id)
    assert envelope.rule == "tls-office"  # type: ignore[attr-defined]
    assert envelope.tls is not None  # type: ignore[attr-defined]


def test_implicit_tls_and_auth_rewrite(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.99", helo=ELSEWHERE, sender="news@gmail.test", auth="ian@initech.test",
                       implicit_tls=True)
    assert outcome.mail == OK
    assert outcome.queue_id is not None
    envelope, _, _ = spooled(relay, outcome.queue_id)
    assert (envelope.sender, envelope.original_sender) == ("postmaster@initech.test", "news@gmail.test")  # type: ignore[attr-defined]


# --- the null sender: one recipient ------------------------------------------------------


@pytest.mark.parametrize(("ip", "helo", "auth", "spool_sender"), [
    pytest.param("127.0.0.10", "pc.acme.test", None, "", id="my_domains-kept-empty"),
    pytest.param("127.0.0.30", "scan.acme.test", None, "postmaster@acme.test", id="any-rewritten-from-helo"),
    pytest.param("127.0.0.99", ELSEWHERE, "ian@initech.test", "postmaster@initech.test", id="any-rewritten-from-auth"),
])
def test_null_sender_has_one_recipient(policy_relay: PolicyRelay, ip: str, helo: str, auth: str | None,
                                       spool_sender: str) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip=ip, helo=helo, sender="", rcpts=(RCPT, RCPT2), tls=auth is not None, auth=auth)
    assert outcome.mail == OK
    assert outcome.rcpts == [
        "250 2.1.5 Ok",
        "550 5.5.3 A message with an empty envelope sender (MAIL FROM:<>) may have only one recipient",
    ]
    assert outcome.queue_id is not None
    envelope, _, _ = spooled(relay, outcome.queue_id)
    assert envelope.recipients == [RCPT]  # type: ignore[attr-defined]
    assert envelope.sender == spool_sender  # type: ignore[attr-defined]
    assert envelope.original_sender == ("" if spool_sender else None)  # type: ignore[attr-defined]
    relay.wait_log(f"550 5.5.3 A message with an empty envelope sender (MAIL FROM:<>) may have only one "
                   f"recipient from=<{spool_sender}> to=<{RCPT2}>")


def test_real_sender_may_have_several_recipients(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.30", helo="scan.acme.test", sender="x@gmail.test", rcpts=(RCPT, RCPT2))
    assert outcome.rcpts == ["250 2.1.5 Ok", "250 2.1.5 Ok"]
    assert outcome.queue_id is not None
    envelope, _, _ = spooled(relay, outcome.queue_id)
    assert envelope.recipients == [RCPT, RCPT2]  # type: ignore[attr-defined]
    assert envelope.sender == "postmaster@acme.test"  # type: ignore[attr-defined]


def test_explain_null_sender_second_recipient(policy_relay: PolicyRelay, capsys: pytest.CaptureFixture[str]) -> None:
    case = Case("x", "127.0.0.30", "scan.acme.test", "", OK)
    rc, out = explain(policy_relay.relay.config_path, case, capsys, RCPT, RCPT2)
    assert rc == 0
    assert f"RCPT TO:<{RCPT}>: 250 2.1.5 Ok" in out
    assert (f"RCPT TO:<{RCPT2}>: 550 5.5.3 A message with an empty envelope sender (MAIL FROM:<>) "
            "may have only one recipient") in out


# --- HELO / EHLO --------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "verb", "name"), [
    pytest.param("127.0.0.10", b"EHLO", "localhost", id="localhost"),
    pytest.param("127.0.0.10", b"EHLO", "LocalHost", id="localhost-upper-case"),
    pytest.param("127.0.0.10", b"EHLO", "localhost.localdomain", id="localhost.localdomain"),
    pytest.param("127.0.0.10", b"HELO", "localhost", id="helo-localhost"),
    pytest.param("127.0.0.10", b"EHLO", "printer", id="unqualified"),
    pytest.param("127.0.0.10", b"EHLO", HOSTNAME, id="own-hostname"),
    pytest.param("127.0.0.10", b"EHLO", HOSTNAME.upper() + ".", id="own-hostname-upper-dot"),
    pytest.param("127.0.0.61", b"EHLO", "printer", id="relaxing-range-disabled"),
    pytest.param("127.0.0.99", b"EHLO", "printer", id="unregistered-ip"),
])
def test_ehlo_refused_and_closed(policy_relay: PolicyRelay, policy: RelayPolicy, ip: str, verb: bytes,
                                 name: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = RawClient(policy_relay.relay.port, source=ip)
    try:
        assert client.cmd(verb + b" " + name.encode()) == EHLO_REFUSED.encode()
        assert client.closed()
    finally:
        client.close()
    assert policy.helo_refusal(name, ip) == replies.EHLO_REFUSED
    rc, out = explain(policy_relay.relay.config_path, Case("x", ip, name, "bob@acme.test", OK), capsys)
    assert rc == 1
    assert f"HELO: refused: {EHLO_REFUSED}" in out
    policy_relay.relay.wait_log(f"reject: EHLO from [{ip}]: {name}: not a qualified identity")


@pytest.mark.parametrize(("ip", "name"), [
    pytest.param("127.0.0.60", "printer", id="relaxed-unqualified"),
    pytest.param("127.0.0.60", "localhost", id="relaxed-localhost"),
    pytest.param("127.0.0.10", "pc.acme.test", id="qualified"),
    pytest.param("127.0.0.99", "mail.elsewhere.test", id="qualified-unknown-domain"),
    pytest.param("127.0.0.10", "[127.0.0.10]", id="address-literal"),
])
def test_ehlo_accepted(policy_relay: PolicyRelay, policy: RelayPolicy, ip: str, name: str) -> None:
    client = RawClient(policy_relay.relay.port, source=ip)
    try:
        reply = client.cmd(b"EHLO " + name.encode())
        assert reply.startswith(f"250-{HOSTNAME} at your service, [{ip}]\r\n".encode()), reply
        assert client.cmd(b"QUIT").startswith(b"221 2.0.0")
    finally:
        client.close()
    assert policy.helo_refusal(name, ip) is None


def test_ehlo_relaxed_helo_still_needs_a_sender_domain(policy_relay: PolicyRelay) -> None:
    """'localhost' is let through by the legacy range but names no account."""
    client = RawClient(policy_relay.relay.port, source="127.0.0.60")
    try:
        assert client.cmd(b"EHLO localhost").startswith(b"250-")
        reply = client.cmd(b"MAIL FROM:<x@gmail.test>")
        assert reply.startswith(INVALID_CREDENTIALS.format(ip="127.0.0.60").encode()), reply
        assert client.cmd(b"MAIL FROM:<bob@acme.test>") == b"250 2.1.0 Ok"
    finally:
        client.close()


@pytest.mark.parametrize("line", [b"EHLO", b"EHLO ", b"HELO"])
def test_empty_helo(policy_relay: PolicyRelay, line: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    client = RawClient(policy_relay.relay.port, source="127.0.0.10")
    try:
        assert client.cmd(line) == b"501 5.5.4 Empty HELO/EHLO argument not allowed, closing connection."
        assert client.closed()
    finally:
        client.close()
    rc, out = explain(policy_relay.relay.config_path, Case("x", "127.0.0.10", "", "bob@acme.test", OK), capsys)
    assert rc == 1
    assert "HELO: refused: 501 5.5.4 Empty HELO/EHLO argument not allowed" in out


def test_ehlo_after_starttls_is_checked_again(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    client = RawClient(relay.port, source="127.0.0.10")
    try:
        assert client.cmd(b"EHLO pc.acme.test").startswith(b"250-")
        assert client.cmd(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        start_tls(client, relay.certs.client_context(), server_hostname="127.0.0.1")
        assert client.cmd(b"EHLO localhost") == EHLO_REFUSED.encode()
        assert client.closed()
    finally:
        client.close()


# --- the decision log ------------------------------------------------------------------------


def test_refusal_is_logged_rule_by_rule(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.82", helo="ws.globex.test", sender="x@gmail.test", tls=True,
                       auth="gina@globex.test")
    assert outcome.mail.startswith(SENDING_DENIED)
    log = relay.wait_log("NOQUEUE: reject: MAIL from ws.globex.test[127.0.0.82]: 550; from=<x@gmail.test> "
                         "helo=<ws.globex.test> auth=gina@globex.test tls=yes")
    reasons = [line for line in log.splitlines() if "NOQUEUE: reason:" in line and "127.0.0.82 " in line]
    assert len(reasons) == 1, reasons
    reason = reasons[0]
    assert "account 'globex' (identified by auth): no rule admits; reply from rule 'roaming' (furthest: SENDER)" \
        in reason
    assert "rule 'tls-office': client IP 127.0.0.82 is not in an enabled range" in reason
    assert "rule 'office-auth': client IP 127.0.0.82 is not in an enabled range" in reason
    assert "rule 'roaming': sender x@gmail.test is not a registered user of account 'globex'" in reason


def test_no_account_refusal_is_logged(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.99", helo="box.nowhere.test", sender="x@nowhere.test")
    assert outcome.mail.startswith(relay_denied("box.nowhere.test, nowhere.test").format(ip="127.0.0.99"))
    relay.wait_log("NOQUEUE: reject: MAIL from box.nowhere.test[127.0.0.99]: 550; from=<x@nowhere.test> "
                   "helo=<box.nowhere.test> auth=- tls=no")
    relay.wait_log("NOQUEUE: reason: no account for the domains in HELO/MAIL FROM (box.nowhere.test, "
                   "nowhere.test) and the IP is not registered")


def test_acceptance_is_logged(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.21", helo="crm2.acme.test", sender="alice@acme.test", rcpts=(RCPT2,))
    assert outcome.queue_id is not None
    log = relay.wait_log("accept: MAIL from crm2.acme.test[127.0.0.21]: account 'acme' rule 'crm' admits "
                         "(identified by sender); from=<alice@acme.test> helo=<crm2.acme.test> auth=- tls=no")
    qid = outcome.queue_id
    assert f"{qid}: client=crm2.acme.test[127.0.0.21]" in log
    log = relay.wait_log(f"{qid}: from=<alice@acme.test>, size=")
    [line] = [line for line in log.splitlines() if f"{qid}: from=<alice@acme.test>, size=" in line]
    assert line.endswith(", nrcpt=1, account=acme, rule=crm (queue active)")


def test_rewrite_is_logged_with_old_and_new_sender(policy_relay: PolicyRelay) -> None:
    relay = policy_relay.relay
    outcome = transact(relay, ip="127.0.0.30", helo="mfp.acme-mail.test", sender="scanner@vendor.test")
    assert outcome.queue_id is not None
    log = relay.wait_log("rewrite: from=<scanner@vendor.test> to=<postmaster@acme-mail.test> client=[127.0.0.30] "
                         "account=acme rule=scanners")
    assert f"{outcome.queue_id}: client=mfp.acme-mail.test[127.0.0.30], orig_from=<scanner@vendor.test>" in log


# --- explain as a real command ------------------------------------------------------------------


def _explain_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastrelay", "explain", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def test_explain_command_admitted_rule_by_rule(policy_relay: PolicyRelay) -> None:
    result = _explain_process(policy_relay.relay.config_path, "--ip", "127.0.0.30", "--helo", "scan.acme.test",
                              "--from", "x@gmail.test", "--rcpt", RCPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "client 127.0.0.30, HELO scan.acme.test, TLS no, AUTH -",
        "account: acme (identified by helo)",
        "  rule 'office': fails at IP: rule 'office': client IP 127.0.0.30 is not in an enabled range",
        "  rule 'crm': fails at IP: rule 'crm': client IP 127.0.0.30 is not in an enabled range",
        "  rule 'scanners': ADMITS: rule 'scanners' admits",
        "  rule 'legacy': fails at IP: rule 'legacy': client IP 127.0.0.30 is not in an enabled range",
        "MAIL FROM:<x@gmail.test>: 250 2.1.0 Ok",
        "sender rewritten to <postmaster@acme.test>",
        f"RCPT TO:<{RCPT}>: 250 2.1.5 Ok (limits are checked by the running server)",
    ]


def test_explain_command_refused(policy_relay: PolicyRelay) -> None:
    result = _explain_process(policy_relay.relay.config_path, "--ip", "127.0.0.80", "--helo", ELSEWHERE,
                              "--from", "gus@globex.test", "--rcpt", RCPT, "--tls")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"client 127.0.0.80, HELO {ELSEWHERE}, TLS yes, AUTH -",
        "account: globex (identified by sender)",
        "  rule 'tls-office': fails at IP: rule 'tls-office': client IP 127.0.0.80 is not in an enabled range",
        "  rule 'office-auth': fails at AUTH: rule 'office-auth': SMTP AUTH required, session not authenticated",
        "  rule 'roaming': fails at AUTH: rule 'roaming': SMTP AUTH required, session not authenticated",
    ]
    assert lines[5] == f"MAIL FROM:<gus@globex.test>: {AUTH_REQUIRED}"
    assert lines[6].startswith("reason: account 'globex' (identified by sender): no rule admits; "
                               "reply from rule 'office-auth' (furthest: AUTH)")


@pytest.mark.parametrize(("auth", "tls", "refusal"), [
    ("alice@acme.test", False, "AUTH: refused: 530 5.7.0 Must issue a STARTTLS command first."),
    ("suspended@acme.test", True, "AUTH: refused: 535 5.7.8 Username and Password not accepted."),
    ("nolicence@acme.test", True, "AUTH: refused: 535 5.7.8 Username and Password not accepted."),
    ("nobody@acme.test", True, "AUTH: refused: 535 5.7.8 Username and Password not accepted."),
])
def test_explain_auth_the_server_would_refuse(policy_relay: PolicyRelay, auth: str, tls: bool, refusal: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    case = Case("x", "127.0.0.99", ELSEWHERE, "alice@acme.test", OK, tls=tls, auth=auth)
    rc, out = explain(policy_relay.relay.config_path, case, capsys)
    assert rc == 1
    assert out.splitlines()[-1] == refusal


def test_explain_auth_user_is_canonical(policy_relay: PolicyRelay, capsys: pytest.CaptureFixture[str]) -> None:
    case = Case("x", "127.0.0.99", ELSEWHERE, "x@gmail.test", OK, tls=True, auth="IAN@Initech.Test")
    rc, out = explain(policy_relay.relay.config_path, case, capsys)
    assert rc == 0
    assert "account: initech (identified by auth)" in out
    assert "sender rewritten to <postmaster@initech.test>" in out


def test_explain_command_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhostname = \"relay.example.test\"\nlisten = [\"127.0.0.1:1\"]\nbogus = 1\n")
    result = _explain_process(bad, "--ip", "127.0.0.1", "--helo", "a.test", "--from", "a@a.test")
    assert result.returncode == 2
    assert "server.bogus" in result.stderr and "unknown key" in result.stderr


# --- in process: RelayPolicy.decide ------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CASES + IPV6_CASES))
def test_decide_in_process(policy: RelayPolicy, case: Case) -> None:
    sender = normalize_address(case.sender) if case.sender else ""
    decision = policy.decide(SessionFacts(case.ip, case.helo, case.tls, case.auth), sender)
    reply = decision.reply.decode()
    assert reply.endswith("\r\n") and "\r\n" not in reply[:-2], "one line"
    assert reply.startswith(case.reply()), reply
    assert decision.allowed == case.admitted
    assert (decision.account.name if decision.account else None) == case.account
    assert (decision.rule.name if decision.rule else None) == case.rule
    if case.admitted:
        expected = case.spool_sender if case.spool_sender is not None else sender
        assert decision.sender == expected
        assert decision.original_sender == (sender if expected != sender else None)
        assert [v.step for v in decision.verdicts].count(Step.ADMITTED) >= 1
    else:
        assert decision.rule is None
        assert all(v.step != Step.ADMITTED for v in decision.verdicts)


def facts(ip: str = "127.0.0.99", helo: str = ELSEWHERE, tls: bool = False,
          auth: str | None = None) -> SessionFacts:
    return SessionFacts(ip, helo, tls, auth)


def test_decide_verdicts_follow_rule_order_and_steps(policy: RelayPolicy) -> None:
    d = policy.decide(facts("127.0.0.80", tls=True), "gus@globex.test")
    assert [(v.rule.name, v.step) for v in d.verdicts] == [
        ("tls-office", Step.IP), ("office-auth", Step.AUTH), ("roaming", Step.AUTH),
    ]
    assert d.identified_by == "sender"
    d = policy.decide(facts("127.0.0.70"), "gus@globex.test")
    assert [(v.rule.name, v.step) for v in d.verdicts] == [
        ("tls-office", Step.TLS), ("office-auth", Step.IP), ("roaming", Step.TLS),
    ]
    assert d.reply == replies.NEED_STARTTLS


def test_decide_or_first_admitting_rule_wins(policy: RelayPolicy) -> None:
    # Both office-auth and roaming would admit gina as herself from 127.0.0.80.
    d = policy.decide(facts("127.0.0.80", tls=True, auth="gina@globex.test"), "gina@globex.test")
    assert d.allowed and d.rule is not None and d.rule.name == "office-auth"
    assert [v.step for v in d.verdicts] == [Step.IP, Step.ADMITTED, Step.ADMITTED]


@pytest.mark.parametrize(("f", "sender", "reply_start"), [
    # Each condition of office-auth (IP AND AUTH, any sender) missing in turn.
    pytest.param(facts("127.0.0.80", tls=True, auth="gina@globex.test"), "x@gmail.test", OK, id="all-hold"),
    pytest.param(facts("127.0.0.81", tls=True, auth="gina@globex.test"), "x@gmail.test", SENDING_DENIED,
                 id="ip-missing"),
    pytest.param(facts("127.0.0.80", tls=True, helo="gw.globex.test"), "x@gmail.test", AUTH_REQUIRED,
                 id="auth-missing"),
    # tls-office: IP AND TLS AND my_domains.
    pytest.param(facts("127.0.0.70", tls=True), "gus@globex.test", OK, id="tls-office-all-hold"),
    pytest.param(facts("127.0.0.70"), "gus@globex.test", NEED_STARTTLS, id="tls-office-tls-missing"),
    pytest.param(facts("127.0.0.71", tls=True), "gus@globex.test", AUTH_REQUIRED, id="tls-office-ip-missing"),
    pytest.param(facts("127.0.0.70", tls=True, helo="gw.globex.test"), "x@gmail.test",
                 "550 5.7.1 Invalid credentials for relay [127.0.0.70]", id="tls-office-sender-wrong"),
])
def test_decide_and_inside_a_rule(policy: RelayPolicy, f: SessionFacts, sender: str, reply_start: str) -> None:
    assert policy.decide(f, sender).reply.decode().startswith(reply_start)


def test_a_remembered_decision_is_the_same_and_follows_runtime_suspensions(
        policy_config: PolicyConfig) -> None:
    """decide() remembers its answers, but not across the abuse desk's suspensions."""
    suspended: set[str] = set()
    policy = RelayPolicy(Directory(load_config(policy_config.path)), suspended)
    first = policy.decide(facts("127.0.0.10"), "bob@acme.test")
    assert first.allowed
    assert policy.decide(facts("127.0.0.10"), "bob@acme.test") is first
    # Another fact of the session is another decision.
    assert not policy.decide(facts("127.0.0.99"), "bob@acme.test").allowed
    # The overlay is the abuse desk's set, changed in place at run time.
    suspended.add("bob@acme.test")
    refused = policy.decide(facts("127.0.0.10"), "bob@acme.test")
    assert not refused.allowed and refused.reply.decode().startswith(SENDING_DENIED)
    suspended.clear()
    assert policy.decide(facts("127.0.0.10"), "bob@acme.test").allowed


def test_remembered_decisions_are_bounded(policy_config: PolicyConfig) -> None:
    policy = RelayPolicy(Directory(load_config(policy_config.path)))
    for i in range(DECISION_MEMO_ENTRIES + 10):
        assert policy.decide(facts("127.0.0.10"), f"user{i}@acme.test").allowed
    assert 0 < len(policy._memo) <= DECISION_MEMO_ENTRIES


def test_decide_registered_user_attribution(policy: RelayPolicy) -> None:
    """The admitted sender is tied to its user (per-user limits), a rewritten one to postmaster."""
    d = policy.decide(facts("127.0.0.20"), "bob@acme.test")
    assert d.user is not None and d.user.address == "bob@acme.test"
    d = policy.decide(facts("127.0.0.10"), "x@acme.test")
    assert d.allowed and d.user is None
    d = policy.decide(facts("127.0.0.30", helo="scan.acme.test"), "")
    assert d.sender == "postmaster@acme.test" and d.original_sender == "" and d.null_sender
    d = policy.decide(facts("127.0.0.10", helo="pc.acme.test"), "")
    assert d.sender == "" and d.original_sender is None and d.null_sender
    assert not policy.decide(facts("127.0.0.10"), "bob@acme.test").null_sender


def test_decide_auth_names_account_before_sender_and_helo(policy: RelayPolicy) -> None:
    d = policy.decide(facts("127.0.0.30", helo="scan.acme.test", tls=True, auth="ian@initech.test"),
                      "bob@acme.test")
    assert d.identified_by == "auth" and d.account is not None and d.account.name == "initech"
    assert d.sender == "postmaster@initech.test"
    d = policy.decide(facts("127.0.0.30", helo="scan.acme.test"), "gus@globex.test")
    assert d.identified_by == "sender" and d.account is not None and d.account.name == "globex"
    d = policy.decide(facts("127.0.0.30", helo="scan.acme.test"), "x@gmail.test")
    assert d.identified_by == "helo" and d.account is not None and d.account.name == "acme"


def test_decide_auth_of_unknown_domain_falls_back_to_sender(policy: RelayPolicy) -> None:
    # A user name whose domain is no account's (the server never lets such an
    # AUTH succeed, but the policy does not rely on it): the sender decides.
    d = policy.decide(facts("127.0.0.10", tls=True, auth="x@elsewhere.test"), "bob@acme.test")
    assert d.allowed and d.identified_by == "sender" and d.rule is not None and d.rule.name == "office"


def test_decide_auth_user_outside_the_account_does_not_satisfy_require_auth(policy: RelayPolicy) -> None:
    # AUTH names no account (its domain is nobody's), the sender names globex:
    # globex's AUTH rules want a globex user, so this AUTH does not count.
    d = policy.decide(facts(tls=True, auth="x@elsewhere.test"), "gina@globex.test")
    assert d.identified_by == "sender" and d.reply == replies.AUTH_REQUIRED
    assert d.verdicts[-1].reason == \
        "rule 'roaming': authenticated as x@elsewhere.test, not a user of account 'globex'"


def test_decide_auth_of_another_account_does_not_satisfy_require_auth(policy: RelayPolicy) -> None:
    # gina (globex) authenticated; sender names initech, whose rule needs AUTH as an initech user.
    d = policy.decide(facts(tls=True, auth="gina@globex.test"), "x@initech.test")
    # AUTH names globex first, so globex's rules judge, and x@initech.test is no globex user.
    assert d.account is not None and d.account.name == "globex"
    assert d.reply.decode().startswith(SENDING_DENIED)


def test_decide_rewrite_domain_prefers_auth_over_helo(policy: RelayPolicy) -> None:
    d = policy.decide(facts(helo="app.initech-apps.test", tls=True, auth="ian@initech.test"), "x@gmail.test")
    assert d.sender == "postmaster@initech.test"
    # Without AUTH the same HELO gives the other domain, but the rule needs AUTH.
    d = policy.decide(facts(helo="app.initech-apps.test", tls=True), "x@gmail.test")
    assert d.reply == replies.AUTH_REQUIRED


@pytest.mark.parametrize(("name", "ip", "refused"), [
    ("localhost", "127.0.0.10", True),
    ("localhost.", "127.0.0.10", True),
    ("LOCALHOST.LOCALDOMAIN", "127.0.0.10", True),
    ("printer", "127.0.0.10", True),
    ("relay.example.test", "127.0.0.10", True),
    ("Relay.Example.Test.", "127.0.0.10", True),
    ("printer", "127.0.0.60", False),
    ("localhost", "127.0.0.60", False),
    (HOSTNAME, "127.0.0.60", False),
    ("printer", "127.0.0.61", True),
    ("printer", "::1", True),
    ("pc.acme.test", "127.0.0.99", False),
    ("sub.relay.example.test", "127.0.0.99", False),
    ("[127.0.0.1]", "127.0.0.99", False),
    ("[IPv6:::1]", "127.0.0.99", False),
])
def test_helo_refusal_in_process(policy: RelayPolicy, name: str, ip: str, refused: bool) -> None:
    assert policy.helo_refusal(name, ip) == (replies.EHLO_REFUSED if refused else None)


def test_relay_denied_lists_helo_and_sender_domains_once(policy: RelayPolicy) -> None:
    d = policy.decide(facts("127.0.0.99", helo="Mail.Nowhere.Test"), "x@mail.nowhere.test")
    assert d.reply.decode().startswith(
        "550 5.7.0 Mail relay denied [127.0.0.99]. Invalid credentials for relay for one of the domains in: "
        "mail.nowhere.test (as obtained from HELO and MAIL FROM).")
    d = policy.decide(facts("127.0.0.99", helo="[127.0.0.99]"), "")
    assert "domains in: (none) (as obtained" in d.reply.decode()


def test_directory_lookups(policy: RelayPolicy) -> None:
    directory = policy.directory
    acme = directory.account_for_domain("acme.test")
    assert acme is not None and acme.name == "acme"
    assert directory.account_for_domain("Deep.Sub.ACME-mail.test.") is acme
    assert directory.account_for_domain("notacme.test") is None
    assert directory.account_for_domain("acme.test.evil.test") is None
    assert acme.owns("x.acme-mail.test") == "acme-mail.test"
    assert acme.owns("acme-mail.test.") == "acme-mail.test"
    assert acme.owns("globex.test") is None
    assert acme.owns("notacme.test") is None
    assert acme.owns("acme.test.evil.test") is None
    found = directory.user("ALICE@Acme.Test")
    assert found is not None and found[0] is acme and found[1].address == "alice@acme.test"
    rules = directory.rules
    assert [rules[i].name for i in directory.rules_for_ip("127.0.0.10")] == ["office"]
    assert directory.rules_for_ip("127.0.0.11") == ()
    assert [rules[i].name for i in directory.rules_for_ip("127.0.0.21")] == ["crm"]
    assert directory.rules_for_ip("127.0.0.22") == ()
    assert [rules[i].name for i in directory.rules_for_ip("::1")] == ["office"]
    assert directory.user_count() == 7


def test_reply_texts_point_to_the_docs() -> None:
    doc = (ROOT / "docs" / "relay-errors.md").read_text()
    for reply in (replies.EHLO_REFUSED, replies.NEED_STARTTLS, replies.AUTH_REQUIRED, replies.AUTH_FAILED,
                  replies.AUTH_LOCKED_OUT, replies.NULL_SENDER_ONE_RCPT, replies.UNKNOWN_MECHANISM,
                  replies.ALREADY_AUTH, replies.AUTH_IDENTITY_MISMATCH, replies.EMPTY_HELO):
        code_and_text = reply.decode().rstrip("\r\n")
        assert code_and_text[:9] in doc, code_and_text
        assert code_and_text[10:] in doc, code_and_text
    for start in ("Mail relay denied", "Invalid credentials for relay", "Mail Sending denied"):
        assert start in doc


FULL_REFUSALS = [
    # (client IP, HELO, sender, the whole reply with <ip> and <domains> as the docs write them)
    ("127.0.0.99", "box.nowhere.test", "x@nowhere.test", "box.nowhere.test, nowhere.test",
     ("550 5.7.0 Mail relay denied [<ip>]. Invalid credentials for relay for one of the domains in: <domains> "
     "(as obtained from HELO and MAIL FROM). Email is being sent from a domain or IP address which isn't "
     "registered with this relay. See docs/relay-errors.md in the fastrelay documentation.")),
    ("127.0.0.10", ELSEWHERE, "x@gmail.test", "",
     ("550 5.7.1 Invalid credentials for relay [<ip>]. The IP address you've registered in the relay settings "
     "is not matched by the sending domain, or the envelope sender is empty. Use SMTP AUTH or present one of "
     "your domain names in HELO/EHLO. See docs/relay-errors.md in the fastrelay documentation.")),
    ("127.0.0.20", ELSEWHERE, "carol@acme.test", "",
     ("550 5.7.0 Mail Sending denied. The sender is not a registered, licensed and active user of your domains. "
     "See docs/relay-errors.md in the fastrelay documentation.")),
]


@pytest.mark.parametrize(("ip", "helo", "sender", "domains", "text"), FULL_REFUSALS)
def test_refusal_texts_in_full_and_in_the_docs(policy_relay: PolicyRelay, ip: str, helo: str, sender: str,
                                              domains: str, text: str) -> None:
    outcome = transact(policy_relay.relay, ip=ip, helo=helo, sender=sender)
    assert outcome.mail == text.replace("<ip>", ip).replace("<domains>", domains)
    doc = " ".join((ROOT / "docs" / "relay-errors.md").read_text().split())
    assert text in doc
