"""Config loading and validation: ``load_config`` and ``fastrelay check-config``.

Every bad file must be refused with one message naming the file, the dotted
key and the problem, the same from the library, from ``check-config`` and
from ``serve`` (which must not start, and must not print a traceback).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, Certs
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.config import ServerConfig, data_memory_limit, load_config, parse_duration
from fastrelay.errors import ConfigError

FASTRELAY = [sys.executable, "-m", "fastrelay"]
HASH = "$argon2id$v=19$m=65536,t=3,p=4$1pjSDp6M35eP3LmfEhFsKg$VBVT6EqbyfTgm0rC4jgfdsu0+CS0pMSeV7jpeDolym0"

VALID = """\
[server]
hostname = "relay.example.test"
listen = ["127.0.0.1:2525", "[::1]:2525"]
listen_tls = ["127.0.0.1:4465"]
tls_cert = "{cert}"
tls_key = "{key}"
spool_dir = "spool"

[[accounts]]
name = "example"
domains = ["example.com", "example.org"]

[[accounts.users]]
address = "alice@example.com"
passwords = ["{hash}"]

[[accounts.rules]]
name = "office"
allowed_senders = "my_domains"
only_allowed_ips = true
ips = [ {{ range = "192.0.2.0/24" }}, {{ range = "10.1.0.0/16" }}, {{ range = "2001:db8::/112" }} ]

[[accounts.rules]]
name = "users"
allowed_senders = "registered_users"
require_auth = true
require_tls = true

[delivery]
max_queue_lifetime = "5d"
"""

SECOND_ACCOUNT = """\
[[accounts]]
name = "other"
domains = ["other.example", "Example.ORG"]

