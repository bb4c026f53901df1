"""Who may relay: accounts, registered users, relay rules and the relay decision.

The decision follows the relay model (shared/reference/relay-model.md §2):

1. HELO/EHLO sanity: ``localhost``, an unqualified name or our own host name
   is not an identity (421 4.7.0 ... (EHLO)), unless a rule that admits the
   client's IP relaxes it.
2. The account is identified from the SMTP AUTH user's domain, else the
   envelope sender's domain, else the HELO domain (subdomains included).
3. With no account: 550 5.7.1 "Invalid credentials for relay" when the IP is
   registered with some account, else 550 5.7.0 "Mail relay denied".
4. The account's rules combine with OR; inside a rule every ticked condition
   must hold (AND): IP in an enabled range, TLS, AUTH, allowed senders.
5. "Any address" rules rewrite a foreign or empty envelope sender to
   postmaster@<domain known from AUTH or HELO>.

When no rule admits, the reply is that of the rule that got furthest through
its checks (IP, TLS, AUTH, sender), so the client is told the most useful
thing: "Must issue a STARTTLS command first" beats "Mail relay denied" when
the IP was right.

The same ``RelayPolicy.decide`` serves the SMTP server and ``fastrelay
explain``, so what explain prints is what the server does.

Config keys read: [[accounts]] (name, domains, status, super_admins,
users_file, users, rules), server.hostname.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import argon2

from . import replies
from ._core import CidrSet
from .config import AccountConfig, Config, RuleConfig, is_hostname

log = logging.getLogger("fastrelay.policy")

_hasher = argon2.PasswordHasher()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def normalize_address(address: str) -> str:
    """Local part kept as is (it may be case-sensitive), domain lower-cased."""
    local, sep, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if sep else address


def hash_password(password: str) -> str:
    """An argon2id hash for the config (``fastrelay hash-password``)."""
    return _hasher.hash(password)


@dataclass(frozen=True, slots=True)
class User:
    address: str                 # normalised
    password_hashes: tuple[str, ...]
    mail_license: bool
    suspended: bool

    @property
    def may_send(self) -> bool:
        return self.mail_license and not self.suspended


class SenderMode(enum.StrEnum):
    REGISTERED_USERS = "registered_users"
    MY_DOMAINS = "my_domains"
    ANY = "any"


@dataclass(slots=True)
class Rule:
    index: int                   # global index: the CidrSet payload
    name: str
    account: Account
    allowed_senders: SenderMode
    only_allowed_ips: bool
    require_auth: bool
    require_tls: bool
    allow_unqualified_helo: bool


@dataclass(slots=True)
class Account:
    name: str
    domains: tuple[str, ...]     # lower-case; the first is the primary domain
    status: str
    super_admins: tuple[str, ...]
    users: dict[str, User] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)

    @property
    def primary_domain(self) -> str:
        return self.domains[0]

    def owns(self, domain: str) -> str | None:
        """The account domain that ``domain`` is, or is a subdomain of."""
        domain = domain.lower().rstrip(".")
        for d in self.domains:
            if domain == d or domain.endswith("." + d):
                return d
        return None


class Step(enum.IntEnum):
    """The checks of one rule, in the order they run (a later one is 'further')."""

    IP = 1
    TLS = 2
    AUTH = 3
    SENDER = 4
    ADMITTED = 5


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What the relay knows about the client when MAIL FROM arrives."""

    client_ip: str
    helo: str
    tls: bool
    auth_user: str | None


@dataclass(slots=True)
class RuleVerdict:
    rule: Rule
    step: Step                   # the step that failed, or ADMITTED
    reason: str
    not_a_user: bool = False     # SENDER failed because of who the user is: "Mail Sending denied"


@dataclass(slots=True)
class RelayDecision:
    """The outcome of MAIL FROM, with what is needed to explain it.

    Read-only by convention: RelayPolicy.decide hands the same object to
    every MAIL with the same facts and sender."""

    allowed: bool
    reply: bytes                 # the SMTP reply to send
    reason: str                  # one line for the log
    account: Account | None = None
    rule: Rule | None = None
    sender: str = ""             # envelope sender after any rewriting
    original_sender: str | None = None  # set when rewritten
    user: User | None = None     # the registered user the sender is (per-user limits)
    identified_by: str = ""      # "auth", "sender" or "helo"
    verdicts: list[RuleVerdict] = field(default_factory=list)

    @property
    def null_sender(self) -> bool:
        """MAIL FROM:<> (even when rewritten): such a message may have one recipient only."""
        return self.original_sender == "" or (not self.sender and self.original_sender is None)


