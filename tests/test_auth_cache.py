"""The AUTH cache: a password that passed argon2 is not hashed again for a while."""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import pytest

from conftest import ALICE_PASSWORD, RelayProcess
from fastrelay import policy
from fastrelay.config import load_config
from fastrelay.policy import Directory


def directory(tmp_path: Path, alice_hash: str) -> Directory:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nhostname = "relay.example.test"\nlisten = ["127.0.0.1:2525"]\n'
                   '[[accounts]]\nname = "example"\ndomains = ["example.com"]\n'
                   f'[[accounts.users]]\naddress = "alice@example.com"\npasswords = ["{alice_hash}"]\n')
    return Directory(load_config(cfg))


def test_cache_remembers_only_the_verified_password(tmp_path: Path, alice_hash: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = directory(tmp_path, alice_hash)
    assert d.recently_verified("alice@example.com", ALICE_PASSWORD) is None
    user = d.verify_password("alice@example.com", ALICE_PASSWORD)
    assert user is not None
    d.remember_verified("alice@example.com", ALICE_PASSWORD, user)
    assert d.recently_verified("Alice@EXAMPLE.com", ALICE_PASSWORD) is user
    assert d.recently_verified("alice@example.com", ALICE_PASSWORD + "x") is None
    assert d.recently_verified("bob@example.com", ALICE_PASSWORD) is None
    # Entries expire.
    monkeypatch.setattr(policy, "AUTH_CACHE_SECONDS", 0.0)
    d.remember_verified("alice@example.com", ALICE_PASSWORD, user)
    time.sleep(0.01)
    assert d.recently_verified("alice@example.com", ALICE_PASSWORD) is None


def test_repeated_auth_over_smtp_and_a_wrong_password_still_fails(relay: RelayProcess) -> None:
    ctx = relay.certs.client_context()
    for _ in range(3):
        with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, local_hostname="client.example.com", context=ctx) as s:
            assert s.login("alice@example.com", ALICE_PASSWORD)[0] == 235
    with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, local_hostname="client.example.com", context=ctx) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            s.login("alice@example.com", "not-" + ALICE_PASSWORD)
        assert failed.value.smtp_code == 535


def test_concurrent_checks_of_the_same_credentials_share_one_argon2_run(tmp_path: Path, alice_hash: str) -> None:
    d = directory(tmp_path, alice_hash)
    verifier = policy.PasswordVerifier(workers=2)

    async def burst() -> list[policy.User | None]:
        same = [verifier.verify(d, "alice@example.com", ALICE_PASSWORD) for _ in range(20)]
        wrong = [verifier.verify(d, "alice@example.com", "not-" + ALICE_PASSWORD) for _ in range(5)]
        return await asyncio.gather(*same, *wrong)

    results = asyncio.run(burst())
    assert all(u is not None and u.address == "alice@example.com" for u in results[:20])
    assert results[20:] == [None] * 5
    # One run for the right password, one for the wrong one, not 25.
    assert verifier.argon2_runs == 2
    # Afterwards the right password comes from the cache; the wrong one is checked again.
    again = asyncio.run(verifier.verify(d, "alice@example.com", ALICE_PASSWORD))
    assert again is not None and verifier.argon2_runs == 2
    assert asyncio.run(verifier.verify(d, "alice@example.com", "not-" + ALICE_PASSWORD)) is None
    assert verifier.argon2_runs == 3
