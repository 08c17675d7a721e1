"""The cell kernel: NIST CAVP AES-256-GCM vectors through the kernel loops, round trips, tamper cases."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import IntegrityError, KeyAccessError
from cloakbeam.keys import cells
from cloakbeam.tests.keys_fixtures import nist_gcm_vectors, open_dev

ENC = nist_gcm_vectors("gcmEncryptExtIV256.rsp")
DEC = nist_gcm_vectors("gcmDecrypt256.rsp")


def test_vector_sets_are_substantial():
    assert len(ENC) >= 100 and len(DEC) >= 100 and any("FAIL" in v for v in DEC)


def _one_cell_layout(pt: bytes, iv: bytes):
    """Lay out one GCM cell (header with the vector's IV) as the kernel does; return the pieces the loops take."""
    out = np.zeros(cells.GCM_OVERHEAD + len(pt), dtype=np.uint8)
    out[1 + cells.KEY_ID_LEN : cells.GCM_HEADER] = np.frombuffer(iv, dtype=np.uint8)
    data = memoryview(bytearray(pt)).cast("B")
    return out, data


def test_nist_gcm_encrypt_vectors_through_kernel_loop():
    for v in ENC:
        key, iv, pt, aad = (bytes.fromhex(v[k]) for k in ("Key", "IV", "PT", "AAD"))
        out, data = _one_cell_layout(pt, iv)
        cells._gcm_encrypt_loop(AESGCM(key), aad, data, np.array([0]), np.array([len(pt)]), out, np.array([0]))
        body = out[cells.GCM_HEADER :].tobytes()
        assert body == bytes.fromhex(v["CT"]) + bytes.fromhex(v["Tag"]), v["Count"]


def test_nist_gcm_decrypt_vectors_through_kernel_loop():
    for v in DEC:
        key, iv, ct, tag, aad = (bytes.fromhex(v[k]) for k in ("Key", "IV", "CT", "Tag", "AAD"))
        cell = b"\x01" + b"\0" * cells.KEY_ID_LEN + iv + ct + tag
        data = memoryview(bytearray(cell)).cast("B")
        out = np.zeros(len(ct), dtype=np.uint8)
        bad = cells._gcm_decrypt_loop(AESGCM(key), aad, data, np.array([0]), np.array([len(cell)]), out, np.array([0]), np.array([7]))
        if "FAIL" in v:
            assert bad == 7, v["Count"]
        else:
            assert bad is None and out.tobytes() == bytes.fromhex(v["PT"]), v["Count"]


@pytest.fixture()
def ks(tmp_path):
    return open_dev(tmp_path)


def _enc(ks, arr, column="ssn", dataset="customers", deterministic=False):
    k = ks.data_key(dataset, column, deterministic=deterministic)
    return k, cells.encrypt_column(arr, k, dataset=dataset, column=column)


def _dec(ks, enc, column="ssn", dataset="customers", value_type=pa.string()):
    return cells.decrypt_column(enc, ks.key_lookup(ks.wrapped_keys_used()), dataset=dataset, column=column, value_type=value_type)


def test_cell_layout_and_nulls(ks):
    arr = pa.array(["123-45-6789", None, "", "x" * 300])
    k, enc = _enc(ks, arr)
    assert enc.type == pa.binary() and enc.null_count == 1 and not enc[1].is_valid
    c0 = enc[0].as_py()
    assert c0[0] == 0x01 and c0[1:9] == k.key_id and len(c0) == 11 + 37
    assert len(enc[2].as_py()) == 37 and len(enc[3].as_py()) == 337
    nonces = {enc[i].as_py()[9:21] for i in (0, 2, 3)}
    assert len(nonces) == 3
    assert b"123-45-6789" not in enc.buffers()[2].to_pybytes()
    assert _dec(ks, enc).equals(arr)


def test_random_mode_hides_equality_deterministic_reveals_it(ks):
    arr = pa.array(["same", "same"])
    _, r = _enc(ks, arr)
    assert r[0] != r[1]
    k, d = _enc(ks, arr, column="email", deterministic=True)
    assert d[0] == d[1] and d[0].as_py()[0] == 0x02 and len(d[0].as_py()) == 4 + 25
    assert _dec(ks, d, column="email").equals(arr)


@pytest.mark.parametrize(
    "arr",
    [
        pa.array([1, None, -3], pa.int64()),
        pa.array([1, 2, 3], pa.int8()),
        pa.array([True, False, None]),
        pa.array([1.5, None, float("inf")], pa.float64()),
        pa.array([0, 19000, None], pa.date32()),
        pa.array([1_700_000_000_000_000, None], pa.timestamp("us")),
        pa.array([b"\x00\xff", None, b""], pa.binary()),
        pa.array(["a", "bb", None], pa.large_string()),
        pa.array(["a", "bb", "ccc", "dddd"]).slice(1, 2),
        pa.array([], pa.string()),
        pa.array([None, None], pa.string()),
    ],
    ids=lambda a: str(a.type),
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_round_trip_types(ks, arr, deterministic):
    _, enc = _enc(ks, arr, column="c", deterministic=deterministic)
    assert len(enc) == len(arr) and enc.null_count == arr.null_count
    out = _dec(ks, enc, column="c", value_type=arr.type)
    assert out.equals(arr)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(max_size=40)), max_size=30), det=st.booleans())
