"""The training-Parquet sink as a plain function: one RecordBatch in, one committed Parquet file out.

Files are zstd-compressed, one row group per batch (batches default to 65,536 rows, a size training readers
stream well), written atomically under OUT/data/ with a name derived from the batch's identity, so a retried
bundle overwrites the same file instead of adding a duplicate. Extra writer options (Parquet modular
encryption) come from the policy's `parquet_encryption` section, built in the worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloakbeam.core import fsio
from cloakbeam.core.stats import FileStat

DATA_DIR = "data"
BATCH_ID_KEY = b"cloakbeam.batch_id"


def batch_id(batch: pa.RecordBatch) -> str:
    """The batch's identity from its schema metadata, or a content hash when it has none."""
    meta = batch.schema.metadata or {}
    if BATCH_ID_KEY in meta:
        return meta[BATCH_ID_KEY].decode()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:24]


def write_parquet_file(
    batch: pa.RecordBatch,
    out_dir: str,
    writer_kwargs: Mapping[str, Any] | None = None,
    extra_metadata: Mapping[bytes, bytes] | None = None,
    window: str | None = None,
    split: str | None = None,
) -> FileStat:
    """Write `batch` to OUT/data/[window/][split=<name>/]part-<id>.parquet atomically and return the file's stats."""
    bid = batch_id(batch)
    sub = [DATA_DIR] + ([window] if window else []) + ([f"split={split}"] if split else [])
    path = fsio.join(out_dir, *sub, f"part-{bid}.parquet")
    meta = {k: v for k, v in (batch.schema.metadata or {}).items() if k != BATCH_ID_KEY}
    meta.update(extra_metadata or {})
    table = pa.Table.from_batches([batch]).replace_schema_metadata(meta)
    with fsio.atomic_writer(path) as w:
        writer = pq.ParquetWriter(w, table.schema, compression="zstd", **dict(writer_kwargs or {}))
        writer.write_table(table, row_group_size=max(1, table.num_rows))
        writer.close()
    rel = path[len(out_dir) :].lstrip("/")
    return FileStat(path=rel, rows=batch.num_rows, bytes=w.size, sha256=w.sha256.hexdigest(), kind="data", window=window, split=split)


def write_training_files(
    batch: pa.RecordBatch,
    out_dir: str,
    writer_kwargs: Mapping[str, Any] | None = None,
    extra_metadata: Mapping[bytes, bytes] | None = None,
    window: str | None = None,
) -> list[FileStat]:
    """One committed file per split present in `batch` (the hidden split column removed), or one file when the
    policy has no `split` section. Names still derive from the batch identity, so retries overwrite."""
    from cloakbeam.transforms.split import partitions

    return [write_parquet_file(part, out_dir, writer_kwargs, extra_metadata, window=window, split=name)
            for name, part in partitions(batch) if part.num_rows]
