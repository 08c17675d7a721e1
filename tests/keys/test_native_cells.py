"""The native cell kernel: published vectors through the native path, parity with the Python reference
kernel, tamper and truncation, edge sizes, sliced and chunked arrays, threads, errors and pickles."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import IntegrityError, KeyAccessError
from cloakbeam.keys import cells, native
from cloakbeam.keys.service import DataKey

VECTORS = Path(__file__).parents[1] / "vectors" / "wycheproof"
KID = b"kid-0001"
SIZES = [0, 1, 15, 16, 17, 64 * 1024]


@contextlib.contextmanager
def kernel(k: cells.Kernel):
    prev = cells.use_kernel(k)
    try:
        yield
    finally:
        cells.use_kernel(prev)


@contextlib.contextmanager
def threads(n: int):
    prev = native.get_threads()
    native.set_threads(n)
    try:
        yield
    finally:
        native.set_threads(prev)


def _key(det: bool, material: bytes | None = None) -> DataKey:
    material = material or os.urandom(64 if det else 32)
    return DataKey(KID, det, AESSIV(material) if det else AESGCM(material), {}, material)


def _cells(values, key, column="c", dataset="d") -> pa.Array:
    return cells.encrypt_column(pa.array(values, pa.binary()), key, dataset=dataset, column=column)


def _dec(arr, key, column="c", dataset="d", value_type=pa.binary(), row_offset=0):
    return cells.decrypt_column(arr, {key.key_id: key}, dataset=dataset, column=column, value_type=value_type, row_offset=row_offset)


def test_native_kernel_is_the_default():
    assert cells.current_kernel() is cells.NATIVE_KERNEL and cells.NATIVE_KERNEL.whole_column
    assert not cells.PYTHON_KERNEL.whole_column


# -- published vectors through the native path -------------------------------------------------------------


def _native_open_one(version: int, key: bytes, aad, cell: bytes) -> bytes | None:
    """Decrypt one cell with the native kernel and the vector's associated data; None when it fails."""
    _v, offsets, data, _n, _w, fails = native.decrypt_cells(pa.array([cell], pa.binary()), [(version, cell[1:9], key, aad)], wide=False)
    if fails[0] is not None:
        return None
    return data.to_pybytes()[offsets[0] : offsets[1]]


def _nist(name: str) -> list[dict[str, str]]:
    from cloakbeam.tests.keys_fixtures import nist_gcm_vectors as _nist_vectors

    return _nist_vectors(name)


def test_nist_cavp_gcm_decrypt_vectors_native():
    vectors = _nist("gcmDecrypt256.rsp")
    assert len(vectors) >= 100
    for v in vectors:
        key, iv, ct, tag, aad = (bytes.fromhex(v[k]) for k in ("Key", "IV", "CT", "Tag", "AAD"))
        got = _native_open_one(cells.CELL_GCM, key, aad, b"\x01" + KID + iv + ct + tag)
        if "FAIL" in v:
            assert got is None, v["Count"]
        else:
            assert got == bytes.fromhex(v["PT"]), v["Count"]


def test_nist_cavp_gcm_encrypt_vectors_native_in_decrypt_direction():
    """The encrypt vectors laid into cells (their IV in the nonce slot) must open to their plaintext:
    the public API draws its own nonces, so the encrypt direction is checked by cross-decryption below."""
    vectors = _nist("gcmEncryptExtIV256.rsp")
    assert len(vectors) >= 100
    for v in vectors:
        key, iv, pt, aad = (bytes.fromhex(v[k]) for k in ("Key", "IV", "PT", "AAD"))
        cell = b"\x01" + KID + iv + bytes.fromhex(v["CT"]) + bytes.fromhex(v["Tag"])
        assert _native_open_one(cells.CELL_GCM, key, aad, cell) == pt, v["Count"]


def _wycheproof(name: str):
    doc = json.loads((VECTORS / name).read_text())
    for group in doc["testGroups"]:
        for t in group["tests"]:
            yield group, t


def test_wycheproof_aes_gcm_native():
    n = 0
    for _g, t in _wycheproof("aes_gcm_test.json"):
        key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
        got = _native_open_one(cells.CELL_GCM, key, aad, b"\x01" + KID + iv + ct + tag)
        if t["result"] == "invalid":
            assert got is None, t["tcId"]
        else:
            assert got == msg, t["tcId"]
        n += 1
    assert n >= 60


