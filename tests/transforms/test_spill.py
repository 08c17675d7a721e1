"""transforms/spill.py: encrypted spill files of protected batches (batch k-anonymity in bounded memory).
Round trip (nested columns, many frames, empty), no plaintext on disk, and every tamper, truncation, move and
wrong-key case refused with IntegrityError naming the file only."""

from __future__ import annotations

import os
import struct

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import IntegrityError
from cloakbeam.transforms.spill import FRAME_ROWS, MAGIC, read_spill, write_spill

KEY = bytes(range(32))


def _batch(n: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({
        "zip": pa.array([f"9{i:04d}" for i in range(n)]),
        "date_of_birth": pa.array([f"1980-01-{1 + i % 28:02d}" for i in range(n)]),
        "addr": pa.array([{"city": "Springfield", "n": i} if i % 3 else None for i in range(n)],
                         pa.struct([("city", pa.string()), ("n", pa.int64())])),
        "score": pa.array([i / 7 for i in range(n)], pa.float64()),
    })


@pytest.mark.parametrize("n", [0, 1, FRAME_ROWS, FRAME_ROWS + 1, 2 * FRAME_ROWS + 5])
def test_round_trip_is_exact(tmp_path, n):
    batch = _batch(n)
    path = str(tmp_path / "a.spill")
    write_spill(batch, path, KEY, "run/a.spill")
    back = read_spill(path, KEY, "run/a.spill")
    assert back.schema == batch.schema and back.num_rows == n
    assert back.to_pylist() == batch.to_pylist()
    assert not os.path.exists(path + ".tmp")
    frames = struct.unpack(">I", open(path, "rb").read()[len(MAGIC): len(MAGIC) + 4])[0]
    assert frames == max(1, -(-n // FRAME_ROWS))


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=6, max_size=40))
def test_no_value_is_on_disk_in_the_clear(tmp_path_factory, secret):
    path = str(tmp_path_factory.mktemp("s") / "x.spill")
    batch = pa.RecordBatch.from_pydict({"notes": pa.array([secret] * 50)})
    write_spill(batch, path, KEY, "run/x.spill")
    raw = open(path, "rb").read()
    assert secret.encode() not in raw
    assert read_spill(path, KEY, "run/x.spill").column(0).to_pylist() == [secret] * 50


def _written(tmp_path, n=FRAME_ROWS + 10) -> str:
    path = str(tmp_path / "b.spill")
    write_spill(_batch(n), path, KEY, "run/b.spill")
    return path


def test_wrong_key_or_other_context_is_refused(tmp_path):
    path = _written(tmp_path)
    with pytest.raises(IntegrityError, match="b.spill does not authenticate"):
        read_spill(path, bytes(32), "run/b.spill")
    with pytest.raises(IntegrityError, match="does not authenticate"):
        read_spill(path, KEY, "other-run/b.spill")  # another run's spill, or a file renamed into place


def test_flipped_byte_is_refused(tmp_path):
    path = _written(tmp_path)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 1
    open(path, "wb").write(bytes(raw))
    with pytest.raises(IntegrityError, match="does not authenticate"):
        read_spill(path, KEY, "run/b.spill")


def test_truncated_dropped_reordered_or_extended_frames_are_refused(tmp_path):
    path = _written(tmp_path)
    raw = open(path, "rb").read()
    head = len(MAGIC) + 4
    (n0,) = struct.unpack(">I", raw[head: head + 4])
    f0, f1 = raw[head: head + 4 + n0], raw[head + 4 + n0:]
    cases = {
        "truncated": raw[:-5],
        "frame dropped": raw[:len(MAGIC)] + struct.pack(">I", 1) + f0,
        "count lowered": raw[:len(MAGIC)] + struct.pack(">I", 1) + f0 + f1,
        "reordered": raw[:head] + f1 + f0,
        "trailing": raw + b"x",
        "not a spill": b"PAR1" + raw[4:],
    }
    for what, data in cases.items():
        open(path, "wb").write(data)
        with pytest.raises(IntegrityError, match="b.spill") as exc:
            read_spill(path, KEY, "run/b.spill")
        assert "Springfield" not in str(exc.value), what
