"""Sink: atomic commits, retry-safe names, readable by DuckDB and Polars, metadata carried."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from cloakbeam.core import fsio
from cloakbeam.transforms.write import BATCH_ID_KEY, batch_id, write_parquet_file


def _batch(bid: str = "src-000001") -> pa.RecordBatch:
    return pa.record_batch({"a": [1, 2, 3], "b": ["x", None, "z"]}, metadata={BATCH_ID_KEY: bid.encode(), b"k": b"v"})


def test_failed_write_leaves_no_visible_file(tmp_path):
    target = tmp_path / "data" / "f.bin"
    with pytest.raises(RuntimeError):
        with fsio.atomic_writer(str(target)) as w:
            w.write(b"partial")
            raise RuntimeError("worker died")
    assert not target.exists()
    assert os.listdir(tmp_path / "data") == []


def test_retry_overwrites_the_same_file(tmp_path):
    first = write_parquet_file(_batch(), str(tmp_path))
    second = write_parquet_file(_batch(), str(tmp_path))
    assert first.path == second.path == "data/part-src-000001.parquet"
    assert len(os.listdir(tmp_path / "data")) == 1
    assert first.sha256 == second.sha256 == fsio.sha256_of(str(tmp_path / first.path))[1]


def test_batch_without_id_gets_a_content_name():
    b = pa.record_batch({"a": [1]})
    assert batch_id(b) == batch_id(pa.record_batch({"a": [1]}))
    assert batch_id(b) != batch_id(pa.record_batch({"a": [2]}))


def test_output_reads_in_duckdb_and_polars(tmp_path):
    import duckdb
    import polars as pl

    stat = write_parquet_file(_batch(), str(tmp_path), extra_metadata={b"cloakbeam.extra": b"1"})
    path = str(tmp_path / stat.path)
    assert duckdb.sql(f"select count(*), sum(a) from '{path}'").fetchall() == [(3, 6)]
    assert pl.read_parquet(path)["b"].to_list() == ["x", None, "z"]
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata
    assert md[b"k"] == b"v" and md[b"cloakbeam.extra"] == b"1" and BATCH_ID_KEY not in md
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
