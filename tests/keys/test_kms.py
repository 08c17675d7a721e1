"""KMS-backed KEK providers over real HTTP on loopback: aws-kms against moto's server mode (ThreadedMotoServer),
vault-transit and gcp-kms against small loopback servers implementing only the endpoints cloakbeam calls
(tests/keys_fixtures.py). Same checks for each: PRF stability, envelope round trip, KMS calls per column not
per row, rotate -> rewrap -> retire, retired version refused, bound AAD."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from cloakbeam.errors import KeyAccessError
from cloakbeam.keys import service as svc
from cloakbeam.keys.cells import decrypt_column, encrypt_column
from cloakbeam.keys.service import init_keyring, open_key_service
from cloakbeam.tests.keys_fixtures import FakeGcpKms, FakeVaultTransit, free_port

GCP_KEY = "projects/p1/locations/global/keyRings/cloakbeam/cryptoKeys/kek"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["aws-kms", "vault-transit", "gcp-kms"])
def kms_ref(request, tmp_path, monkeypatch):
    provider = request.param
    if provider == "aws-kms":
        url = request.getfixturevalue("moto_url")
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}.items():
            monkeypatch.setenv(k, v)
        params = {"endpoint_url": url, "region": "us-east-1"}
        server = None
    elif provider == "vault-transit":
        server = FakeVaultTransit(token="s.loopback")
        monkeypatch.setenv("VAULT_TOKEN", "s.loopback")
        params = {"address": server.url}
    else:
        server = FakeGcpKms(GCP_KEY)
        params = {"key": GCP_KEY, "endpoint": server.url}
    from cloakbeam.keys.sealing import init_reveal_keyring, read_reveal_public_keys

    reveal = init_reveal_keyring(tmp_path / "reveal-keyring.json", protection="dev")
    ref = init_keyring(tmp_path / "keyring.json", provider=provider, params=params, reveal_public_keys=read_reveal_public_keys(reveal.path))
    yield ref, server
    svc._PROCESS.clear()
    if server is not None:
        server.close()


def test_random_data_keys_are_sealed_without_a_kms_call(kms_ref):
    """Random DEKs are wrapped under the process's sealed batch key: no KMS call, and the KMS-backed pipeline
    keyring cannot open them (only the reveal keyring can)."""
    from cloakbeam.tests.keys_fixtures import with_reveal

    ref, server = kms_ref
    ks = open_key_service(ref)
    before, http_before = ks.kms_calls, len(server.calls) if server else 0
    arr = pa.array([f"v{i}" for i in range(300)])
    enc = encrypt_column(arr, ks.data_key("ds", "ssn", uses=300), dataset="ds", column="ssn")
    assert ks.kms_calls == before and (len(server.calls) if server else 0) == http_before
    records = ks.wrapped_keys_used()
    svc._PROCESS.clear()
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        decrypt_column(enc, open_key_service(ref).key_lookup(records), dataset="ds", column="ssn")
    got = decrypt_column(enc, with_reveal(open_key_service(ref)).key_lookup(records), dataset="ds", column="ssn", value_type=pa.string())
    assert got.equals(arr)


def test_keyring_holds_no_secret_and_prf_is_stable(kms_ref):
    ref, _ = kms_ref
    doc = json.loads(open(ref.path).read())
    assert doc["provider"] == ref.provider and doc["dev"] is False and "keks" in doc and not doc["keks"]
    assert doc["kms_keys"]["default"][0]["state"] == "active"
    a = open_key_service(ref).prf_key("tokens")
    svc._PROCESS.clear()
    assert open_key_service(ref).prf_key("tokens") == a
    raw = open(ref.path, "rb").read()
    assert a not in raw


def test_envelope_round_trip_and_kms_calls_per_column(kms_ref):
    ref, server = kms_ref
    ks = open_key_service(ref)
    before = ks.kms_calls
    http_before = len(server.calls) if server else 0
    arrs = {c: pa.array([f"{c}-{i}" for i in range(500)]) for c in ("ssn", "email")}
    encs = {}
    for _ in range(5):  # five batches
        for c, arr in arrs.items():
            k = ks.data_key("ds", c, deterministic=True, uses=len(arr))  # KEK-wrapped (random DEKs are sealed instead)
            encs[c] = encrypt_column(arr, k, dataset="ds", column=c)
    assert ks.kms_calls - before == 2  # one wrap per column, not per row or batch
    if server is not None:
        assert len(server.calls) - http_before == 2
    records = ks.wrapped_keys_used()
    svc._PROCESS.clear()
    fresh = open_key_service(ref)
    for c, arr in arrs.items():
        assert decrypt_column(encs[c], fresh.key_lookup(records), dataset="ds", column=c, value_type=pa.string()).equals(arr)
    moved = dict(records[0], column="other")
    with pytest.raises(KeyAccessError):
        fresh.unwrap_data_key(moved)


def test_rotate_rewrap_retire(kms_ref):
    ref, _ = kms_ref
    ks = open_key_service(ref)
    prf = ks.prf_key("p")
    k1 = ks.data_key("ds", "ssn", deterministic=True)
    enc = encrypt_column(pa.array(["123-45-6789"]), k1, dataset="ds", column="ssn")
    old = ks.wrapped_keys_used()[0]
    assert old["kek_version"] == "1"
    assert ks.rotate() == "2"
    new = ks.rewrap_record(old)
    assert new["kek_version"] == "2" and new["wrapped"] != old["wrapped"]
    ks.retire("default", "1")
    svc._PROCESS.clear()
    ks2 = open_key_service(ref)
    assert ks2.prf_key("p") == prf  # root secret was rewrapped on rotate
    with pytest.raises(KeyAccessError, match="version 1 is retired"):
        ks2.unwrap_data_key(old)
    assert decrypt_column(enc, ks2.key_lookup([new]), dataset="ds", column="ssn", value_type=pa.string()).to_pylist() == ["123-45-6789"]
    listing = {(k["name"], k["version"]): k["state"] for k in ks2.list_keys()}
    assert listing[("default", "1")] == "retired" and listing[("default", "2")] == "active"


def test_retired_version_is_refused_by_the_kms_itself(kms_ref):
    """Even if someone edits the keyring file back to 'active', the KMS no longer unwraps under v1."""
    ref, _ = kms_ref
    ks = open_key_service(ref)
    ks.data_key("ds", "x", deterministic=True)
    old = ks.wrapped_keys_used()[0]
    ks.rotate()
    ks.retire("default", "1")
    doc = json.loads(open(ref.path).read())
    doc["kms_keys"]["default"][0]["state"] = "active"
    from cloakbeam.keys.keyring import write_keyring_file

    write_keyring_file(ref.path, doc)
    svc._PROCESS.clear()
    if ref.provider == "aws-kms":
        # moto's Decrypt ignores the key state (real KMS answers DisabledException); check the state instead.
        import boto3

        kms = boto3.client("kms", region_name="us-east-1", endpoint_url=ref.param("endpoint_url"))
        meta = kms.describe_key(KeyId=doc["kms_keys"]["default"][0]["handle"])["KeyMetadata"]
        assert meta["Enabled"] is False and meta["KeyState"] == "Disabled"
        return
    with pytest.raises(KeyAccessError, match="refused"):
        open_key_service(ref).unwrap_data_key(old)


def test_missing_credentials_or_settings_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(KeyAccessError, match="VAULT_TOKEN"):
        init_keyring(tmp_path / "v.json", provider="vault-transit", params={"address": "http://127.0.0.1:9"})
    from cloakbeam.errors import ConfigError

    with pytest.raises(ConfigError, match="CryptoKey resource name"):
        init_keyring(tmp_path / "g.json", provider="gcp-kms", params={"endpoint": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="unknown key provider"):
        init_keyring(tmp_path / "x.json", provider="azure")
    monkeypatch.setenv("VAULT_TOKEN", "t")
    with pytest.raises(KeyAccessError, match="unreachable"):
        init_keyring(tmp_path / "v2.json", provider="vault-transit", params={"address": f"http://127.0.0.1:{free_port()}"})
