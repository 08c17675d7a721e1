"""Key hierarchy: keyring protection, PRF stability, DEK caching limits, wrapped-key records, leak checks."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest

from cloakbeam.errors import ConfigError, KeyAccessError
from cloakbeam.keys import keyring as kr
from cloakbeam.keys.service import (
    KeyRef,
    ensure_local_keyring,
    init_keyring,
    keys_manifest_section,
    merge_wrapped_keys,
    open_key_service,
)
from cloakbeam.tests.keys_fixtures import all_key_bytes, dev_keyring, open_dev, with_reveal


def test_dev_keyring_created_0600_and_reopened(tmp_path):
    p = tmp_path / "state" / "keyring.json"
    assert ensure_local_keyring(p) is True
    assert ensure_local_keyring(p) is False
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    doc = json.loads(p.read_text())
    assert doc["dev"] is True and doc["protection"]["mode"] == "dev"
    ks = open_key_service(KeyRef(path=str(p)))
    assert len(ks.prf_key("tokens")) == 32


def test_group_readable_keyring_refused(tmp_path):
    ref = dev_keyring(tmp_path)
    os.chmod(ref.path, 0o640)
    with pytest.raises(KeyAccessError, match="chmod 600"):
        open_key_service(ref)


def test_unprotected_keyring_without_dev_flag_refused(tmp_path):
    ref = dev_keyring(tmp_path)
    doc = json.loads(open(ref.path).read())
    doc["dev"] = False
    kr.write_keyring_file(ref.path, doc)
    with pytest.raises(KeyAccessError, match="dev: true"):
        open_key_service(ref)


def test_missing_keyring_says_how_to_create(tmp_path):
    with pytest.raises(KeyAccessError, match="keys init"):
        open_key_service(KeyRef(path=str(tmp_path / "nope.json")))


def test_prf_key_is_deterministic_and_purpose_separated(tmp_path):
    ref = dev_keyring(tmp_path)
    a, b = open_key_service(ref), open_key_service(ref)
    assert a.prf_key("pseudonym/name") == b.prf_key("pseudonym/name")
    assert a.prf_key("pseudonym/name") != a.prf_key("pseudonym/email")
    assert a.keyed_hash("q", b"x") == b.keyed_hash("q", b"x")
    other = open_key_service(dev_keyring(tmp_path, name="other.json"))
    assert other.prf_key("pseudonym/name") != a.prf_key("pseudonym/name")


def test_prf_key_survives_rotation(tmp_path):
    ref = dev_keyring(tmp_path)
    before = open_key_service(ref).prf_key("tokens")
    ks = open_key_service(ref)
    assert ks.rotate() == "2"
    ks.retire("default", "1")
    after = open_key_service(ref)
    assert after.prf_key("tokens") == before
    doc = json.loads(open(ref.path).read())
    assert doc["secrets"]["root"]["kek_version"] == "2"
    assert "material" not in doc["keks"]["default"][0]


def test_passphrase_keyring(tmp_path, monkeypatch):
    p = tmp_path / "k.json"
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "correct horse battery staple")
    init_keyring(p, protection="passphrase", scrypt_n=2**12)
    doc = json.loads(p.read_text())
    assert doc["dev"] is False and doc["protection"]["kdf"]["name"] == "scrypt"
    ks = open_key_service(KeyRef(path=str(p)))
    key = ks.prf_key("t")
    # KEK material in the file is sealed, not the raw key.
    raw_kek = ks._provider._open("default", 1, doc["keks"]["default"][0]["material"])
    assert kr.b64e(raw_kek) != doc["keks"]["default"][0]["material"]
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "wrong")
    with pytest.raises(KeyAccessError, match="wrong passphrase"):
        open_key_service(KeyRef(path=str(p)))
    monkeypatch.delenv("CLOAKBEAM_KEYRING_PASSPHRASE")
    with pytest.raises(KeyAccessError, match="set the environment variable CLOAKBEAM_KEYRING_PASSPHRASE"):
        open_key_service(KeyRef(path=str(p)))
    monkeypatch.setenv("CLOAKBEAM_KEYRING_PASSPHRASE", "correct horse battery staple")
    assert open_key_service(KeyRef(path=str(p))).prf_key("t") == key


def test_env_key_keyring(tmp_path, monkeypatch):
    p = tmp_path / "k.json"
    monkeypatch.setenv("MY_KEY", os.urandom(32).hex())
    init_keyring(p, protection="env-key", env="MY_KEY")
    assert len(open_key_service(KeyRef(path=str(p))).prf_key("t")) == 32
    monkeypatch.setenv("MY_KEY", "short")
    with pytest.raises(KeyAccessError, match="MY_KEY must hold a 32-byte key"):
        open_key_service(KeyRef(path=str(p)))
    monkeypatch.setenv("MY_KEY", os.urandom(32).hex())
    with pytest.raises(KeyAccessError, match="wrong passphrase or key"):
        open_key_service(KeyRef(path=str(p)))


def test_init_refuses_overwrite(tmp_path):
    ref = dev_keyring(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        init_keyring(ref.path)


def test_dek_cached_per_process_kms_calls_grow_with_columns_not_rows(tmp_path):
    ks = open_dev(tmp_path)
    calls0 = ks.kms_calls
    for _ in range(1000):
        for col in ("a", "b", "c"):
            ks.data_key("ds", col, uses=100)
    # random DEKs: wrapped under the process's one sealed batch key, so no KEK call at all
    assert ks.kms_calls - calls0 == 0
    assert len(ks.wrapped_keys_used()) == 3
    assert len({r["seal"]["seal_id"] for r in ks.wrapped_keys_used()}) == 1  # one HPKE seal for all of them
    for _ in range(100):  # deterministic DEKs: KEK-wrapped once per column
        ks.data_key("ds", "d", deterministic=True)
    assert ks.kms_calls - calls0 == 1
    # A second service on the same keyring in the same process shares the cache (writer and protect DoFns).
    ks2 = open_key_service(ks.ref)
    before = ks2.kms_calls
    ks2.data_key("ds", "a", uses=1)
    assert ks2.kms_calls == before and len(ks2.wrapped_keys_used()) == 4


def test_dek_usage_limit_rotates_data_key(tmp_path):
    ks = open_dev(tmp_path, dek_max_uses="10")
    k1 = ks.data_key("ds", "a", uses=6)
    assert ks.data_key("ds", "a", uses=4) is k1
    k2 = ks.data_key("ds", "a", uses=1)
    assert k2.key_id != k1.key_id
    with pytest.raises(ValueError, match="exceeds dek_max_uses"):
        ks.data_key("ds", "a", uses=11)
    assert {r["key_id"] for r in ks.wrapped_keys_used()} == {k1.key_id.hex(), k2.key_id.hex()}


def test_dek_ttl_expires(tmp_path, monkeypatch):
    import cloakbeam.keys.service as svc

    ks = open_dev(tmp_path, dek_ttl_seconds="5")
    now = [1000.0]
    monkeypatch.setattr(svc.time, "monotonic", lambda: now[0])
    k1 = ks.data_key("ds", "a")
    now[0] += 4
    assert ks.data_key("ds", "a") is k1
    now[0] += 2
    assert ks.data_key("ds", "a").key_id != k1.key_id


def test_bad_dek_settings_fail_at_open(tmp_path):
    ref = dev_keyring(tmp_path, dek_max_uses=str(2**33))
    with pytest.raises(ConfigError, match="dek_max_uses"):
        open_key_service(ref)
    with pytest.raises(ConfigError, match="dek_ttl_seconds"):
        open_key_service(KeyRef(path=ref.path, params=(("dek_ttl_seconds", "soon"),)))


def test_deterministic_key_stable_across_services_and_rotation(tmp_path):
    ref = dev_keyring(tmp_path)
    a = open_key_service(ref).data_key("ds", "email", deterministic=True)
    open_key_service(ref).rotate()
    from cloakbeam.keys import service as svc

    svc._PROCESS.clear()  # a new worker process
    b = open_key_service(ref).data_key("ds", "email", deterministic=True)
    assert a.key_id == b.key_id
    assert a.aead.encrypt(b"x", [b"ad"]) == b.aead.encrypt(b"x", [b"ad"])


def test_wrapped_record_unwraps_in_fresh_process_and_is_bound(tmp_path):
    from cloakbeam.keys import service as svc

    ref = dev_keyring(tmp_path)
    ks = open_key_service(ref)
    k = ks.data_key("ds", "ssn")
    ct = k.aead.encrypt(b"\0" * 12, b"hello", b"")
    rec = ks.wrapped_keys_used()[0]
    svc._PROCESS.clear()
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        open_key_service(ref).unwrap_data_key(rec)  # the pipeline's keyring alone
    fresh = with_reveal(open_key_service(ref))
    ks = with_reveal(ks)
    assert fresh.unwrap_data_key(rec).aead.decrypt(b"\0" * 12, ct, b"") == b"hello"
    moved = dict(rec, column="other")  # a record relabelled to another column does not unwrap,
    with pytest.raises(KeyAccessError, match="failed to unwrap"):  # even while the real one is cached
        fresh.unwrap_data_key(moved)
    with pytest.raises(KeyAccessError, match="failed to unwrap"):
        ks.unwrap_data_key(dict(rec, dataset="other"))


def test_named_kek_missing_is_a_clear_error(tmp_path):
    ks = open_dev(tmp_path)
    # deterministic keys are KEK-wrapped: a missing KEK says how to create it
    with pytest.raises(KeyAccessError, match="no key named 'pii-high'.*keys rotate --name pii-high"):
        ks.data_key("ds", "a", kek="pii-high", deterministic=True)
    ks.rotate("pii-high")
    assert ks.data_key("ds", "a", kek="pii-high", deterministic=True).record["kek"] == "pii-high"
    # random keys are sealed to the reveal key of that name: a missing one says how to add it
    with pytest.raises(KeyAccessError, match="no reveal public key 'pii-high'.*set-reveal-key"):
        ks.data_key("ds", "b", kek="pii-high")


def test_nothing_secret_in_pickles_reprs_or_records(tmp_path):
    ks = open_dev(tmp_path)
    k = ks.data_key("ds", "a")
    ks.data_key("ds", "b", deterministic=True)
    with pytest.raises(TypeError):
        pickle.dumps(ks)
    with pytest.raises(TypeError):
        pickle.dumps(k)
    with pytest.raises(TypeError):
        pickle.dumps(ks._provider)
    blob = pickle.dumps(ks.ref)
    texts = [repr(ks), repr(k), repr(ks._provider), json.dumps(ks.wrapped_keys_used()), json.dumps(keys_manifest_section(ks.ref, ks.wrapped_keys_used()))]
    for secret in all_key_bytes(ks):
        assert secret not in blob
        for t in texts:
            assert secret.hex() not in t.lower() and kr.b64e(secret) not in t


def test_merge_wrapped_keys_prefers_rewrapped():
    a = {"key_id": "01", "created": "2026-01-01", "kek_version": "1"}
    b = {"key_id": "01", "created": "2026-01-01", "rewrapped": "2026-02-01", "kek_version": "2"}
    c = {"key_id": "02", "created": "2026-01-01"}
    merged = merge_wrapped_keys([a, c], [b])
    assert [r["key_id"] for r in merged] == ["01", "02"] and merged[0]["kek_version"] == "2"
    assert merge_wrapped_keys([b], [a])[0]["kek_version"] == "2"
