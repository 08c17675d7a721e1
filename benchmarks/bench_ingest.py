"""Ingest throughput: rows/s of `read_source` (parse + validate, no Beam) on clean reference data (JSON lines).

    .venv/bin/python benchmarks/bench_ingest.py --rows 200000 [--formats jsonl,csv,parquet] [--batch-size 65536]

Measures the vectorized fast path, including the hardening checks of issue 13 (depth pre-check, duplicate keys
through pyarrow's `infer` mode, non-finite floats, control characters). Generation is not timed; each format is
read three times and the best time is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--formats", default="jsonl,csv,parquet")
    ap.add_argument("--batch-size", type=int, default=65_536)
    args = ap.parse_args(argv)
    from cloakbeam.schemas.avro import load_schema
    from cloakbeam.schemas.generate import SCHEMA_PATH, generate
    from cloakbeam.transforms.ingest import Rejected, read_source

    schema = load_schema(SCHEMA_PATH)
    print(json.dumps({"bench": "ingest", "mode": "env", "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="cloakbeam-bench-ingest-") as d:
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            path = Path(d) / f"c.{fmt}"
            generate(path, args.rows, seed=1, fmt=fmt)
            data = path.read_bytes()
            best, rows, rejected = float("inf"), 0, 0
            for _ in range(3):
                t0 = time.perf_counter()
                rows = rejected = 0
                for item in read_source(io.BytesIO(data), str(path), fmt, schema, args.batch_size):
                    if isinstance(item, Rejected):
                        rejected += item.records
                    else:
                        rows += item.num_rows
                best = min(best, time.perf_counter() - t0)
            print(json.dumps({"bench": "ingest", "format": fmt, "rows": rows, "rejected": rejected, "seconds": round(best, 3),
                              "rows_per_s": round(rows / best), "batch_size": args.batch_size}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