[delivery]"""

NO_TLS = ('listen_tls = ["127.0.0.1:4465"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', "")

# (id, (text to replace, replacement) in VALID, extra files, dotted key, problem)
BAD = [
    ("unknown-key", ('hostname = "', 'hostnme = "'), {}, "server.hostnme", "unknown key"),
    ("unknown-key-in-rule", ("require_tls = true", "require_tsl = true"), {},
     "accounts[0].rules[1].require_tsl", "unknown key"),
    ("unknown-section", ("[delivery]", "[auth]\nenabled = true\n\n[delivery]"), {}, "auth", "unknown key"),
    ("wrong-type", ('spool_dir = "spool"', 'max_message_size = "25M"'), {},
     "server.max_message_size", "Expected `int`, got `str`"),
    ("wrong-type-in-list", ('"192.0.2.0/24"', "192"), {}, "accounts[0].rules[0].ips[0].range",
     "Expected `str`, got `int`"),
    ("bad-choice", ('"my_domains"', '"my-domains"'), {}, "accounts[0].rules[0].allowed_senders",
     "Invalid enum value 'my-domains'"),
    ("listen-host-name", ('"127.0.0.1:2525"', '"localhost:2525"'), {}, "server.listen[0]",
     "bad listen address: 'localhost' does not appear to be an IPv4 or IPv6 address"),
    ("listen-no-port", ('"[::1]:2525"', '"127.0.0.2"'), {}, "server.listen[1]",
     "bad listen address: '127.0.0.2': missing port (host:port)"),
    ("data-memory-below-message-size", ('spool_dir = "spool"', 'spool_dir = "spool"\nmax_data_memory = 1048576'), {},
     "server.max_data_memory", "must be at least max_message_size (26214400 bytes), or no message that large fits"),
    ("listen-bad-port", ('"127.0.0.1:4465"', '"127.0.0.1:65536"'), {}, "server.listen_tls[0]",
     "bad listen address: '127.0.0.1:65536': bad port '65536'"),
    ("cidr-syntax", ("192.0.2.0/24", "192.0.2.300/24"), {}, "accounts[0].rules[0].ips[0].range", "bad CIDR"),
    ("cidr-host-bits", ("192.0.2.0/24", "192.0.2.1/24"), {}, "accounts[0].rules[0].ips[0].range",
     "bad CIDR: 192.0.2.1/24 has host bits set"),
    ("cidr-v4-too-wide", ("10.1.0.0/16", "10.0.0.0/15"), {}, "accounts[0].rules[0].ips[1].range",
     "10.0.0.0/15 covers 131072 addresses; at most 65,536"),
    ("cidr-v6-too-wide", ("2001:db8::/112", "2001:db8::/111"), {}, "accounts[0].rules[0].ips[2].range",
     "2001:db8::/111 covers 131072 addresses; at most 65,536"),
    ("missing-certificate", ("{cert}", "{cert}.missing"), {}, "server.tls_cert", "missing certificate file"),
    ("rule-without-authentication", ("only_allowed_ips = true", "only_allowed_ips = false"), {},
     "accounts[0].rules[0]", "rule 'office' has no authentication: set only_allowed_ips and/or require_auth"),
    ("require-auth-without-certificate", NO_TLS, {}, "accounts[0].rules[1].require_auth",
     "rule 'users' requires SMTP AUTH, which is only offered inside TLS, but no certificate is configured"),
    ("toml-syntax", ('spool_dir = "spool"', 'spool_dir = "spool'), {}, "",
     "not valid TOML: Illegal character '\\n' (at line 7, column 19)"),
    ("users-file-missing", ('domains = ["example.com", "example.org"]',
                            'domains = ["example.com", "example.org"]\nusers_file = "users.toml"'), {},
     "accounts[0].users_file", "cannot read {dir}/users.toml: No such file or directory"),
    ("users-file-unknown-key", ('domains = ["example.com", "example.org"]',
                                'domains = ["example.com", "example.org"]\nusers_file = "users.toml"'),
     {"users.toml": '[[users]]\naddress = "bob@example.com"\npasswrds = []\n'}, "users[0].passwrds", "unknown key"),
    ("duplicate-domain", ("[delivery]", SECOND_ACCOUNT), {}, "accounts[1].domains[1]",
     "'Example.ORG' already belongs to account 'example'"),
    ("user-outside-account-domains", ('domains = ["example.com", "example.org"]',
                                      'domains = ["example.com", "example.org"]\nusers_file = "users.toml"'),
     {"users.toml": '[[users]]\naddress = "bob@elsewhere.test"\n'}, "accounts[0].users[1].address",
     "'bob@elsewhere.test' is not in the account's domains (example.com, example.org)"),
    ("bad-duration", ('max_queue_lifetime = "5d"', 'max_queue_lifetime = "5 days"'), {},
     "delivery.max_queue_lifetime", "'5 days' is not a duration (use e.g. 90s, 10m, 1h, 5d)"),
]


def write_config(directory: Path, certs: Certs, edit: tuple[str, str] = ("", ""),
                 files: dict[str, str] | None = None) -> Path:
    old, new = edit
    assert old in VALID, old
    text = VALID.replace(old, new, 1) if old else VALID
    text = text.format(cert=certs.cert, key=certs.key, hash=HASH)
    for name, content in (files or {}).items():
        (directory / name).write_text(content)
    path = directory / "relay.toml"
    path.write_text(text)
    return path


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FASTRELAY, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_example_config_passes() -> None:
    example = ROOT / "examples" / "relay.toml"
    config = load_config(example)
    assert config.server.tls_self_signed  # its certificate may not exist yet: that is fine
    assert [a.name for a in config.accounts] == ["example"]
    result = run("check-config", "--config", str(example))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{example}: ok (1 account(s), 1 user(s), 2 rule(s))\n"


def test_example_config_passes_without_its_certificate(tmp_path: Path) -> None:
    # tls_self_signed = true: a fresh copy, before the first start made the pair, is valid.
    example = tmp_path / "relay.toml"
    shutil.copyfile(ROOT / "examples" / "relay.toml", example)
    result = run("check-config", "--config", str(example))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert not (tmp_path / "var").exists()  # check-config writes nothing


def test_valid_config(tmp_path: Path, certs: Certs) -> None:
    path = write_config(tmp_path, certs)
    config = load_config(path)
    assert config.source == str(path) and config.base_dir == str(tmp_path)
    assert config.path(config.server.spool_dir) == tmp_path / "spool"
    assert [r.range for r in config.accounts[0].rules[0].ips] == ["192.0.2.0/24", "10.1.0.0/16", "2001:db8::/112"]
    result = run("check-config", "--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"{path}: ok (1 account(s), 1 user(s), 2 rule(s))\n", "")


def test_users_file_adds_users(tmp_path: Path, certs: Certs) -> None:
    path = write_config(tmp_path, certs, ('domains = ["example.com", "example.org"]',
                                          'domains = ["example.com", "example.org"]\nusers_file = "users.toml"'),
                        {"users.toml": f'[[users]]\naddress = "bob@example.com"\npasswords = ["{HASH}"]\n'})
    config = load_config(path)
    assert [u.address for u in config.accounts[0].users] == ["alice@example.com", "bob@example.com"]


@pytest.mark.parametrize("edit, files, key, problem", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_refused(tmp_path: Path, certs: Certs, edit: tuple[str, str],
                            files: dict[str, str], key: str, problem: str) -> None:
    path = write_config(tmp_path, certs, edit, files)
    problem = problem.format(dir=tmp_path)
    # The users file's own errors name the users file.
    named = tmp_path / "users.toml" if key.startswith("users[") else path
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert (error.path, error.key) == (str(named), key)
    assert problem in error.problem
    where = f"{named}: {key}: " if key else f"{named}: "
    assert str(error) == where + error.problem

    result = run("check-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"fastrelay: {error}\n"


@pytest.mark.parametrize("case", ["unknown-section", "cidr-v4-too-wide", "toml-syntax"])
def test_serve_refuses_bad_config(tmp_path: Path, certs: Certs, case: str) -> None:
    edit, files, _, _ = next(c[1:] for c in BAD if c[0] == case)
    path = write_config(tmp_path, certs, edit, files)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"fastrelay: {info.value}\n"  # the same one line, no traceback
    assert not (tmp_path / "spool").exists()


def test_unloadable_certificate_refused(tmp_path: Path, certs: Certs) -> None:
    # Valid as far as load_config goes; check-config and serve both load the pair.
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    path = write_config(tmp_path, certs, ("{cert}", str(tmp_path / "cert.pem")))
    load_config(path)
    expected = (f"fastrelay: {path}: server.tls_cert: cannot load {tmp_path / 'cert.pem'} / "
                f"{certs.key}: [SSL] PEM lib")
    for command in ("check-config", "serve"):
        result = run(command, "--config", str(path))
        assert (result.returncode, result.stdout) == (2, ""), command
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("5d", 432000),
                                           ("2w", 1209600), ("30", 30), (45, 45), ("1.5h", 5400)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_max_data_memory_is_a_quarter_of_the_machine_unless_set() -> None:
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert data_memory_limit(ServerConfig()) == machine // 4
    assert data_memory_limit(ServerConfig(max_data_memory=64 << 20)) == 64 << 20


# Numbers that loaded although the relay cannot work with them: each is refused by name.
# TOML allows nan and inf, and a check written as `value <= 0` lets nan through.
BAD_NUMBERS = [
    ("server", "drain_timeout = -1", "server.drain_timeout", "must not be negative"),
    ("server", "command_timeout = nan", "server.command_timeout", "nan is not a finite number"),
    ("server", "data_timeout = inf", "server.data_timeout", "inf is not a finite number"),
    ("server", "auth_failures_before_delay = 0", "server.auth_failures_before_delay", "must be at least 1"),
    ("server", "hard_error_limit = 0", "server.hard_error_limit", "must be at least 1"),
    ("server", "spool_segment_bytes = 1000", "server.spool_segment_bytes", "must be at least 65536"),
    ("server", "ipv6_client_prefix = 0", "server.ipv6_client_prefix", "must be a prefix length from 1 to 128, not 0"),
    ("server", "ipv6_client_prefix = 129", "server.ipv6_client_prefix", "must be a prefix length from 1 to 128, not 129"),
    ("server", "auth_failures_before_lockout = 0", "server.auth_failures_before_lockout", "must be at least 1"),
    ("server", "auth_failure_window = 0", "server.auth_failure_window", "must be positive"),
    ("server", "auth_lockout = -5.0", "server.auth_lockout", "must be positive"),
    ("quota", "flush_interval = 0", "quota.flush_interval", "must be positive"),
    ("quota", "snapshot_interval = -5", "quota.snapshot_interval", "must be positive"),
    ("quota", "redis_timeout = nan", "quota.redis_timeout", "nan is not a finite number"),
    ("delivery", "concurrency = 0", "delivery.concurrency", "must be at least 1"),
    ("delivery", "per_destination_concurrency = -3", "delivery.per_destination_concurrency", "must be at least 1"),
    ("delivery", "connect_timeout = 0", "delivery.connect_timeout", "must be positive"),
    ("delivery", "command_timeout = inf", "delivery.command_timeout", "inf is not a finite number"),
    ("delivery", "connection_idle_time = -1", "delivery.connection_idle_time", "must not be negative"),
    ("delivery", "mx_port = 70000", "delivery.mx_port", "must be a port, 1 to 65535"),
    ("delivery", "retry_schedule = []", "delivery.retry_schedule", "at least one delay"),
    ("delivery", 'retry_schedule = ["1m", "0s"]', "delivery.retry_schedule[1]", "must be positive"),
    ("abuse", "scan_timeout = nan", "abuse.scan_timeout", "nan is not a finite number"),
    ("abuse", "builtin_threshold = inf", "abuse.builtin_threshold", "inf is not a finite number"),
]


@pytest.mark.parametrize(("section", "line", "key", "problem"), BAD_NUMBERS, ids=[c[2] for c in BAD_NUMBERS])
def test_numbers_the_relay_cannot_work_with_are_refused(tmp_path: Path, section: str, line: str, key: str,
                                                       problem: str) -> None:
    path = tmp_path / "relay.toml"
    base = '[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
    path.write_text(base + (line + "\n" if section == "server" else f"\n[{section}]\n{line}\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.key) == (str(path), key)
    assert problem in info.value.problem, info.value.problem


def _numeric_settings() -> list[tuple[str, str]]:
    """(section, key) of every int or float setting, read from the config's own Structs."""
    import typing

    from fastrelay import config as config_module

    sections = {"server": config_module.ServerConfig, "quota": config_module.QuotaConfig,
                "delivery": config_module.DeliveryConfig, "archive": config_module.ArchiveConfig,
                "abuse": config_module.AbuseConfig, "limits.active": config_module.LimitSet}
    found = []
    for section, struct in sections.items():
        for name, kind in typing.get_type_hints(struct).items():
            if kind in (int, float):
                found.append((section, name))
    return found


