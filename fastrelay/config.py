"""Configuration: one TOML file decoded by msgspec into frozen, typed structs.

Every section is a Struct with ``forbid_unknown_fields=True``: a misspelled key
or section is an error, never silently ignored (Haraka's issue #871).  Relative
paths are resolved against the directory of the config file, so a config runs
the same whatever the working directory.

Sections: [server], [[accounts]] (with [[accounts.users]], [[accounts.rules]]),
[limits.<status>], [quota], [delivery] (with [[delivery.routes]]), [logging],
[archive], [metrics], [abuse].
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ConfigError


class Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config section."""


# --- [server] ---------------------------------------------------------------


class ServerConfig(Section, frozen=True):
    hostname: str = "relay.example.test"
    listen: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:2525"])
    listen_tls: list[str] = msgspec.field(default_factory=list)
    tls_cert: str = ""
    tls_key: str = ""
    # Generate a self-signed pair at tls_cert/tls_key on first start if they are missing.
    tls_self_signed: bool = False
    spool_dir: str = "var/spool"
    # A spool segment is closed and a new one started past this size; a
    # segment's disk space comes back when its last message is done.
    spool_segment_bytes: int = 64 * 1024 * 1024
    max_message_size: int = 26_214_400
    max_connections: int = 10_000
    max_connections_per_ip: int = 100
    # An IPv6 client is counted by its network of this prefix length, for
    # max_connections_per_ip and the AUTH throttle: one host commonly holds
    # a whole /64 and would otherwise be 2^64 clients.  128: per address.
    ipv6_client_prefix: int = 64
    # Message content held in memory, all sessions together, from its first
    # byte until the spool has written it (the spool writes whole records):
    # without a bound 1,000 clients sending 25 MB at once would need 25 GB.
    # Past it new content is refused with 452 4.3.1.  0: a quarter of the
    # machine's memory (data_memory_limit()).
    max_data_memory: int = 0
    # "reject": a bare CR or LF in DATA refuses the message (SMTP smuggling defence).
    # "normalize": a bare LF in content is taken as CRLF (legacy devices).
    bare_newline: Literal["reject", "normalize"] = "reject"
    # A content line longer than RFC 5322's 998 octets: "accept" passes it
    # as it is (and logs it), as Postfix, Exchange and Gmail accept such mail;
    # "reject" refuses the message with 554 5.6.0.
    long_lines: Literal["accept", "reject"] = "accept"
    # RFC 5321 §6.3: a message that already carries this many Received:
    # headers is in a mail loop (Postfix's hopcount_limit is 50).
    max_hops: int = 50
    # RFC 5321 §4.5.3.2: the server waits at least 5 minutes for a command and
    # 3 minutes for each block of DATA; TLS handshakes get their own bound.
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    tls_handshake_timeout: float = 30.0
    # How long SIGTERM waits for open transactions before answering 421.
    drain_timeout: float = 30.0
    # 4xx/5xx replies in one session before it is closed with 421 (Postfix's
    # smtpd_hard_error_limit): recipient harvesting, stuck devices, scanners.
    hard_error_limit: int = 20
    # AUTH brute-force throttle: failures per IP within auth_failure_window
    # before replies are slowed, and before the IP is locked out.
    auth_failures_before_delay: int = 3
    auth_failures_before_lockout: int = 10
    auth_failure_window: float = 600.0
    auth_lockout: float = 900.0


