"""Runner comparison: the reference policy on the same input on each local runner profile, one JSON line each.

    .venv/bin/python benchmarks/bench_runners.py --rows 100000 --files 4 [--runners direct,direct2,dask]

direct = FnApiRunner in process; direct2 = FnApiRunner with 2 SDK worker processes; dask = Beam's DaskRunner on a
LocalCluster of 2 worker processes (cluster start-up and shut-down included in `seconds`). Each line: {"runner", "rows", "files", "seconds", "rows_per_s",
"written", "quarantined", "suppressed", "output_files"}. Input generation is not timed. All runs share one state
directory (same keys and vault), so the outputs are comparable value for value (tests/test_runners_equal.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

PROFILES = {"direct": ("direct", {}), "direct2": ("direct", {"workers": 2}), "dask": ("dask", {"workers": 2})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="total rows, split evenly over --files")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16_384)
    ap.add_argument("--runners", default="direct,direct2,dask")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cloakbeam-bench-runners"))
    args = ap.parse_args(argv)

    from cloakbeam.cli.main import configure_logging
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import REFERENCE_POLICY_PATH, SCHEMA_PATH, generate

    configure_logging(False)
    work = Path(args.work)
    inp = work / f"in-{args.rows}-{args.files}"
    if not inp.exists():
        tmp = work / "in.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(args.files):
            generate(tmp / f"part-{i}.jsonl", args.rows // args.files, seed=i, fmt="jsonl", dirty=0.0)
        tmp.rename(inp)
    for name in args.runners.split(","):
        runner, opts = PROFILES[name]
        t0 = time.perf_counter()
        m = run_pipeline(RunSettings(dev=True, inputs=[str(inp / "*.jsonl")], schema=str(SCHEMA_PATH), policy=str(REFERENCE_POLICY_PATH),
                                     output=str(work / f"out-{name}"), runner=runner, batch_size=args.batch_size,
                                     state_dir=str(work / "state"), overwrite=True, progress=False, runner_options=dict(opts)))
        secs = time.perf_counter() - t0
        c = m["counts"]
        print(json.dumps({"runner": name, "rows": c["input"], "files": args.files, "batch_size": args.batch_size, "seconds": round(secs, 2),
                          "rows_per_s": round(c["input"] / secs), "written": c["written"], "quarantined": c["quarantined"],
                          "suppressed": c["suppressed"], "output_files": len(m["outputs"]), "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