class Directory:
    """Accounts, users and rules as loaded from the config; immutable once built."""

    def __init__(self, config: Config) -> None:
        self.hostname = config.server.hostname.lower()
        self.accounts: list[Account] = []
        self.rules: list[Rule] = []
        self.cidr = CidrSet()
        self._domains: dict[str, Account] = {}
        self._users: dict[str, tuple[Account, User]] = {}
        self._auth_cache: dict[tuple[str, bytes], tuple[float, User]] = {}
        for ac in config.accounts:
            self._add_account(ac)
        self.cidr.build()

    def _add_account(self, ac: AccountConfig) -> None:
        account = Account(
            name=ac.name,
            domains=tuple(d.lower() for d in ac.domains),
            status=ac.status,
            super_admins=tuple(ac.super_admins),
        )
        for u in ac.users:
            user = User(normalize_address(u.address), tuple(u.passwords), u.mail_license, u.suspended)
            account.users[user.address.lower()] = user
            self._users[user.address.lower()] = (account, user)
        for rc in ac.rules:
            rule = self._make_rule(rc, account)
            account.rules.append(rule)
        for d in account.domains:
            self._domains[d] = account
        self.accounts.append(account)

    def _make_rule(self, rc: RuleConfig, account: Account) -> Rule:
        rule = Rule(
            index=len(self.rules),
            name=rc.name,
            account=account,
            allowed_senders=SenderMode(rc.allowed_senders),
            only_allowed_ips=rc.only_allowed_ips,
            require_auth=rc.require_auth,
            require_tls=rc.require_tls,
            allow_unqualified_helo=rc.allow_unqualified_helo,
        )
        self.rules.append(rule)
        if rc.only_allowed_ips:
            for r in rc.ips:
                self.cidr.add(r.range, rule.index, r.enabled)
        return rule

    def account_for_domain(self, domain: str) -> Account | None:
        """The account owning ``domain`` or a parent of it (subdomains belong too)."""
        d = domain.lower().rstrip(".")
        while d:
            account = self._domains.get(d)
            if account is not None:
                return account
            _, _, d = d.partition(".")
        return None

    def user(self, address: str) -> tuple[Account, User] | None:
        return self._users.get(address.lower())

    def rules_for_ip(self, ip: str) -> tuple[int, ...]:
        return self.cidr.lookup(ip)

    def verify_password(self, username: str, password: str) -> User | None:
        """Blocking (argon2): call from a worker thread, never on the event loop."""
        found = self.user(normalize_address(username))
        if found is None:
            # Spend the same time as a real check so timing does not reveal users.
            try:
                _hasher.verify(_DUMMY_HASH, password)
            except argon2.exceptions.VerificationError:
                pass
            return None
        _, user = found
        ok = False
        # A user without passwords (IP-only devices) costs the same as an unknown one.
        for h in user.password_hashes or (_DUMMY_HASH,):
            try:
                ok = _hasher.verify(h, password) and h is not _DUMMY_HASH
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                continue
            if ok:
                break
        if ok and not user.may_send:
            # The same 535 as a wrong password for the client; the admin sees why.
            log.info("auth: %s gave a valid password but %s", user.address,
                     "is suspended" if user.suspended else "has no mail licence")
            return None
        return user if ok else None

    def recently_verified(self, username: str, password: str) -> User | None:
        """A user whose same password passed argon2 within AUTH_CACHE_SECONDS; cheap, loop-safe.

        Devices that open a connection per message (printers, scanners,
        monitoring) would otherwise pay a full argon2 verification on every
        AUTH — about a quarter of a second of CPU with the default cost.  The
        cache holds only an HMAC of the password under a per-process random
        key, lives in memory, and is dropped with the Directory on reload.
        """
        key = self._cache_key(username, password)
        entry = self._auth_cache.get(key)
        if entry is None:
            return None
        expires, user = entry
        if time.monotonic() >= expires or not user.may_send:
            self._auth_cache.pop(key, None)
            return None
        return user

    def remember_verified(self, username: str, password: str, user: User) -> None:
        if len(self._auth_cache) >= AUTH_CACHE_ENTRIES:
            self._auth_cache.clear()
        self._auth_cache[self._cache_key(username, password)] = (time.monotonic() + AUTH_CACHE_SECONDS, user)

    @staticmethod
    def _cache_key(username: str, password: str) -> tuple[str, bytes]:
        digest = hmac.new(_AUTH_CACHE_KEY, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        return normalize_address(username).lower(), digest

    def user_count(self) -> int:
        return len(self._users)


_DUMMY_HASH = _hasher.hash("fastrelay-timing-equaliser")
_AUTH_CACHE_KEY = secrets.token_bytes(32)
AUTH_CACHE_SECONDS = 300.0
AUTH_CACHE_ENTRIES = 100_000
# Relay decisions remembered per policy (see RelayPolicy.decide); cleared whole when full.
DECISION_MEMO_ENTRIES = 4096


class PasswordVerifier:
    """SMTP AUTH password checks off the event loop, at most one argon2 run per core.

    Twenty devices that each open a connection per message and log in with
    the same account all miss the cache at once after it expires (or after a
    reload): their checks of the same credentials share one argon2 run
    instead of twenty, and different credentials queue for a core rather
    than all run at once and starve the event loop's core.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                        thread_name_prefix="argon2")
        self._running: dict[tuple[int, str, bytes], asyncio.Future[User | None]] = {}
        self.argon2_runs = 0   # for tests and metrics: verifications actually computed

    async def verify(self, directory: Directory, username: str, password: str) -> User | None:
        user = directory.recently_verified(username, password)
        if user is not None:
            return user
        key = (id(directory), *Directory._cache_key(username, password))
        running = self._running.get(key)
        if running is None:
            self.argon2_runs += 1
            running = asyncio.get_running_loop().run_in_executor(
                self._pool, directory.verify_password, username, password)
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
            user = await asyncio.shield(running)
            if user is not None:
                directory.remember_verified(username, password, user)
            return user
        return await asyncio.shield(running)


class RelayPolicy:
    """The relay decision.  Pure and synchronous: no I/O, so it is cheap per MAIL."""

    def __init__(self, directory: Directory, suspended: Container[str] = frozenset()) -> None:
        self.directory = directory
        # Runtime suspensions (abuse.py: users still sending spam after an alert),
        # an overlay on the immutable Directory; lower-case addresses.
        self.suspended = suspended
        # The decision is a pure function of the directory (immutable: a reload
        # builds a new policy), the session facts and the sender, and a relay
        # sees the same few clients and senders all day: remember it.
        self._memo: dict[tuple[str, str, bool, str | None, str], RelayDecision] = {}

    # -- HELO ------------------------------------------------------------------

    def helo_refusal(self, name: str, client_ip: str) -> bytes | None:
        """None if the HELO name is acceptable, else the reply (the session then closes)."""
        if name.startswith("[") and name.endswith("]"):
            return None  # an address literal (RFC 5321 §4.1.4) is honest, if useless for identity
        lowered = name.lower().rstrip(".")
        generic = (
            lowered in ("localhost", "localhost.localdomain")
            or "." not in lowered
            or lowered == self.directory.hostname
        )
        if not generic:
            return None
        for index in self.directory.rules_for_ip(client_ip):
            if self.directory.rules[index].allow_unqualified_helo:
                return None
        return replies.EHLO_REFUSED

    # -- MAIL FROM ---------------------------------------------------------------

    def decide(self, facts: SessionFacts, sender: str) -> RelayDecision:
        if self.suspended:
            # The abuse desk's overlay changes at run time; while it names
            # anyone, every MAIL is decided afresh.
            return self._decide(facts, sender)
        key = (facts.client_ip, facts.helo, facts.tls, facts.auth_user, sender)
        decision = self._memo.get(key)
        if decision is None:
            if len(self._memo) >= DECISION_MEMO_ENTRIES:
                self._memo.clear()
            decision = self._memo[key] = self._decide(facts, sender)
        return decision

    def _decide(self, facts: SessionFacts, sender: str) -> RelayDecision:
        directory = self.directory
        account, identified_by = self._identify(facts, sender)
        ip_rules = directory.rules_for_ip(facts.client_ip)
        if account is None:
            domains = _domains_seen(facts, sender)
            if ip_rules:
                return RelayDecision(
                    False, _invalid_credentials(facts.client_ip),
                    f"client IP is registered with account {directory.rules[ip_rules[0]].account.name!r} "
                    f"but none of its domains is in AUTH, MAIL FROM or HELO ({', '.join(domains) or 'none'})",
                )
            return RelayDecision(
                False, _relay_denied(facts.client_ip, domains),
                f"no account for the domains in HELO/MAIL FROM ({', '.join(domains) or 'none'}) "
                f"and the IP is not registered",
            )

        verdicts = [self._check_rule(rule, facts, sender, ip_rules) for rule in account.rules]
        for verdict in verdicts:
            if verdict.step == Step.ADMITTED:
                return self._admitted(verdict.rule, facts, sender, identified_by, verdicts)
        if not verdicts:
            return RelayDecision(
                False, _relay_denied(facts.client_ip, _domains_seen(facts, sender)),
                f"account {account.name!r} has no relay rule", account=account, verdicts=verdicts,
                identified_by=identified_by,
            )
        best = max(verdicts, key=lambda v: v.step)  # max() keeps the first of equals
        # One log line saying why every rule refused, and which one chose the reply.
        reason = (
            f"account {account.name!r} (identified by {identified_by}): no rule admits; "
            f"reply from rule {best.rule.name!r} (furthest: {best.step.name}); "
            + "; ".join(v.reason for v in verdicts)
        )
        return RelayDecision(
            False, self._refusal_reply(best, facts, sender), reason,
            account=account, identified_by=identified_by, verdicts=verdicts,
        )

    def _identify(self, facts: SessionFacts, sender: str) -> tuple[Account | None, str]:
        d = self.directory
        if facts.auth_user:
            account = d.account_for_domain(domain_of(facts.auth_user))
            if account is not None:
                return account, "auth"
        if sender:
            account = d.account_for_domain(domain_of(sender))
            if account is not None:
                return account, "sender"
        if facts.helo and not facts.helo.startswith("["):
            account = d.account_for_domain(facts.helo)
            if account is not None:
                return account, "helo"
        return None, ""

    def _check_rule(self, rule: Rule, facts: SessionFacts, sender: str, ip_rules: tuple[int, ...]) -> RuleVerdict:
        if rule.only_allowed_ips and rule.index not in ip_rules:
            return RuleVerdict(rule, Step.IP, f"rule {rule.name!r}: client IP {facts.client_ip} is not in an enabled range")
        if rule.require_tls and not facts.tls:
            return RuleVerdict(rule, Step.TLS, f"rule {rule.name!r}: TLS required, session not in TLS")
        if rule.require_auth:
            if not facts.auth_user:
                return RuleVerdict(rule, Step.AUTH, f"rule {rule.name!r}: SMTP AUTH required, session not authenticated")
            if rule.account.owns(domain_of(facts.auth_user)) is None:
                return RuleVerdict(rule, Step.AUTH, f"rule {rule.name!r}: authenticated as {facts.auth_user}, not a user of account {rule.account.name!r}")
        problem, not_a_user = self._sender_problem(rule, facts, sender)
        if problem:
            return RuleVerdict(rule, Step.SENDER, f"rule {rule.name!r}: {problem}", not_a_user)
        return RuleVerdict(rule, Step.ADMITTED, f"rule {rule.name!r} admits")

    def _sender_problem(self, rule: Rule, facts: SessionFacts, sender: str) -> tuple[str, bool]:
        """(why the sender is not allowed, whether it is about user status); ("", False) if allowed."""
        account = rule.account
        registered = self.directory.user(sender) if sender else None
        if registered is not None and not registered[1].may_send:
            state = "is suspended" if registered[1].suspended else "has no mail licence"
            return f"sender {sender} is a registered user who {state}", True
        if self.suspended:
            for who, address in (("sender", sender), ("authenticated user", facts.auth_user)):
                if address and address.lower() in self.suspended:
                    return (f"{who} {address} is suspended for sending spam "
                            f"(`fastrelay user unsuspend` restores it)"), True
        mode = rule.allowed_senders
        if mode == SenderMode.REGISTERED_USERS:
            if not sender:
                return "the empty sender is not a registered user", True
            if registered is None or registered[0] is not account:
                return f"sender {sender} is not a registered user of account {account.name!r}", True
            return "", False
        if mode == SenderMode.MY_DOMAINS:
            if not sender:
                if self._proof_domain(account, facts) is None:
                    return "empty sender and neither AUTH nor HELO names one of the account's domains", False
                return "", False
            if account.owns(domain_of(sender)) is None:
                return f"sender domain {domain_of(sender)} is not one of {', '.join(account.domains)}", False
            return "", False
        # ANY: a foreign or empty sender needs a domain to rewrite to.
        if (not sender or account.owns(domain_of(sender)) is None) and self._proof_domain(account, facts) is None:
            return "sender outside the account's domains and neither AUTH nor HELO names one of them", False
        return "", False

    @staticmethod
    def _proof_domain(account: Account, facts: SessionFacts) -> str | None:
        """The account domain named by SMTP AUTH or, failing that, by HELO/EHLO."""
        if facts.auth_user:
            d = account.owns(domain_of(facts.auth_user))
            if d is not None:
                return d
        if facts.helo and not facts.helo.startswith("["):
            return account.owns(facts.helo)
        return None

    def _admitted(self, rule: Rule, facts: SessionFacts, sender: str, identified_by: str,
                  verdicts: list[RuleVerdict]) -> RelayDecision:
        account = rule.account
        effective, original = sender, None
        if rule.allowed_senders == SenderMode.ANY and (not sender or account.owns(domain_of(sender)) is None):
            proof = self._proof_domain(account, facts)
            assert proof is not None  # _sender_problem checked it
            effective, original = f"postmaster@{proof}", sender
        registered = self.directory.user(effective) if effective else None
        user = registered[1] if registered is not None and registered[0] is account else None
        reason = f"account {account.name!r} rule {rule.name!r} admits"
        if original is not None:
            reason += f"; sender rewritten from <{original}> to <{effective}>"
        return RelayDecision(
            True, replies.SENDER_OK, reason, account=account, rule=rule, sender=effective,
            original_sender=original, user=user, identified_by=identified_by, verdicts=verdicts,
        )

    def _refusal_reply(self, verdict: RuleVerdict, facts: SessionFacts, sender: str) -> bytes:
        step = verdict.step
        if step == Step.IP:
            return _relay_denied(facts.client_ip, _domains_seen(facts, sender))
        if step == Step.TLS:
            return replies.NEED_STARTTLS
        if step == Step.AUTH:
            return replies.AUTH_REQUIRED
        if verdict.not_a_user:
            return _sending_denied()
        return _invalid_credentials(facts.client_ip)


_DOCS = "See docs/relay-errors.md in the fastrelay documentation."


def _domains_seen(facts: SessionFacts, sender: str) -> list[str]:
    out = []
    if facts.helo and not facts.helo.startswith("["):
        out.append(facts.helo.lower())
    if sender:
        d = domain_of(sender)
        if d not in out:
            out.append(d)
    return out


def _relay_denied(ip: str, domains: list[str]) -> bytes:
    return replies.reply(
        550, "5.7.0",
        f"Mail relay denied [{ip}]. Invalid credentials for relay for one of the domains in: "
        f"{', '.join(domains) or '(none)'} (as obtained from HELO and MAIL FROM). Email is being sent "
        f"from a domain or IP address which isn't registered with this relay. {_DOCS}",
    )


def _invalid_credentials(ip: str) -> bytes:
    return replies.reply(
        550, "5.7.1",
        f"Invalid credentials for relay [{ip}]. The IP address you've registered in the relay "
        f"settings is not matched by the sending domain, or the envelope sender is empty. Use SMTP "
        f"AUTH or present one of your domain names in HELO/EHLO. {_DOCS}",
    )


def _sending_denied() -> bytes:
    return replies.reply(
        550, "5.7.0",
        f"Mail Sending denied. The sender is not a registered, licensed and active user of your "
        f"domains. {_DOCS}",
    )


def is_valid_helo(name: str) -> bool:
    """Syntax only: a host name or an address literal (RFC 5321 §4.1.3)."""
    if name.startswith("[") and name.endswith("]"):
        return is_address_literal(name[1:-1])
    return is_hostname(name.rstrip("."))


def is_address_literal(inner: str) -> bool:
    """What may stand between the brackets: an IPv4 address, "IPv6:" and an IPv6 address,
    or a General-address-literal (a tag, ":", printable ASCII other than [ \\ ])."""
    tag, colon, content = inner.partition(":")
    if colon and tag.upper() == "IPV6":
        try:
            return ipaddress.ip_address(content).version == 6
        except ValueError:
            return False
    if colon:
        return (is_hostname(tag) and "." not in tag and bool(content)
                and all(33 <= ord(c) <= 126 and c not in "[\\]" for c in content))
    try:
        return ipaddress.ip_address(inner).version == 4
    except ValueError:
        return False