def data_memory_limit(server: ServerConfig) -> int:
    """server.max_data_memory in bytes: as set, or a quarter of the machine's memory."""
    if server.max_data_memory:
        return server.max_data_memory
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        physical = 4 << 30
    return max(physical // 4, server.max_message_size)


# --- [[accounts]] -------------------------------------------------------------


class IpRangeConfig(Section, frozen=True):
    range: str
    description: str = ""
    enabled: bool = True


class UserConfig(Section, frozen=True):
    address: str
    passwords: list[str] = msgspec.field(default_factory=list)
    mail_license: bool = True
    suspended: bool = False


class RuleConfig(Section, frozen=True):
    name: str
    allowed_senders: Literal["registered_users", "my_domains", "any"]
    only_allowed_ips: bool = False
    require_auth: bool = False
    require_tls: bool = False
    ips: list[IpRangeConfig] = msgspec.field(default_factory=list)
    # The model refuses EHLO localhost / unqualified names; a rule may relax it
    # for old devices that cannot be configured (off by default).
    allow_unqualified_helo: bool = False


class AccountConfig(Section, frozen=True):
    name: str
    domains: list[str]
    status: Literal["active", "trial", "unpaid"] = "active"
    super_admins: list[str] = msgspec.field(default_factory=list)
    users_file: str = ""
    users: list[UserConfig] = msgspec.field(default_factory=list)
    rules: list[RuleConfig] = msgspec.field(default_factory=list)


class UsersFile(Section, frozen=True):
    users: list[UserConfig] = msgspec.field(default_factory=list)


# --- [limits] and [quota] -------------------------------------------------------


class LimitSet(Section, frozen=True):
    recipients_per_transaction: int = 100
    user_messages_per_day: int = 10_000
    user_unique_recipients_per_day: int = 10_000
    org_recipients_per_day: int = 4_600_000
    org_recipients_per_10min: int = 319_444


# Trial and unpaid accounts: the model publishes no relay numbers for them, only
# that they are lower; these follow Gmail's trial sending limits (500 a day).
# Smaller spool segments would cost a file and a directory fsync every few messages.
MIN_SEGMENT_BYTES = 64 * 1024

TRIAL_LIMITS = LimitSet(
    user_messages_per_day=500,
    user_unique_recipients_per_day=500,
    org_recipients_per_day=10_000,
    org_recipients_per_10min=2_000,
)
UNPAID_LIMITS = LimitSet(
    user_messages_per_day=100,
    user_unique_recipients_per_day=100,
    org_recipients_per_day=2_000,
    org_recipients_per_10min=500,
)


class LimitsConfig(Section, frozen=True):
    active: LimitSet = msgspec.field(default_factory=LimitSet)
    trial: LimitSet = msgspec.field(default_factory=lambda: TRIAL_LIMITS)
    unpaid: LimitSet = msgspec.field(default_factory=lambda: UNPAID_LIMITS)
    # Answer the daily limits with 4xx (the client's MTA keeps the mail) instead of 5xx.
    daily_limits_temporary: bool = False


class QuotaConfig(Section, frozen=True):
    backend: Literal["local", "redis"] = "local"
    state_dir: str = "var/quota"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "fastrelay:"
    redis_timeout: float = 0.5
    # When Redis cannot be reached: "tempfail" answers 451 4.3.0 (safe default),
    # "allow" lets mail through uncounted.
    on_backend_error: Literal["tempfail", "allow"] = "tempfail"
    # Local backend: the journal of counted messages is made durable this
    # often (a crash loses at most this much counting), and a full snapshot
    # is written this often by a forked child.
    flush_interval: float = 1.0
    snapshot_interval: float = 300.0


# --- [delivery] -----------------------------------------------------------------


TlsPolicy = Literal["none", "opportunistic", "required", "verify"]


class RouteConfig(Section, frozen=True):
    domain: str
    host: str
    tls: TlsPolicy | None = None        # None: [delivery] tls
    username: str = ""
    password: str = ""


class DeliveryConfig(Section, frozen=True):
    enabled: bool = True
    # The outbound TLS policy (smtp_client.py) of MX delivery and of routes that set none.
    tls: TlsPolicy = "opportunistic"
    nameservers: list[str] = msgspec.field(default_factory=list)
    mx_port: int = 25
    max_queue_lifetime: str | int = "5d"
    # A "delayed" DSN to the sender once a message has waited this long (0: never, as Postfix's default).
    delay_warning: str | int = 0
    retry_schedule: list[str | int] = msgspec.field(
        default_factory=lambda: ["1m", "1m", "3m", "5m", "10m", "20m", "40m", "1h", "2h"]
    )
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    concurrency: int = 50
    per_destination_concurrency: int = 10
    connection_idle_time: float = 5.0
    ca_file: str = ""


class LoggingConfig(Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: str = ""
    # JSON Lines event log (fastrelay/events.py); "" = off.
    events_file: str = ""


# --- [archive] and [metrics] (docs/archive.md, docs/operations.md) ------------------


class ArchiveConfig(Section, frozen=True):
    enabled: bool = False
    dir: str = "var/archive"
    retention_days: int = 365
    # A journal copy of every archived message goes to this address ("" = none).
    journal_address: str = ""
    # The accounts whose mail is archived; [] = every account.
    accounts: list[str] = msgspec.field(default_factory=list)


class MetricsConfig(Section, frozen=True):
    # Prometheus endpoint, e.g. "127.0.0.1:9154"; "" = off.
    listen: str = ""


# --- [abuse] (docs/abuse.md) ----------------------------------------------------------


class AbuseConfig(Section, frozen=True):
    # Content scanning before delivery (builtin heuristics and/or daemons),
    # per-sender spam thresholds, alerts to super admins, suspensions.
    enabled: bool = True
    scanners: list[Literal["builtin", "rspamd", "spamd", "clamd"]] = msgspec.field(
        default_factory=lambda: ["builtin"])
    rspamd_url: str = "http://127.0.0.1:11333"
    spamd: str = "127.0.0.1:783"
    clamd: str = "127.0.0.1:3310"             # host:port or an absolute unix socket path
    spam_action: Literal["quarantine", "bounce"] = "quarantine"
    alert_min_spam: int = 10
    alert_spam_ratio: float = 0.5
    alert_window: str | int = "1h"
    suspend_after: str | int = "24h"
    # A scanner that is down, times out or answers nonsense: "defer" asks again
    # after delivery.retry_schedule[0] (nothing is delivered unscanned);
    # "skip" decides on the other scanners' verdicts.
    on_scanner_error: Literal["defer", "skip"] = "defer"
    scan_timeout: float = 30.0                # per daemon request
    concurrency: int = 16                     # messages scanned at once
    spam_scan_max_size: int = 2_097_152       # larger messages skip rspamd and spamd
    builtin_threshold: float = 5.0            # builtin score that makes a message spam
    builtin_many_recipients: int = 20
    builtin_volume_min: int = 100             # messages in an hour before a jump counts
    builtin_volume_factor: float = 10.0       # times the sender's own hourly baseline
    state_dir: str = "var/abuse"


class Config(Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    accounts: list[AccountConfig] = msgspec.field(default_factory=list)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    quota: QuotaConfig = msgspec.field(default_factory=QuotaConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    archive: ArchiveConfig = msgspec.field(default_factory=ArchiveConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    abuse: AbuseConfig = msgspec.field(default_factory=AbuseConfig)
    # Where the config was read from; relative paths are resolved against base_dir.
    source: str = ""
    base_dir: str = "."

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p


# --- loading and validation -------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_duration(value: str | int | float) -> float:
    """"5d", "1h", "90s", "10m" or a number of seconds."""
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite duration")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 10m, 1h, 5d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:25', '[::1]:25', 'host:25', or 'host' when a default port is given."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: unclosed '[' in IPv6 address")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    elif ":" in value:
        raise ValueError(f"{value!r}: write IPv6 addresses as [addr]:port")
    else:
        host, port_s = value, ""
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if not port_s:
        if default_port is None:
            raise ValueError(f"{value!r}: missing port (host:port)")
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{value!r}: bad port {port_s!r}")
    return host, int(port_s)


def is_hostname(name: str) -> bool:
    return bool(_HOSTNAME.match(name))


def _key_from_msgspec(message: str) -> tuple[str, str]:
    """Turn msgspec's "... - at `$.server.listen[0]`" into (key, problem)."""
    problem, sep, where = message.rpartition(" - at `")
    if not sep:
        return "", message
    key = where.rstrip("`").removeprefix("$").removeprefix(".")
    return key, problem


def _decode(path: str, text: str, type_: type[Any]) -> Any:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        key, problem = _key_from_msgspec(str(exc))
        if problem.startswith("Object contains unknown field"):
            field = problem.split("`")[1] if "`" in problem else "?"
            key = f"{key}.{field}" if key else field
            problem = "unknown key"
        raise ConfigError(path, key, problem) from None


def load_config(path: str | Path) -> Config:
    """Read, decode and validate a config file; raise ConfigError naming file, key, problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "", "not UTF-8 text") from None
    config: Config = _decode(str(p), text, Config)
    config = msgspec.structs.replace(
        config, source=str(p), base_dir=str(p.resolve().parent)
    )
    accounts = []
    for i, account in enumerate(config.accounts):
        if account.users_file:
            users_path = config.path(account.users_file)
            try:
                users_text = users_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    str(p), f"accounts[{i}].users_file", f"cannot read {users_path}: {exc.strerror}"
                ) from None
            extra: UsersFile = _decode(str(users_path), users_text, UsersFile)
            account = msgspec.structs.replace(account, users=account.users + extra.users)
        accounts.append(account)
    config = msgspec.structs.replace(config, accounts=accounts)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that need more than a type: addresses, ranges, cross-field rules."""
    src = config.source
    s = config.server

    def fail(key: str, problem: str) -> None:
        raise ConfigError(src, key, problem)

    if not is_hostname(s.hostname) or "." not in s.hostname:
        fail("server.hostname", f"{s.hostname!r} is not a fully qualified host name")
    if not s.listen and not s.listen_tls:
        fail("server.listen", "no listener: set listen and/or listen_tls")
    for key, values in (("server.listen", s.listen), ("server.listen_tls", s.listen_tls)):
        for i, v in enumerate(values):
            try:
                host, _ = parse_hostport(v)
                ipaddress.ip_address(host)
            except ValueError as exc:
                fail(f"{key}[{i}]", f"bad listen address: {exc}")
    has_tls = bool(s.tls_cert or s.tls_key)
    if bool(s.tls_cert) != bool(s.tls_key):
        fail("server.tls_key" if s.tls_cert else "server.tls_cert", "tls_cert and tls_key go together")
    if s.listen_tls and not has_tls:
        fail("server.listen_tls", "implicit TLS listeners need tls_cert and tls_key")
    if has_tls and not s.tls_self_signed:
        for key in ("tls_cert", "tls_key"):
            f = config.path(getattr(s, key))
            if not f.is_file():
                fail(f"server.{key}", f"missing certificate file {f} (or set tls_self_signed = true)")
    if s.max_message_size < 1024:
        fail("server.max_message_size", "must be at least 1024 bytes")
    if s.max_data_memory and s.max_data_memory < s.max_message_size:
        fail("server.max_data_memory",
             f"must be at least max_message_size ({s.max_message_size} bytes), or no message that large fits")
    if s.max_hops < 2:
        fail("server.max_hops", "must be at least 2")
    check = NumberCheck(fail)
    for key in ("max_connections", "max_connections_per_ip", "auth_failures_before_delay",
                "auth_failures_before_lockout", "hard_error_limit"):
        check.at_least(f"server.{key}", getattr(s, key), 1)
    for key in ("command_timeout", "data_timeout", "tls_handshake_timeout", "auth_failure_window", "auth_lockout"):
        check.positive(f"server.{key}", getattr(s, key))
    check.not_negative("server.drain_timeout", s.drain_timeout)
    check.at_least("server.spool_segment_bytes", s.spool_segment_bytes, MIN_SEGMENT_BYTES)
    if not 1 <= s.ipv6_client_prefix <= 128:
        fail("server.ipv6_client_prefix", f"must be a prefix length from 1 to 128, not {s.ipv6_client_prefix}")

    seen_domains: dict[str, str] = {}
    for ai, account in enumerate(config.accounts):
        at = f"accounts[{ai}]"
        if not account.domains:
            fail(f"{at}.domains", "an account needs at least one domain")
        for di, domain in enumerate(account.domains):
            d = domain.lower()
            if not is_hostname(d) or "." not in d:
                fail(f"{at}.domains[{di}]", f"{domain!r} is not a domain name")
            if d in seen_domains:
                fail(f"{at}.domains[{di}]", f"{domain!r} already belongs to account {seen_domains[d]!r}")
            seen_domains[d] = account.name
        for si, admin in enumerate(account.super_admins):
            if not _looks_like_address(admin):
                fail(f"{at}.super_admins[{si}]", f"{admin!r} is not an email address")
        seen_users: set[str] = set()
        for ui, user in enumerate(account.users):
            ut = f"{at}.users[{ui}]"
            if not _looks_like_address(user.address):
                fail(f"{ut}.address", f"{user.address!r} is not an email address")
            user_domain = user.address.rpartition("@")[2].lower()
            if not any(user_domain == dom.lower() or user_domain.endswith("." + dom.lower()) for dom in account.domains):
                fail(f"{ut}.address", f"{user.address!r} is not in the account's domains ({', '.join(account.domains)})")
            if user.address.lower() in seen_users:
                fail(f"{ut}.address", f"{user.address!r} is listed twice")
            seen_users.add(user.address.lower())
            for pi, h in enumerate(user.passwords):
                if not h.startswith("$argon2"):
                    fail(f"{ut}.passwords[{pi}]", "not an argon2 hash (use `fastrelay hash-password`)")
        for ri, rule in enumerate(account.rules):
            rt = f"{at}.rules[{ri}]"
            if not rule.only_allowed_ips and not rule.require_auth:
                fail(rt, f"rule {rule.name!r} has no authentication: set only_allowed_ips and/or require_auth")
            if rule.require_auth and not has_tls:
                fail(f"{rt}.require_auth", f"rule {rule.name!r} requires SMTP AUTH, which is only offered inside TLS, but no certificate is configured")
            if rule.require_tls and not has_tls:
                fail(f"{rt}.require_tls", f"rule {rule.name!r} requires TLS but no certificate is configured")
            if rule.only_allowed_ips and not rule.ips:
                fail(f"{rt}.ips", f"rule {rule.name!r} sets only_allowed_ips but lists no range")
            for ii, r in enumerate(rule.ips):
                try:
                    net = ipaddress.ip_network(r.range, strict=True)
                except ValueError as exc:
                    fail(f"{rt}.ips[{ii}].range", f"bad CIDR: {exc}")
                if net.num_addresses > 65_536:
                    fail(f"{rt}.ips[{ii}].range", f"{r.range} covers {net.num_addresses} addresses; at most 65,536 (/16 for IPv4, /112 for IPv6)")

    for status in ("active", "trial", "unpaid"):
        limits: LimitSet = getattr(config.limits, status)
        for field in limits.__struct_fields__:
            if getattr(limits, field) < 1:
                fail(f"limits.{status}.{field}", "must be at least 1")

    q = config.quota
    for key in ("redis_timeout", "flush_interval", "snapshot_interval"):
        check.positive(f"quota.{key}", getattr(q, key))

    delivery = config.delivery
    for key in ("concurrency", "per_destination_concurrency"):
        check.at_least(f"delivery.{key}", getattr(delivery, key), 1)
    for key in ("connect_timeout", "command_timeout"):
        check.positive(f"delivery.{key}", getattr(delivery, key))
    check.not_negative("delivery.connection_idle_time", delivery.connection_idle_time)
    if not 1 <= delivery.mx_port <= 65535:
        fail("delivery.mx_port", "must be a port, 1 to 65535")
    if not delivery.retry_schedule:
        fail("delivery.retry_schedule", "needs at least one delay (the last one repeats)")
    for key, value in (("delivery.max_queue_lifetime", delivery.max_queue_lifetime),
                       ("delivery.delay_warning", delivery.delay_warning)):
        try:
            parse_duration(value)
        except ValueError as exc:
            fail(key, str(exc))
    for i, delay in enumerate(delivery.retry_schedule):
        try:
            seconds = parse_duration(delay)
        except ValueError as exc:
            fail(f"delivery.retry_schedule[{i}]", str(exc))
        # A zero delay would retry an unreachable destination in a tight loop.
        check.positive(f"delivery.retry_schedule[{i}]", seconds)
    for i, ns in enumerate(delivery.nameservers):
        try:
            host, _ = parse_hostport(ns, 53)
            ipaddress.ip_address(host)
        except ValueError as exc:
            fail(f"delivery.nameservers[{i}]", str(exc))
    for i, route in enumerate(delivery.routes):
        try:
            parse_hostport(route.host, delivery.mx_port)
        except ValueError as exc:
            fail(f"delivery.routes[{i}].host", str(exc))
        if route.domain != "*" and not is_hostname(route.domain.lstrip(".")):
            fail(f"delivery.routes[{i}].domain", f"{route.domain!r} is not a domain, '.domain' or '*'")
        if bool(route.username) != bool(route.password):
            fail(f"delivery.routes[{i}].password", "username and password go together")

    a = config.archive
    if a.retention_days < 1:
        fail("archive.retention_days", "must be at least 1 (a day)")
    if a.journal_address and not _looks_like_address(a.journal_address):
        fail("archive.journal_address", f"{a.journal_address!r} is not an email address")
    account_names = {account.name for account in config.accounts}
    for i, name in enumerate(a.accounts):
        if name not in account_names:
            fail(f"archive.accounts[{i}]", f"no account named {name!r}")
    if config.metrics.listen:
        try:
            host, _ = parse_hostport(config.metrics.listen)
            ipaddress.ip_address(host)
        except ValueError as exc:
            fail("metrics.listen", f"bad listen address: {exc}")

    _validate_abuse(config, fail)


def _validate_abuse(config: Config, fail: Any) -> None:
    ab = config.abuse
    for key in ("alert_window", "suspend_after"):
        try:
            if parse_duration(getattr(ab, key)) <= 0:
                fail(f"abuse.{key}", "must be positive")
        except ValueError as exc:
            fail(f"abuse.{key}", str(exc))
    if ab.enabled and not ab.scanners:
        fail("abuse.scanners", "no scanner: list at least one of builtin, rspamd, spamd, clamd "
                               "(or set enabled = false)")
    if len(set(ab.scanners)) != len(ab.scanners):
        fail("abuse.scanners", "a scanner is listed twice")
    if not ab.rspamd_url.startswith("http://"):
        fail("abuse.rspamd_url", f"{ab.rspamd_url!r}: use http://host:port (rspamd's normal worker)")
    for key, value in (("rspamd_url", ab.rspamd_url.removeprefix("http://").partition("/")[0]),
                       ("spamd", ab.spamd)):
        try:
            parse_hostport(value)
        except ValueError as exc:
            fail(f"abuse.{key}", str(exc))
    if not ab.clamd.startswith("/"):
        try:
            parse_hostport(ab.clamd)
        except ValueError as exc:
            fail("abuse.clamd", f"{exc} (or an absolute unix socket path)")
    if ab.alert_min_spam < 1:
        fail("abuse.alert_min_spam", "must be at least 1")
    if not 0.0 <= ab.alert_spam_ratio <= 1.0:
        fail("abuse.alert_spam_ratio", "must be between 0 and 1")
    check = NumberCheck(fail)
    for key in ("scan_timeout", "builtin_threshold", "builtin_volume_factor"):
        check.positive(f"abuse.{key}", getattr(ab, key))
    for key in ("concurrency", "spam_scan_max_size", "builtin_many_recipients", "builtin_volume_min"):
        check.at_least(f"abuse.{key}", getattr(ab, key), 1)


class NumberCheck:
    """Range checks for numbers read from TOML, which has nan and inf: ``value <= 0``
    is False for nan, so each check first asks for a finite number."""

    def __init__(self, fail: Any) -> None:
        self.fail = fail

    def _finite(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            self.fail(key, f"{value} is not a finite number")

    def positive(self, key: str, value: float) -> None:
        self._finite(key, value)
        if value <= 0:
            self.fail(key, "must be positive")

    def not_negative(self, key: str, value: float) -> None:
        self._finite(key, value)
        if value < 0:
            self.fail(key, "must not be negative")

    def at_least(self, key: str, value: int, minimum: int) -> None:
        if value < minimum:
            self.fail(key, f"must be at least {minimum}")


def _looks_like_address(value: str) -> bool:
    local, sep, domain = value.rpartition("@")
    return bool(sep and local and is_hostname(domain))