def test_wycheproof_aes_siv_cmac_native():
    """AEAD-AES-SIV-CMAC, 512-bit keys: S2V over (aad, nonce, plaintext) through the native SIV path.
    SIV is deterministic, so a verified decryption also checks the encrypt-side S2V computation."""
    n = 0
    for _g, t in _wycheproof("aead_aes_siv_cmac_test.json"):
        key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
        got = _native_open_one(cells.CELL_SIV, key, [aad, iv], b"\x02" + KID + tag + ct)
        if t["result"] == "invalid":
            assert got is None, t["tcId"]
        else:
            assert got == msg, t["tcId"]
        n += 1
    assert n >= 250


def _openssl_siv_256() -> list[dict[str, str]]:
    import cryptography_vectors

    path = Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "SIV" / "openssl.txt"
    out, cur, cipher = [], None, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# Cipher"):
            cipher = line.split("=")[1].strip()
        elif line.startswith("COUNT"):
            cur = {"cipher": cipher}
            out.append(cur)
        elif cur is not None and "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            cur[k] = v
    return [v for v in out if v["cipher"] == "aes-256-siv" and "AAD2" not in v]


def test_rfc5297_style_siv_vector_encrypts_and_decrypts_natively():
    vectors = _openssl_siv_256()
    assert vectors
    for v in vectors:
        key, aad, pt = bytes.fromhex(v["Key"]), bytes.fromhex(v["AAD"]), bytes.fromhex(v["Plaintext"])
        cell = native.encrypt_cells(pa.array([pt], pa.binary()), key, KID, True, aad, "c")[0].as_py()
        assert cell == b"\x02" + KID + bytes.fromhex(v["Tag"]) + bytes.fromhex(v["Ciphertext"])
        assert _native_open_one(cells.CELL_SIV, key, aad, cell) == pt


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_native_encrypt_opens_with_cryptography(det, size):
    key = _key(det)
    values = [os.urandom(size) for _ in range(3)]
    enc = _cells(values, key)
    aad = cells.cell_aad(cells.CELL_SIV if det else cells.CELL_GCM, KID, "d", "c")
    for v, cell in zip(values, enc.to_pylist()):
        assert cell[0] == (cells.CELL_SIV if det else cells.CELL_GCM) and cell[1:9] == KID
        if det:
            assert len(cell) == size + cells.SIV_OVERHEAD
            assert AESSIV(key._native_material()).decrypt(cell[9:], [aad]) == v
        else:
            assert len(cell) == size + cells.GCM_OVERHEAD
            assert AESGCM(key._native_material()).decrypt(cell[9:21], cell[21:], aad) == v


# -- parity with the reference kernel -----------------------------------------------------------------------


@pytest.mark.parametrize("det", [False, True])
def test_edge_sizes_nulls_and_empties_both_directions(det):
    key = _key(det)
    values = [os.urandom(s) for s in SIZES] + [None, b"", None]
    for enc_k, dec_k in ((cells.NATIVE_KERNEL, cells.PYTHON_KERNEL), (cells.PYTHON_KERNEL, cells.NATIVE_KERNEL), (cells.NATIVE_KERNEL, cells.NATIVE_KERNEL)):
        with kernel(enc_k):
            enc = _cells(values, key)
        assert enc.null_count == 2 and enc.is_null().to_pylist() == [v is None for v in values]
        with kernel(dec_k):
            assert _dec(enc, key).to_pylist() == values


def test_deterministic_cells_are_byte_identical_to_the_reference():
    key = _key(True)
    values = [os.urandom(i % 40) for i in range(500)] + [None]
    native_cells = _cells(values, key)
    with kernel(cells.PYTHON_KERNEL):
        assert _cells(values, key).equals(native_cells)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.binary(max_size=80)), max_size=40), det=st.booleans(), native_first=st.booleans())
def test_property_native_and_reference_kernels_interoperate(values, det, native_first):
    key = _key(det)
    first, second = (cells.NATIVE_KERNEL, cells.PYTHON_KERNEL) if native_first else (cells.PYTHON_KERNEL, cells.NATIVE_KERNEL)
    with kernel(first):
        enc = _cells(values, key)
    with kernel(second):
        assert _dec(enc, key).to_pylist() == values


