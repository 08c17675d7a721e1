"""Sealing (HPKE to the reveal key, batch keys) and the multi-key cell kernel: round trips, binding, tamper,
rotation, and the rule that the pipeline's keyring alone opens nothing it sealed."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys import cells
from cloakbeam.keys.sealing import init_reveal_keyring, new_seal_batch, open_reveal_keys, read_reveal_public_keys
from cloakbeam.keys.service import DataKey
from cloakbeam.tests.keys_fixtures import open_pipeline_dev, reveal_ref


@pytest.fixture()
def reveal(tmp_path):
    return open_reveal_keys(init_reveal_keyring(tmp_path / "reveal.json", protection="dev"))


def _pub(reveal):
    import base64

    v = reveal.public_keys()["default"]
    return int(v["version"]), base64.b64decode(v["public_key"])


def test_batch_key_seals_once_and_unwraps_many(reveal):
    version, pub = _pub(reveal)
    batch = new_seal_batch(pub, "default", version)
    deks = [os.urandom(32) for _ in range(100)]
    wrapped = batch.wrap_many(deks, [b"aad-%d" % i for i in range(100)])
    assert all(d not in w for d, w in zip(deks, wrapped))
    assert [reveal.unwrap(batch.record, w, b"aad-%d" % i) for i, w in enumerate(wrapped)] == deks
    with pytest.raises(KeyAccessError):
        reveal.unwrap(batch.record, wrapped[0], b"aad-1")  # relabelled
    for field, value in (("seal_id", "00" * 8), ("reveal_version", 2)):
        forged = dict(batch.record, **{field: value})
        reveal._batches.clear()
        with pytest.raises((KeyAccessError, IntegrityError)):
            reveal.batch_aead(forged)
    with pytest.raises(TypeError):
        pickle.dumps(batch)
    with pytest.raises(TypeError):
        pickle.dumps(reveal)


def test_another_reveal_keyring_cannot_unseal(tmp_path, reveal):
    other = open_reveal_keys(init_reveal_keyring(tmp_path / "other.json", protection="dev"))
    version, pub = _pub(reveal)
    batch = new_seal_batch(pub, "default", version)
    with pytest.raises(KeyAccessError, match="another reveal keyring"):
        other.batch_aead(batch.record)


def test_rotate_reseal_retire(reveal):
    version, pub = _pub(reveal)
    batch = new_seal_batch(pub, "default", version)
    w = batch.wrap(b"k" * 32, b"a")
    assert reveal.rotate() == 2
    resealed = reveal.reseal(batch.record)
    assert resealed["reveal_version"] == 2 and resealed["sealed"] != batch.record["sealed"] and resealed["seal_id"] == batch.record["seal_id"]
    reveal.retire("default", 1)
    reveal._batches.clear()
    with pytest.raises(KeyAccessError, match="retired"):
        reveal.batch_aead(batch.record)
    assert reveal.unwrap(resealed, w, b"a") == b"k" * 32
    with pytest.raises(KeyAccessError, match="newest version"):
        reveal.retire("default", 2)


def test_reveal_public_key_forms(tmp_path, reveal):
    keys = read_reveal_public_keys(reveal.ref.path)
    b64 = keys["default"]["public_key"]
    assert read_reveal_public_keys(b64) == {"default": {"version": 1, "public_key": b64}}
    assert read_reveal_public_keys(f"pii-high:{b64}")["pii-high"]["public_key"] == b64
    for bad in ("", "nope", "x:" + "A" * 10):
        with pytest.raises(ConfigError):
            read_reveal_public_keys(bad)
    assert "secrets" not in str(keys)


def test_pipeline_keyring_seals_to_the_reveal_key_and_cannot_open(tmp_path):
    ks = open_pipeline_dev(tmp_path)
    key = ks.data_key("ds", "ssn", uses=3)
    enc = cells.encrypt_column(pa.array(["a", "b", "c"]), key, dataset="ds", column="ssn")
    rec = ks.wrapped_keys_used()[0]
    assert rec["provider"] == "sealed" and "kek" not in rec
    from cloakbeam.keys import service as svc

    svc._PROCESS.clear()
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        cells.decrypt_column(enc, ks.key_lookup([rec]), dataset="ds", column="ssn")
    blob = ks.seal(b"raw record", dataset="ds", purpose="quarantine", context="f#1")
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        ks.open_sealed(blob, dataset="ds", purpose="quarantine", context="f#1")
    ks.attach_reveal(open_reveal_keys(reveal_ref(ks.ref)))
    assert cells.decrypt_column(enc, ks.key_lookup([rec]), dataset="ds", column="ssn", value_type=pa.string()).to_pylist() == ["a", "b", "c"]
    assert ks.open_sealed(blob, dataset="ds", purpose="quarantine", context="f#1") == b"raw record"


# -- the multi-key kernel ---------------------------------------------------------------------------------------
def _keys(n):
    return [DataKey(os.urandom(8), False, AESGCM(os.urandom(32)), {}) for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=40)), min_size=0, max_size=60), st.integers(1, 7), st.integers(0, 10_000))
def test_keyed_round_trip_for_any_values_and_key_assignment(values, nkeys, seed):
    keys = _keys(nkeys)
    idx = np.random.default_rng(seed).integers(0, nkeys, size=len(values))
    arr = pa.array(values, pa.string())
    enc = cells.encrypt_column_keyed(arr, idx, keys, dataset="d", column="c")
    by_id = {k.key_id: k for k in keys}
    # the single-key decrypt reads keyed cells (same format v1), and so does the keyed one
    assert cells.decrypt_column(enc, by_id, dataset="d", column="c", value_type=pa.string()).equals(arr)
    got, missing = cells.decrypt_column_keyed(enc, by_id, dataset="d", column="c", value_type=pa.string())
    assert got.equals(arr) and missing == 0
    for row, v in enumerate(values):
        if v is not None:
            assert enc[row].as_py()[1:9] == keys[idx[row]].key_id


def test_keyed_cells_tamper_move_and_forgotten_keys():
    keys = _keys(3)
    arr = pa.array(["alpha", "beta", "gamma", "delta"])
    idx = np.array([0, 1, 2, 0])
    enc = cells.encrypt_column_keyed(arr, idx, keys, dataset="d", column="ssn")
    by_id = {k.key_id: k for k in keys}
    raw = enc.to_pylist()
    bad = list(raw)
    b = bytearray(bad[2])
    b[-1] ^= 1
    bad[2] = bytes(b)
    with pytest.raises(IntegrityError, match="column 'ssn', row 2") as ei:
        cells.decrypt_column_keyed(pa.array(bad, pa.binary()), by_id, dataset="d", column="ssn", value_type=pa.string())
    assert "gamma" not in str(ei.value)
    with pytest.raises(IntegrityError):
        cells.decrypt_column_keyed(enc, by_id, dataset="d", column="other", value_type=pa.string())
    # a forgotten subject's key: its cells come back null and are counted, the others decrypt
    partial = {k: v for k, v in by_id.items() if k != keys[0].key_id}
    got, missing = cells.decrypt_column_keyed(enc, partial, dataset="d", column="ssn", value_type=pa.string())
    assert got.to_pylist() == [None, "beta", "gamma", None] and missing == 2
    # a lookup function is asked once for all distinct key ids
    asked = []
    cells.decrypt_column_keyed(enc, lambda ids: (asked.append(sorted(ids)), by_id)[1], dataset="d", column="ssn", value_type=pa.string())
    assert asked == [sorted(k.key_id for k in keys)]


def test_keyed_encrypt_rejects_bad_inputs():
    keys = _keys(2)
    arr = pa.array(["a", "b"])
    with pytest.raises(ValueError, match="one entry per row"):
        cells.encrypt_column_keyed(arr, np.array([0]), keys, dataset="d", column="c")
    with pytest.raises(ValueError, match="was not given"):
        cells.encrypt_column_keyed(arr, np.array([0, 2]), keys, dataset="d", column="c")
    det = [DataKey(os.urandom(8), True, None, {})]
    with pytest.raises(ValueError, match="random-mode"):
        cells.encrypt_column_keyed(arr, np.array([0, 0]), det, dataset="d", column="c")


def test_keyed_loops_sit_behind_the_kernel_interface():
    calls = []
    base = cells.PYTHON_KERNEL

    def enc(*a):
        calls.append("enc")
        return base.gcm_encrypt_keyed(*a)

    def dec(*a):
        calls.append("dec")
        return base.gcm_decrypt_keyed(*a)

    prev = cells.use_kernel(cells.Kernel("spy", base.gcm_encrypt, base.siv_encrypt, base.gcm_decrypt, base.siv_decrypt, enc, dec))
    try:
        keys = _keys(2)
        e = cells.encrypt_column_keyed(pa.array(["x", "y"]), np.array([0, 1]), keys, dataset="d", column="c")
        cells.decrypt_column_keyed(e, {k.key_id: k for k in keys}, dataset="d", column="c")
    finally:
        cells.use_kernel(prev)
    assert calls == ["enc", "dec"]
    # a kernel built for the single-key loops only keeps working: the keyed loops default to Python
    k4 = cells.Kernel("four", base.gcm_encrypt, base.siv_encrypt, base.gcm_decrypt, base.siv_decrypt)
    assert k4.gcm_encrypt_keyed is base.gcm_encrypt_keyed


# -- the native multi-key kernel (subject-linked columns: one call for the column) ---------------------------
def _material_keys(n):
    out = []
    for _ in range(n):
        m = os.urandom(32)
        out.append(DataKey(os.urandom(8), False, AESGCM(m), {}, m))
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=40)), min_size=0, max_size=80), st.integers(1, 7), st.integers(0, 10_000))
def test_native_keyed_cells_open_with_cryptography_under_the_rows_key(values, nkeys, seed):
    """Every cell the native keyed kernel writes is AES-256-GCM under its row's key and the key's associated
    data, checked cell by cell with `cryptography`; the Python keyed decrypt reads the column back."""
    keys = _material_keys(nkeys)
    idx = np.random.default_rng(seed).integers(0, nkeys, size=len(values))
    arr = pa.array(values, pa.string())
    assert cells.current_kernel().whole_column
    enc = cells.encrypt_column_keyed(arr, idx, keys, dataset="d", column="c")
    assert enc.null_count == arr.null_count
    for row, v in enumerate(values):
        cell = enc[row].as_py()
        if v is None:
            assert cell is None
            continue
        k = keys[idx[row]]
        assert cell[0] == cells.CELL_GCM and cell[1:9] == k.key_id
        aad = cells.cell_aad(cells.CELL_GCM, k.key_id, "d", "c")
        assert AESGCM(k._native_material()).decrypt(cell[9:21], cell[21:], aad) == v.encode()
    prev = cells.use_kernel(cells.PYTHON_KERNEL)
    try:
        got, missing = cells.decrypt_column_keyed(enc, {k.key_id: k for k in keys}, dataset="d", column="c", value_type=pa.string())
    finally:
        cells.use_kernel(prev)
    assert got.equals(arr) and missing == 0


def test_native_keyed_kernel_nonces_are_fresh_and_non_string_columns_work():
    keys = _material_keys(2)
    arr = pa.array(list(range(3000)), pa.int64())
    idx = np.arange(3000) % 2
    a = cells.encrypt_column_keyed(arr, idx, keys, dataset="d", column="n")
    b = cells.encrypt_column_keyed(arr, idx, keys, dataset="d", column="n")
    nonces = {c[9:21] for c in a.to_pylist() + b.to_pylist()}
    assert len(nonces) == 6000  # drawn inside the kernel for every cell, never repeated
    got, _ = cells.decrypt_column_keyed(a, {k.key_id: k for k in keys}, dataset="d", column="n", value_type=pa.int64())
    assert got.equals(arr)


def test_native_keyed_kernel_refuses_bad_inputs_and_tampering():
    keys = _material_keys(2)
    arr = pa.array(["a", None, "b"])
    with pytest.raises(ValueError, match="was not given"):
        cells.encrypt_column_keyed(arr, np.array([0, 0, 5]), keys, dataset="d", column="c")
    with pytest.raises(ValueError, match="was not given"):
        cells.encrypt_column_keyed(arr, np.array([0, 0, -1]), keys, dataset="d", column="c")
    # a null row's index is never looked at
    enc = cells.encrypt_column_keyed(arr, np.array([1, 99, 0]), keys, dataset="d", column="c")
    by_id = {k.key_id: k for k in keys}
    bad = enc.to_pylist()
    flipped = bytearray(bad[2])
    flipped[-1] ^= 1
    bad[2] = bytes(flipped)
    with pytest.raises(IntegrityError, match="row 2"):
        cells.decrypt_column_keyed(pa.array(bad, pa.binary()), by_id, dataset="d", column="c", value_type=pa.string())
    with pytest.raises(IntegrityError):
        cells.decrypt_column_keyed(enc, by_id, dataset="d", column="other", value_type=pa.string())


def test_a_data_key_built_without_an_aead_object_makes_it_from_its_material_on_first_use():
    m = os.urandom(32)
    k = DataKey(b"12345678", False, None, {}, m)
    assert k._aead is None  # nothing native is held until a Python loop needs it
    ct = k.aead.encrypt(b"\0" * 12, b"x", b"a")
    assert AESGCM(m).decrypt(b"\0" * 12, ct, b"a") == b"x" and k.aead is k.aead
