"""End-to-end pipeline benchmark: generate N reference rows once, run the reference policy, print one JSON line.

    .venv/bin/python benchmarks/bench_pipeline.py --rows 100000 [--format jsonl] [--runner direct] [--dirty 0.01]

Output: {"rows", "seconds", "rows_per_s", "peak_rss_mb", "runner", "format", "batch_size", "written",
"quarantined", "suppressed"}. Generation is not timed; the input is cached under --work by (rows, seed, format,
dirty). peak_rss_mb is the larger of this process's and its children's peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", default="jsonl", choices=("jsonl", "csv", "avro", "parquet"))
    ap.add_argument("--dirty", type=float, default=0.0)
    ap.add_argument("--runner", default="direct")
    ap.add_argument("--batch-size", type=int, default=65_536)
    ap.add_argument("--policy", default=None, help="policy file (default: the reference policy)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cloakbeam-bench"))
    args = ap.parse_args(argv)

    from cloakbeam.cli.main import configure_logging
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import REFERENCE_POLICY_PATH, SCHEMA_PATH, generate

    configure_logging(False)
    work = Path(args.work)
    src = work / f"customers-{args.rows}-{args.seed}-{args.dirty}.{args.format}"
    if not src.exists():
        generate(src, args.rows, seed=args.seed, fmt=args.format, dirty=args.dirty)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    settings = RunSettings(
        dev=True,
        inputs=[str(src)],
        schema=str(SCHEMA_PATH),
        policy=args.policy or str(REFERENCE_POLICY_PATH),
        output=str(out),
        runner=args.runner,
        batch_size=args.batch_size,
        state_dir=str(work / ".cloakbeam"),
        progress=False,
    )
    t0 = time.perf_counter()
    manifest = run_pipeline(settings)
    seconds = time.perf_counter() - t0
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    c = manifest["counts"]
    print(json.dumps({
        "rows": args.rows, "seconds": round(seconds, 2), "rows_per_s": round(args.rows / seconds), "peak_rss_mb": round(peak_kb / 1024),
        "runner": args.runner, "format": args.format, "batch_size": args.batch_size,
        "written": c["written"], "quarantined": c["quarantined"], "suppressed": c["suppressed"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