@pytest.mark.parametrize(
    "arr",
    [
        pa.array([1, -2, None, 2**40], pa.int64()),
        pa.array([True, None, False], pa.bool_()),
        pa.array([1.5, None, -0.0], pa.float32()),
        pa.array([0, 86_400_000_000, None], pa.timestamp("us")),
        pa.array(["ä", None, "", "text"], pa.string()),
        pa.array(["x", None], pa.large_string()),
        pa.array([b"\x00", None], pa.large_binary()),
    ],
)
def test_typed_columns_round_trip_like_the_reference(arr):
    key = _key(False)
    enc = cells.encrypt_column(arr, key, dataset="d", column="c")
    with kernel(cells.PYTHON_KERNEL):
        ref = _dec(enc, key, value_type=arr.type)
    out = _dec(enc, key, value_type=arr.type)
    assert out.equals(arr) and ref.equals(out) and out.type == arr.type


def test_sliced_and_chunked_arrays():
    key = _key(False)
    base = pa.array([os.urandom(i % 23) if i % 7 else None for i in range(300)], pa.binary())
    sliced = base.slice(13, 201)
    assert sliced.offset == 13
    enc = cells.encrypt_column(sliced, key, dataset="d", column="c")
    assert _dec(enc, key).equals(sliced)
    chunked = pa.chunked_array([base.slice(0, 100), base.slice(100, 5), base.slice(105)])
    enc2 = cells.encrypt_column(chunked, key, dataset="d", column="c")
    assert _dec(enc2, key).equals(base)
    # Decrypt a slice of an encrypted column (offset into both offsets and validity), and a chunked one.
    assert _dec(enc2.slice(37, 150), key).equals(base.slice(37, 150))
    assert _dec(pa.chunked_array([enc2.slice(0, 9), enc2.slice(9)]), key).equals(base)
    ints = pa.array(list(range(100)), pa.int32()).slice(3, 50)
    assert cells.decrypt_column(cells.encrypt_column(ints, key, dataset="d", column="c"), {KID: key}, dataset="d", column="c", value_type=pa.int32()).equals(ints)


# -- tamper, truncation, errors ----------------------------------------------------------------------------


def _variants(cell: bytes, patterns: tuple[int, ...]):
    for p in range(len(cell)):
        for x in patterns:
            b = bytearray(cell)
            b[p] ^= x
            yield bytes(b)
    for cut in range(len(cell)):
        yield cell[:cut]


def _all_rejected(cell: bytes, key: DataKey, patterns: tuple[int, ...]) -> None:
    lookup = {key.key_id: key}
    for bad in _variants(cell, patterns):
        with pytest.raises((IntegrityError, KeyAccessError)):
            cells.decrypt_column(pa.array([bad], pa.binary()), lookup, dataset="d", column="c")


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("size", [s for s in SIZES if s < 1024])
def test_every_flip_and_truncation_is_rejected(det, size):
    """Every byte flipped (two bit patterns) and every truncation, through decrypt_column."""
    key = _key(det)
    _all_rejected(_cells([os.urandom(size)], key)[0].as_py(), key, (0x01, 0x80))


@pytest.mark.slow
@pytest.mark.parametrize("det", [False, True])
def test_every_flip_and_truncation_of_a_64k_cell_is_rejected(det):
    """The 64 KiB cell: every byte flipped (one bit pattern) and every truncation, 131,146 decryptions
    (about 4 s for GCM and 20 s for SIV, whose CMAC runs over the whole cell each time)."""
    key = _key(det)
    _all_rejected(_cells([os.urandom(64 * 1024)], key)[0].as_py(), key, (0x01,))


def _err(fn) -> str:
    with pytest.raises((IntegrityError, KeyAccessError)) as ei:
        fn()
    return f"{type(ei.value).__name__}: {ei.value}"


