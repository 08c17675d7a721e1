"""Differential fuzz target for native cell decryption (atheris / libFuzzer).

    .venv/bin/python tests/fuzz/fuzz_native_decrypt.py -max_total_time=60 [NEW_CORPUS_DIR] tests/fuzz/corpus/decrypt

Each input becomes a column of cells: some are genuine cells of two fixed data keys (GCM and SIV) with
fuzzer-chosen edits and cuts, others raw fuzzer bytes, some null; the column may be sliced. The native
kernel must then either return exactly what the Python reference kernel returns, or raise the same
cloakbeam error with the same message. Anything else (another exception, a different answer, a crash of
the extension) is a finding. `.ci/run` runs it for a bounded time after the tests.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import pyarrow as pa

    from cloakbeam.errors import IntegrityError, KeyAccessError
    from cloakbeam.keys import cells
    from cloakbeam.keys.service import DataKey

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

_GCM_KEY = bytes(range(32))
_SIV_KEY = bytes(range(64, 128))
GCM = DataKey(b"gcm-key1", False, AESGCM(_GCM_KEY), {}, _GCM_KEY)
SIV = DataKey(b"siv-key1", True, AESSIV(_SIV_KEY), {}, _SIV_KEY)
KEYS = {GCM.key_id: GCM, SIV.key_id: SIV}
TYPES = [pa.binary(), pa.string(), pa.large_binary(), pa.int32(), pa.bool_()]


def _column(fdp: atheris.FuzzedDataProvider) -> pa.Array:
    values: list[bytes | None] = []
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            values.append(None)
            continue
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 48))
        if kind == 1:
            values.append(raw)
            continue
        key = GCM if kind == 2 else SIV
        cell = bytearray(cells.encrypt_column(pa.array([raw], pa.binary()), key, dataset="d", column="c")[0].as_py())
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            cell[fdp.ConsumeIntInRange(0, len(cell) - 1)] ^= fdp.ConsumeIntInRange(0, 255)
        if fdp.ConsumeBool():
            del cell[fdp.ConsumeIntInRange(0, len(cell)) :]
        values.append(bytes(cell))
    arr = pa.array(values, pa.binary())
    if len(arr) and fdp.ConsumeBool():
        start = fdp.ConsumeIntInRange(0, len(arr))
        arr = arr.slice(start, fdp.ConsumeIntInRange(0, len(arr) - start))
    return arr


def _run(kernel: cells.Kernel, arr: pa.Array, keys, value_type: pa.DataType, row_offset: int):
    prev = cells.use_kernel(kernel)
    try:
        return ("ok", cells.decrypt_column(arr, keys, dataset="d", column="c", value_type=value_type, row_offset=row_offset))
    except (IntegrityError, KeyAccessError) as exc:
        return (type(exc).__name__, str(exc))
    finally:
        cells.use_kernel(prev)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    value_type = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    keys = KEYS if fdp.ConsumeBool() else {GCM.key_id: GCM}
    row_offset = fdp.ConsumeIntInRange(0, 1000)
    arr = _column(fdp)
    got = _run(cells.NATIVE_KERNEL, arr, keys, value_type, row_offset)
    want = _run(cells.PYTHON_KERNEL, arr, keys, value_type, row_offset)
    if got[0] == "ok" and want[0] == "ok":
        if not got[1].equals(want[1]):
            raise AssertionError("native and reference kernels decrypt to different values")
    elif got != want:
        raise AssertionError(f"native and reference kernels disagree: {got[0]}: {got[1]!s} / {want[0]}: {want[1]!s}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