NUMERIC_SETTINGS = _numeric_settings()


def _toml_number(value: float) -> str:
    return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan" if math.isnan(value) else repr(value))


@settings(max_examples=300, deadline=None)
@given(setting=st.sampled_from(NUMERIC_SETTINGS),
       value=st.one_of(st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True)))
def test_any_number_in_any_numeric_setting_loads_or_is_refused_by_name(setting: tuple[str, str],
                                                                       value: float) -> None:
    """Whatever number an administrator writes, the loader answers with a Config whose
    numbers are finite, or a ConfigError naming the file and that key; nothing else."""
    section, key = setting
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "relay.toml"
        head = '[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
        line = f"{key} = {_toml_number(value)}\n"
        path.write_text(head + (line if section == "server" else f"\n[{section}]\n{line}"))
        try:
            loaded = load_config(path)
        except ConfigError as error:
            assert error.path == str(path)
            # A number TOML itself cannot hold (beyond 64 bits) is a syntax error of the file.
            assert error.key == f"{section}.{key}" or (error.key == "" and "not valid TOML" in error.problem), error
            return
        node: object = loaded
        for part in [*section.split("."), key]:
            node = getattr(node, part)
        assert isinstance(node, (int, float)) and math.isfinite(node), (setting, node)


def test_serve_refuses_a_log_file_it_cannot_open(tmp_path: Path, certs: Certs) -> None:
    path = write_config(tmp_path, certs, ("[delivery]", '[logging]\nfile = "logs"\n\n[delivery]'))
    (tmp_path / "logs").mkdir()     # a directory where the log file should be
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"fastrelay: {path}: logging.file: cannot open {tmp_path / 'logs'}: Is a directory\n"
    assert not (tmp_path / "spool").exists()