def test_round_trip_property(tmp_path_factory, values, det):
    ks = open_dev(tmp_path_factory.mktemp("k"))
    arr = pa.array(values, pa.string())
    _, enc = _enc(ks, arr, deterministic=det)
    assert _dec(ks, enc).equals(arr)


def _cells_of(enc):
    return [enc[i].as_py() for i in range(len(enc))]


@pytest.mark.parametrize("deterministic", [False, True])
def test_every_single_byte_flip_fails_naming_column_and_row(ks, deterministic):
    arr = pa.array([None, "555-12-3456"])
    _, enc = _enc(ks, arr, deterministic=deterministic)
    cell = enc[1].as_py()
    for i in range(len(cell)):
        for flip in (0x01, 0x80):
            bad = bytearray(cell)
            bad[i] ^= flip
            with pytest.raises((IntegrityError, KeyAccessError)) as ei:
                _dec(ks, pa.array([None, bytes(bad)], pa.binary()))
            msg = str(ei.value)
            assert "column 'ssn', row 1" in msg
            assert "555-12-3456" not in msg and "12-3456" not in msg
            assert bytes(bad).hex() not in msg and bytes(bad[-16:]).hex() not in msg


def test_truncation_fails(ks):
    _, enc = _enc(ks, pa.array(["555-12-3456"]))
    cell = enc[0].as_py()
    for n in range(len(cell)):
        with pytest.raises(IntegrityError, match="column 'ssn', row 0"):
            _dec(ks, pa.array([cell[:n]], pa.binary()))
    with pytest.raises(IntegrityError, match="row 0"):
        _dec(ks, pa.array([cell + b"\0"], pa.binary()))


@pytest.mark.parametrize("deterministic", [False, True])
def test_wrong_aad_other_column_or_dataset_fails(ks, deterministic):
    _, enc = _enc(ks, pa.array(["a", "b"]), deterministic=deterministic)
    with pytest.raises(IntegrityError, match="column 'email', row 0: cell failed authentication"):
        _dec(ks, enc, column="email")
    with pytest.raises(IntegrityError, match="row 0"):
        _dec(ks, enc, dataset="other")
    assert _dec(ks, enc).to_pylist() == ["a", "b"]


def test_wrong_key_fails(ks, tmp_path):
    k, enc = _enc(ks, pa.array(["a"]))
    other = open_dev(tmp_path / "other")
    k2 = other.data_key("customers", "ssn")
    # Same key id, different key material: authentication fails.
    impostor = type(k)(k.key_id, False, k2.aead, {})
    with pytest.raises(IntegrityError, match="column 'ssn', row 0: cell failed authentication"):
        cells.decrypt_column(enc, {k.key_id: impostor}, dataset="customers", column="ssn", value_type=pa.string())
    with pytest.raises(KeyAccessError, match="no data key with id"):
        cells.decrypt_column(enc, {}, dataset="customers", column="ssn")