def test_errors_match_the_reference_kernel_and_name_column_and_row():
    gcm, siv = _key(False), _key(True)
    good = _cells([b"secret-value-1", b"secret-value-2", None, b"secret-value-3"], gcm, column="ssn")
    cases = {
        "tampered": pa.array(good.to_pylist()[:2] + [None, good[3].as_py()[:-1] + b"\x00"], pa.binary()),
        "truncated": pa.array([good[0].as_py(), b"\x01abc"], pa.binary()),
        "short_body": pa.array([good[0].as_py(), good[1].as_py()[:30]], pa.binary()),
        "version": pa.array([good[0].as_py(), b"\x07" + good[1].as_py()[1:]], pa.binary()),
        "unknown_key": pa.array([good[0].as_py(), good[1].as_py()[:1] + b"zzzzzzzz" + good[1].as_py()[9:]], pa.binary()),
    }
    for name, arr in cases.items():
        msgs = []
        for k in (cells.NATIVE_KERNEL, cells.PYTHON_KERNEL):
            with kernel(k):
                msgs.append(_err(lambda arr=arr: cells.decrypt_column(arr, {KID: gcm}, dataset="d", column="ssn", row_offset=1000)))
        assert msgs[0] == msgs[1], name
        assert "column 'ssn', row 100" in msgs[0], name
        assert "secret" not in msgs[0]
    # mode mismatch: a GCM cell under a key recorded as deterministic
    for k in (cells.NATIVE_KERNEL, cells.PYTHON_KERNEL):
        with kernel(k):
            assert "cell mode does not match its key" in _err(lambda: cells.decrypt_column(good, {KID: siv}, dataset="d", column="ssn"))
    # moved to another column
    assert "row 0: cell failed authentication" in _err(lambda: _dec(good, gcm, column="other"))


