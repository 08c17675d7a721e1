"""Cost of the release evidence: the reference policy with and without `dp_statistics`, and with `--evaluate`.

    .venv/bin/python benchmarks/bench_evidence.py --rows 20000 [--variants base,dp,dp+evaluate]

base = the reference policy without its dp_statistics section; dp = the reference policy as shipped (three PipelineDP
statistics on the raw records); dp+evaluate = the same with the post-run evaluation (linkage attack over every
record, DCR membership test and two HistGradientBoosting fits on a 20,000-row sample, a held-out file of rows/10).
One JSON line per variant: {"variant", "rows", "seconds", "run_seconds", "evaluate_seconds", "rows_per_s", "cpus"}.
Input generation is not timed; all variants run on the direct runner with one state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=65_536)
    ap.add_argument("--variants", default="base,dp,dp+evaluate")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cloakbeam-bench-evidence"))
    args = ap.parse_args(argv)

    import yaml

    from cloakbeam.cli.main import configure_logging
    from cloakbeam.pipeline import graph
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import REFERENCE_POLICY_PATH, SCHEMA_PATH, generate

    configure_logging(False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, hold = work / f"in-{args.rows}.jsonl", work / f"holdout-{args.rows}.jsonl"
    if not src.exists():
        generate(src, args.rows, seed=42, fmt="jsonl", dirty=0.01)
        generate(hold, max(200, args.rows // 10), seed=43, fmt="jsonl")
    doc = yaml.safe_load(REFERENCE_POLICY_PATH.read_text())
    base = dict(doc)
    base.pop("dp_statistics")
    (work / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    policies = {"base": work / "base.yaml", "dp": REFERENCE_POLICY_PATH, "dp+evaluate": REFERENCE_POLICY_PATH}

    # Time the evaluation step separately by wrapping the launcher's hook.
    spent = {"evaluate": 0.0}
    original = graph._attach_evaluation

    def timed(manifest, run):
        t = time.perf_counter()
        try:
            original(manifest, run)
        finally:
            spent["evaluate"] += time.perf_counter() - t

    graph._attach_evaluation = timed
    for name in args.variants.split(","):
        spent["evaluate"] = 0.0
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        m = run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA_PATH), policy=str(policies[name]), output=str(out),
                                     batch_size=args.batch_size, state_dir=str(work / "state"), overwrite=True, progress=False,
                                     evaluate=name.endswith("evaluate"), holdout=[str(hold)] if name.endswith("evaluate") else []))
        secs = time.perf_counter() - t0
        print(json.dumps({"variant": name, "rows": m["counts"]["input"], "seconds": round(secs, 2),
                          "run_seconds": round(secs - spent["evaluate"], 2), "evaluate_seconds": round(spent["evaluate"], 2),
                          "rows_per_s": round(m["counts"]["input"] / secs), "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
