"""Benchmark: enforce k-anonymity (k=10, 4 quasi-identifiers, l=2, 2% suppression) on N rows (default 1 M).

Prints one JSON line per measurement:
  - mode "functions": the plain functions a worker runs (per-batch frequency sets, merge, lattice search,
    generalize + suppress per batch), single process, data already in memory;
  - mode "beam": the `EnforceKAnonymity` PTransform on the in-process FnApiRunner (batches generated inside
    the pipeline; the generation time, measured separately, is reported and not subtracted).

  - mode "metrics": the lattice search once per metric (loss, discernibility, aecs, entropy, precision) on one
    merged frequency set, reporting search seconds, nodes evaluated and the chosen levels per metric. With
    `--dataset reference` the rows are the reference customers (schemas/generate.py) and the 8 QIs are
    date_of_birth, zip, gender, income, signup_ts, ip_address, phone and churned (l=2 on diagnosis).

Run:  .venv/bin/python benchmarks/bench_kanon.py [--rows 1000000] [--batch-rows 65536] [--modes functions,beam,metrics]
      [--qis 4|8] [--dataset synthetic|reference]
The input imitates the protect stage's output: QIs as full-detail canonical strings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import pyarrow as pa

from cloakbeam.transforms.generalize import Hierarchy
from cloakbeam.transforms.kanon import KAnonSpec, QuasiIdentifier, enforce_table, frequency_set, make_plan, merge_frequency_sets

DIAGNOSES = ["flu", "asthma", "diabetes", "hypertension", "migraine", "none", "back pain", "anxiety"]


def make_spec(qis: int = 4) -> KAnonSpec:
    q = [
        QuasiIdentifier("date_of_birth", Hierarchy("date", ("month", "year", "decade"))),
        QuasiIdentifier("zip", Hierarchy("prefix", (3, 1))),
        QuasiIdentifier("gender", Hierarchy("map", (1,), groups=((("known", ("female", "male")), ("other", ("nonbinary", "unknown"))),))),
        QuasiIdentifier("income", Hierarchy("band", (10000, 50000, 100000))),
    ]
    for i in range(qis - 4):
        q.append(QuasiIdentifier(f"extra{i}", Hierarchy("band", (5, 10, 20, 40))))
    return KAnonSpec(tuple(q[:qis]), 10, 0.02, "diagnosis", 2)


def make_batch(index: int, rows: int, qis: int = 4) -> pa.RecordBatch:
    """Deterministic synthetic protected batch (QIs as canonical strings, like the protect stage's output)."""
    rng = np.random.default_rng(1000 + index)
    zips = np.char.zfill(np.random.default_rng(7).integers(501, 99950, 2000).astype(str), 5)
    days = rng.integers(-10957, 12784, rows)  # 1940 .. 2004
    dob = pa.array(days.astype("datetime64[D]"), pa.date32()).cast(pa.string())
    gender = np.array(["female", "male", "nonbinary", "unknown"])[rng.choice(4, rows, p=[0.49, 0.47, 0.03, 0.01])]
    income = np.round(rng.lognormal(10.8, 0.5, rows), -2)
    cols: dict[str, Any] = {
        "date_of_birth": dob,
        "zip": pa.array(zips[rng.integers(0, len(zips), rows)]),
        "gender": pa.array(gender),
        "income": pa.array(income).cast(pa.string()),
        "diagnosis": pa.array(np.array(DIAGNOSES)[rng.integers(0, len(DIAGNOSES), rows)]),
        "churned": pa.array(rng.random(rows) < 0.2),
    }
    for i in range(qis - 4):
        cols[f"extra{i}"] = pa.array(rng.integers(0, 100, rows).astype(str))
    return pa.RecordBatch.from_pydict(cols)


def bench_functions(rows: int, batch_rows: int, qis: int) -> dict[str, Any]:
    spec = make_spec(qis)
    n_batches = -(-rows // batch_rows)
    t = time.perf_counter()
    batches = [make_batch(i, min(batch_rows, rows - i * batch_rows), qis) for i in range(n_batches)]
    gen_s = time.perf_counter() - t
    t0 = time.perf_counter()
    freqs = [frequency_set({n: c for n, c in zip(b.schema.names, b.columns)}, spec) for b in batches]
    t1 = time.perf_counter()
    merged = merge_frequency_sets(freqs)
    t2 = time.perf_counter()
    plan = make_plan(merged, spec)
    t3 = time.perf_counter()
    released = suppressed = 0
    for b in batches:
        out, s = enforce_table(b, spec, plan)
        released += out.num_rows
        suppressed += s
    t4 = time.perf_counter()
    rep = plan.report
    return {
        "bench": "kanon", "mode": "functions", "rows": rows, "qis": qis, "k": spec.k, "l": spec.l,
        "batch_rows": batch_rows, "seconds": round(t4 - t0, 3), "count_s": round(t1 - t0, 3), "merge_s": round(t2 - t1, 3),
        "search_s": round(t3 - t2, 3), "apply_s": round(t4 - t3, 3), "generate_s": round(gen_s, 3),
        "frequency_rows": merged.num_rows if merged is not None else 0, "lattice_nodes": rep["lattice_nodes"],
        "nodes_evaluated": rep["nodes_evaluated"], "levels": {p: v["name"] for p, v in rep["levels"].items()},
        "released": released, "suppressed": suppressed, "k_achieved": rep["k_achieved"], "l_achieved": rep["l_achieved"],
        "rows_per_s": round(rows / (t4 - t0)), "python": platform.python_version(),
    }


def bench_beam(rows: int, batch_rows: int, qis: int) -> dict[str, Any]:
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from cloakbeam.core.stats import RunStats
    from cloakbeam.transforms.kanon_beam import EnforceKAnonymity

    spec = make_spec(qis)
    n_batches = -(-rows // batch_rows)
    sizes = [min(batch_rows, rows - i * batch_rows) for i in range(n_batches)]
    t = time.perf_counter()
    for i, s in enumerate(sizes):
        make_batch(i, s, qis)
    gen_s = time.perf_counter() - t

    import os
    import tempfile

    fd, summary_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)

    t0 = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = (
            p
            | beam.Create(list(enumerate(sizes)))
            | "Generate" >> beam.MapTuple(lambda i, s: make_batch(i, s, qis))
            | "EnforceKAnonymity" >> EnforceKAnonymity(spec)
        )
        # A tiny summary per element, merged and written to a temp file (the data itself is not collected).
        _ = (
            out
            | beam.Map(lambda e: e if isinstance(e, RunStats) else RunStats(counts={"released": e.num_rows}))
            | beam.CombineGlobally(lambda xs: RunStats.merged(xs))
            | beam.Map(_write_summary, summary_path)
        )
    seconds = time.perf_counter() - t0
    with open(summary_path) as fh:
        result = json.load(fh)
    os.unlink(summary_path)
    rep = result.get("report", {})
    return {
        "bench": "kanon", "mode": "beam", "runner": "FnApiRunner (in-process)", "rows": rows, "qis": qis, "k": spec.k,
        "l": spec.l, "batch_rows": batch_rows, "seconds": round(seconds, 3), "generate_s_included": round(gen_s, 3),
        "released": result.get("released"), "suppressed": result.get("suppressed"),
        "levels": {p: v["name"] for p, v in rep.get("levels", {}).items()}, "k_achieved": rep.get("k_achieved"),
        "search_s": rep.get("search_seconds"), "rows_per_s": round(rows / seconds), "python": platform.python_version(),
    }


REFERENCE_QIS = {
    "date_of_birth": Hierarchy("date", ("month", "year", "decade")),
    "zip": Hierarchy("prefix", (3, 1)),
    "gender": Hierarchy("map", (1,), groups=((("known", ("female", "male")), ("other", ("nonbinary", "unknown"))),)),
    "income": Hierarchy("round", (1000, 10000, 50000)),
    "signup_ts": Hierarchy("date", ("hour", "day", "month", "year")),
    "ip_address": Hierarchy("prefix", (7, 4, 2)),
    "phone": Hierarchy("prefix", (6, 3)),
    "churned": Hierarchy("suppress"),
}


def reference_batches(rows: int, batch_rows: int, qis: int) -> tuple[KAnonSpec, list[pa.RecordBatch]]:
    """The reference customers' QI columns as canonical strings (what the protect stage hands the k-anon stage)."""
    from cloakbeam.schemas.generate import _pools, generate_table
    from cloakbeam.transforms.generalize import canonical_string

    names = list(REFERENCE_QIS)[:qis]
    pools = _pools(0)
    out = []
    for start in range(0, rows, batch_rows):
        t = generate_table(min(batch_rows, rows - start), 0, start, pools)
        cols = {n: canonical_string(t.column(n)) for n in names}
        cols["diagnosis"] = t.column("diagnosis").combine_chunks()
        out.append(pa.RecordBatch.from_pydict(cols))
    spec = KAnonSpec(tuple(QuasiIdentifier(n, REFERENCE_QIS[n]) for n in names), 10, 0.02, "diagnosis", 2)
    return spec, out


def bench_metrics(rows: int, batch_rows: int, qis: int, dataset: str) -> list[dict[str, Any]]:
    import dataclasses

    from cloakbeam.transforms.kanon import METRICS

    t = time.perf_counter()
    if dataset == "reference":
        spec, batches = reference_batches(rows, batch_rows, qis)
    else:
        spec = make_spec(qis)
        batches = [make_batch(i, min(batch_rows, rows - i * batch_rows), qis) for i in range(-(-rows // batch_rows))]
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    merged = merge_frequency_sets([frequency_set({n: c for n, c in zip(b.schema.names, b.columns)}, spec) for b in batches])
    count_s = time.perf_counter() - t
    out = []
    for metric in METRICS:
        mspec = dataclasses.replace(spec, metric=metric)
        t = time.perf_counter()
        plan = make_plan(merged, mspec)
        rep = plan.report
        out.append({
            "bench": "kanon", "mode": "metrics", "dataset": dataset, "metric": metric, "rows": rows, "qis": qis, "k": spec.k,
            "l": spec.l, "suppression_limit": spec.suppression_limit, "frequency_rows": merged.num_rows if merged is not None else 0,
            "count_merge_s": round(count_s, 3), "generate_s": round(gen_s, 3), "search_s": rep["search_seconds"],
            "plan_s": round(time.perf_counter() - t, 3), "lattice_nodes": rep["lattice_nodes"], "nodes_evaluated": rep["nodes_evaluated"],
            "levels": {p: v["name"] for p, v in rep["levels"].items()}, "suppressed": rep["records_suppressed"],
            "metrics": rep["metrics"], "python": platform.python_version(),
        })
    return out


def _write_summary(stats: Any, path: str) -> None:
    with open(path, "w") as fh:
        json.dump({"released": stats.counts["released"], "suppressed": stats.counts["suppressed"],
                   "report": stats.extra.get("k_anonymity", {})}, fh)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=65_536)
    ap.add_argument("--qis", type=int, default=4, help="4, or more to add numeric QIs (search at 8+ QIs)")
    ap.add_argument("--modes", default="functions,beam")
    ap.add_argument("--dataset", default="synthetic", choices=("synthetic", "reference"), help="mode metrics: the rows searched")
    args = ap.parse_args(argv)
    for mode in args.modes.split(","):
        if mode.strip() == "metrics":
            for line in bench_metrics(args.rows, args.batch_rows, args.qis, args.dataset):
                print(json.dumps(line), flush=True)
            continue
        fn = {"functions": bench_functions, "beam": bench_beam}[mode.strip()]
        print(json.dumps(fn(args.rows, args.batch_rows, args.qis)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