def test_first_failing_row_is_reported_on_the_threaded_path():
    key = _key(False)
    n = 4 * native.PARALLEL_MIN_CELLS
    enc = _cells([b"v%d" % i for i in range(n)], key).to_pylist()
    for row in (n - 1, n // 2 + 3, 5):
        enc[row] = enc[row][:-1] + bytes([enc[row][-1] ^ 1])
        with threads(2):
            assert f"row {row + 7}: cell failed authentication" in _err(lambda: _dec(pa.array(enc, pa.binary()), key, row_offset=7))


def test_no_key_bytes_in_errors():
    key = _key(False)
    bad = pa.array([b"\x01" + KID + b"\x00" * 40], pa.binary())
    msg = _err(lambda: _dec(bad, key))
    material = key._native_material()
    assert material.hex() not in msg and repr(material) not in msg and "DataKey" not in msg


# -- threads, nonces -----------------------------------------------------------------------------------------


def test_thread_count_does_not_change_results():
    n = 3 * native.PARALLEL_MIN_CELLS + 11
    values = [os.urandom(i % 50) if i % 13 else None for i in range(n)]
    det, gcm = _key(True), _key(False)
    outs = []
    for t in (1, 2, 3):
        with threads(t):
            outs.append((_cells(values, det), _dec(_cells(values, gcm), gcm).to_pylist()))
    assert outs[0][0].equals(outs[1][0]) and outs[0][0].equals(outs[2][0])
    assert outs[0][1] == outs[1][1] == outs[2][1] == values


def test_nonces_are_fresh_per_cell_and_per_call():
    key = _key(False)
    with threads(2):
        a = _cells([b"same"] * 50_000, key).to_pylist()
        b = _cells([b"same"] * 10, key).to_pylist()
    nonces = {c[9:21] for c in a + b}
    assert len(nonces) == 50_010


def test_set_threads_knob():
    with threads(1):
        assert native.get_threads() == 1
    assert native.set_threads(native.get_threads()) >= 1
    with pytest.raises(ValueError):
        native.set_threads(-1)


# -- key material stays out of pickles --------------------------------------------------------------------


def test_pickled_protect_dofn_holds_no_native_key_material(tmp_path, customers_schema):
    """After the DoFn encrypted natively (random and deterministic columns), neither it before setup nor
    the policy, runtime or action pickles carry any DEK's raw bytes; DataKeys refuse to pickle."""
    from apache_beam.internal import pickler

    from cloakbeam.core.config import RuntimeConfig
    from cloakbeam.tests.keys_fixtures import dev_keyring
    from cloakbeam.tests.keys_fixtures import encrypt_batch as _batch
    from cloakbeam.tests.keys_fixtures import encrypt_policy as _policy
    from cloakbeam.transforms.steps import PolicyRef, _ProtectFn

    runtime = RuntimeConfig(run_id="r1", dataset_id="customers", state_dir=str(tmp_path), keys=dev_keyring(tmp_path))
    pol = _policy(customers_schema, ssn="encrypt", email={"action": "encrypt", "deterministic": True})
    fn = _ProtectFn(PolicyRef.of(pol), runtime)
    fn.setup()
    list(fn.process(_batch(customers_schema, 10)))
    deks = [e.key for e in fn.ctx.keys._state.active.values()]  # every DEK this worker made (random and deterministic)
    materials = [k._native_material() for k in deks]
    assert {len(m) for m in materials} == {32, 64}
    for k in deks:
        with pytest.raises(TypeError):
            pickle.dumps(k)
        assert k._native_material().hex() not in repr(k)
    fresh = _ProtectFn(PolicyRef.of(pol), runtime)
    for blob in (pickle.dumps(fresh), pickler.dumps(fresh), pickle.dumps(runtime), pickle.dumps(PolicyRef.of(pol)), pickle.dumps(pol.actions["ssn"])):
        for m in materials:
            assert m not in blob and m.hex().encode() not in blob


def test_datakey_without_material_uses_the_reference_loops():
    m = os.urandom(32)
    plain = DataKey(KID, False, AESGCM(m), {})
    with_material = DataKey(KID, False, AESGCM(m), {}, m)
    enc = _cells([b"a", None, b"bc"], plain)
    assert _dec(enc, with_material).to_pylist() == [b"a", None, b"bc"]
    assert _dec(_cells([b"x"], with_material), plain).to_pylist() == [b"x"]


def test_arrays_of_unsupported_types_are_refused():
    with pytest.raises(TypeError, match="cannot encrypt"):
        cells.encrypt_column(pa.array([[1]], pa.list_(pa.int8())), _key(False), dataset="d", column="c")
    with pytest.raises(IntegrityError, match="not an encrypted column"):
        cells.decrypt_column(pa.array([1]), {}, dataset="d", column="c")


def test_view_of_numpy_backed_and_empty_arrays():
    key = _key(False)
    assert len(_cells([], key)) == 0 and _dec(_cells([], key), key).to_pylist() == []
    arr = pa.array(np.arange(10, dtype=np.int16))
    assert cells.decrypt_column(cells.encrypt_column(arr, key, dataset="d", column="c"), {KID: key}, dataset="d", column="c", value_type=pa.int16()).equals(arr)


# -- memory: one allocation out ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 256])
def test_batch_allocates_only_its_output(size):
    """Encrypt and decrypt allocate the output buffers and nothing proportional besides (traced by
    tracemalloc: Python, numpy and the bytes the kernel fills). Peak ≤ 3x the input's bytes."""
    import tracemalloc

    key = _key(False)
    n = 200_000
    arr = pa.array([os.urandom(size) for _ in range(1000)] * (n // 1000), pa.binary())
    input_bytes = arr.nbytes
    with threads(2):
        cells.encrypt_column(arr[:10], key, dataset="d", column="c")  # warm up the pool
        tracemalloc.start()
        try:
            enc = cells.encrypt_column(arr, key, dataset="d", column="c")
            _, enc_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            dec = _dec(enc, key)
            _, dec_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    out_bytes = enc.nbytes
    assert enc_peak <= out_bytes + (1 << 20)  # the output itself (n*(size+37) + offsets), ~no temporaries
    assert enc_peak <= 3 * input_bytes
    assert dec_peak - base <= dec.nbytes + (1 << 20)
    assert dec.equals(arr)


def _child_digest(q) -> None:
    q.put(native.hmac_sha256(b"k", pa.array([f"v{i}" for i in range(4 * native.PARALLEL_MIN_CELLS)])).tobytes()[:32])


def test_forked_worker_gets_its_own_thread_pool():
    """A fork inherits the pool object but not its threads: the child must not wait on them forever."""
    import multiprocessing as mp

    with threads(2):
        native.hmac_sha256(b"k", pa.array([f"v{i}" for i in range(4 * native.PARALLEL_MIN_CELLS)]))  # pool running
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_digest, args=(q,))
        p.start()
        p.join(60)
        alive = p.is_alive()
        if alive:
            p.kill()
        assert not alive and p.exitcode == 0
        assert q.get(timeout=5) == hmac_first()


def hmac_first() -> bytes:
    import hashlib
    import hmac

    return hmac.new(b"k", b"v0", hashlib.sha256).digest()
