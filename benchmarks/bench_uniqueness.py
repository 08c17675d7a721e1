"""Benchmark: the uniqueness scan (quasi-identifier discovery) on N released records (default 1 M).

The columns are the reference release's scanned columns, shaped as the fixed reference policy releases them
(birth-date decade, zip digit, gender group, income band, diagnosis, notes template, phone mask, signup year,
churned) plus, with --raw, income and signup_ts at full detail (what the old policy released), so most
combinations hit the sketch path. Measures, in one process on batches of --batch-rows: sketching every batch
(hash each column, one unique per combination), merging the sketches, evaluating; and the merged sketch's size.

Run:  .venv/bin/python benchmarks/bench_uniqueness.py [--rows 1000000] [--batch-rows 65536] [--raw]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import pyarrow as pa

from cloakbeam.transforms.uniqueness import DEFAULT_EXACT_UP_TO, ScanSpec, combinations, evaluate, merge_sketches, sketch_batch


def make_batch(index: int, rows: int, raw: bool) -> pa.RecordBatch:
    rng = np.random.default_rng(500 + index)
    income = rng.lognormal(10.8, 0.5, rows)
    cols = {
        "date_of_birth": pa.array((1940 + rng.integers(0, 7, rows) * 10).astype(str)),
        "zip": pa.array(np.char.add(rng.integers(0, 10, rows).astype(str), "*")),
        "gender": pa.array(np.where(rng.random(rows) < 0.96, "known", "other")),
        "income": pa.array(np.round(income, 2)) if raw else pa.array(np.searchsorted([30000, 45000, 60000, 80000], income).astype(str)),
        "diagnosis": pa.array(rng.integers(0, 10, rows).astype(str)),
        "notes": pa.array(rng.integers(0, 8, rows).astype(str)),
        "phone": pa.array(np.where(rng.random(rows) < 0.95, "***", None)),
        "signup_ts": pa.array(rng.integers(1514764800, 1703980800, rows) * 1_000_000 if raw
                              else (2018 + rng.integers(0, 6, rows)) * 1_000_000, pa.timestamp("us", tz="UTC")),
        "churned": pa.array(rng.random(rows) < 0.3),
    }
    return pa.RecordBatch.from_pydict(cols)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=65_536)
    ap.add_argument("--raw", action="store_true", help="income and signup_ts at full detail (near-unique columns)")
    args = ap.parse_args(argv)
    names = list(make_batch(0, 1, args.raw).schema.names)
    spec = ScanSpec(tuple(names), tuple(combinations(names, 3)), (), (), 10, 0.01, 3, DEFAULT_EXACT_UP_TO, b"bench-uniqueness")
    batches = [make_batch(i, min(args.batch_rows, args.rows - o), args.raw) for i, o in enumerate(range(0, args.rows, args.batch_rows))]
    t0 = time.perf_counter()
    sketches = [sketch_batch({n: b.column(n) for n in names}, spec) for b in batches]
    t1 = time.perf_counter()
    merged = merge_sketches(sketches, spec)
    t2 = time.perf_counter()
    rep = evaluate(merged, spec)
    t3 = time.perf_counter()
    entries = sum(len(c.hashes) for c in merged.combos)
    print(json.dumps({
        "bench": "uniqueness", "rows": args.rows, "raw": args.raw, "columns": len(names), "combinations": len(spec.combos),
        "sketch_size": spec.sketch_size, "sketch_s": round(t1 - t0, 3), "merge_s": round(t2 - t1, 3), "evaluate_s": round(t3 - t2, 3),
        "seconds": round(t3 - t0, 3), "rows_per_s": round(args.rows / (t3 - t0)), "merged_sketch_bytes": entries * 16,
        "sketch_combinations": sum(1 for f in rep["riskiest"] if f["method"] == "sketch"), "passed": rep["passed"],
        "riskiest": rep["riskiest"][0], "python": platform.python_version(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