def test_row_offset_in_messages(ks):
    _, enc = _enc(ks, pa.array(["a", "b"]))
    bad = bytearray(enc[1].as_py())
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match="row 1001"):
        cells.decrypt_column(pa.array([enc[0].as_py(), bytes(bad)]), ks.key_lookup(ks.wrapped_keys_used()), dataset="customers", column="ssn", row_offset=1000)


def test_unsupported_type_rejected():
    assert not cells.is_supported_type(pa.list_(pa.int32()))
    assert not cells.is_supported_type(pa.struct([("a", pa.int32())]))
    assert cells.is_supported_type(pa.string()) and cells.is_supported_type(pa.timestamp("us"))


def test_one_nonce_draw_per_call(ks, monkeypatch):
    calls = []
    real = os.urandom

    def counting(n):
        calls.append(n)
        return real(n)

    k = ks.data_key("customers", "ssn")
    monkeypatch.setattr(cells.os, "urandom", counting)
    prev = cells.use_kernel(cells.PYTHON_KERNEL)  # the reference kernel's draw (the native one draws in Rust)
    try:
        cells.encrypt_column(pa.array(["a"] * 50 + [None]), k, dataset="customers", column="ssn")
    finally:
        cells.use_kernel(prev)
    assert calls == [12 * 50]


@pytest.fixture(scope="module")
def module_ks(tmp_path_factory):
    return open_dev(tmp_path_factory.mktemp("prop"))


@settings(max_examples=200, deadline=None)
@given(
    value=st.binary(max_size=64),
    det=st.booleans(),
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
)
def test_any_altered_cell_is_rejected_never_misdecrypted(module_ks, value, det, edits, cut):
    """Property: any change to a cell (XOR edits at any positions, optionally a truncation) raises."""
    ks = module_ks
    k = ks.data_key("customers", "notes", deterministic=det)
    cell = cells.encrypt_column(pa.array([value], pa.binary()), k, dataset="customers", column="notes")[0].as_py()
    bad = bytearray(cell)
    for pos, x in edits:
        bad[pos % len(bad)] ^= x
    if cut is not None and cut < len(bad):
        bad = bad[:cut]
    if bytes(bad) == cell:
        return  # edits cancelled out
    with pytest.raises((IntegrityError, KeyAccessError)):
        cells.decrypt_column(pa.array([bytes(bad)], pa.binary()), ks.key_lookup(ks.wrapped_keys_used()), dataset="customers", column="notes")


def test_kernel_is_replaceable_without_changing_callers(ks):
    calls = []

    def wrap(fn, name):
        def inner(*a):
            calls.append(name)
            return fn(*a)

        return inner

    k = cells.PYTHON_KERNEL
    counting = cells.Kernel("counting", wrap(k.gcm_encrypt, "ge"), wrap(k.siv_encrypt, "se"), wrap(k.gcm_decrypt, "gd"), wrap(k.siv_decrypt, "sd"))
    prev = cells.use_kernel(counting)
    try:
        assert cells.current_kernel() is counting
        arr = pa.array(["a", "b"])
        for det in (False, True):
            _, enc = _enc(ks, arr, column="c", deterministic=det)
            assert _dec(ks, enc, column="c").equals(arr)
    finally:
        cells.use_kernel(prev)
    assert calls == ["ge", "gd", "se", "sd"] and cells.current_kernel() is prev


def test_dictionary_input_and_bad_utf8_restore(ks):
    arr = pa.array(["x", "y", "x", None]).dictionary_encode()
    _, enc = _enc(ks, arr)
    assert _dec(ks, enc).to_pylist() == ["x", "y", "x", None]
    _, enc = _enc(ks, pa.array([b"\xff\xfe secret"], pa.binary()))
    with pytest.raises(IntegrityError, match="not valid UTF-8") as ei:
        _dec(ks, enc, value_type=pa.string())
    assert "secret" not in str(ei.value) and "\\xff" not in str(ei.value)
