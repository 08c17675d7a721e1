"""`cloakbeam run`, `cloakbeam demo` and `cloakbeam generate`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="protect input files with a policy and write training Parquet plus a manifest",
        description="Read --input files, validate them against --schema, protect every field as --policy says and write "
        "OUT/data/*.parquet, OUT/quarantine/ and OUT/manifest.json. Arguments after a bare '--' go to Beam.",
    )
    run.add_argument("--input", action="append", required=True, metavar="GLOB", help="input files (local glob or gs://, s3:// with Beam extras); repeatable")
    run.add_argument("--schema", required=True, metavar="FILE", help="Avro schema (.avsc): the input contract")
    run.add_argument("--policy", required=True, metavar="FILE", help="policy YAML mapping each field to an action")
    run.add_argument("--output", required=True, metavar="DIR", help="output directory")
    _common_run_args(run)
    run.add_argument("--evaluate", action="store_true", help="after the run, measure re-identification risk and ML utility on a sample (docs/release-evidence.md)")
    run.add_argument("--label", default=None, metavar="FIELD", help="--evaluate: binary training label (default: the schema field of class LABEL)")
    run.add_argument("--holdout", action="append", default=[], metavar="GLOB", help="--evaluate: records the run does not see, for the membership test")
    run.add_argument("--evaluate-sample", type=int, default=20_000, metavar="N", help="--evaluate: rows sampled for models and membership test (default 20000)")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="generate synthetic customers and run the reference policy on embedded defaults",
        description="Generate the reference dataset (1%% dirty records), then run schemas/customers.policy.yaml on the local "
        "runner with a development keyring and SQLite vault under DIR/.cloakbeam, and print a summary.",
    )
    demo.add_argument("--rows", type=int, default=20_000, help="rows to generate (default 20000)")
    demo.add_argument("--out", default="cloakbeam-demo", metavar="DIR", help="work directory (default ./cloakbeam-demo)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--format", choices=("jsonl", "csv", "avro", "parquet"), default="jsonl")
    demo.add_argument("--dirty", type=float, default=0.01, help="fraction of corrupted records (default 0.01)")
    demo.add_argument("--runner", default="direct", help="runner profile (default direct)")
    demo.add_argument("--batch-size", type=int, default=65_536)
    demo.add_argument("--state-dir", default=None, help="local state directory (default DIR/.cloakbeam)")
    demo.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the risk and utility evaluation")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser(
        "generate",
        help="write the synthetic reference dataset (customers) for tests and benchmarks",
        description="Realistic synthetic customer records made with Faker pools, reproducible by --seed, written in chunks.",
    )
    gen.add_argument("--rows", type=int, required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--format", choices=("jsonl", "csv", "avro", "parquet"), default="jsonl")
    gen.add_argument("--out", required=True, metavar="PATH", help="output file")
    gen.add_argument("--dirty", type=float, default=0.0, metavar="FRACTION", help="corrupt this fraction of records in varied ways")
    gen.set_defaults(func=cmd_generate)


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="direct", help="runner profile: direct (default), dask, flink, dataflow")
    p.add_argument("--batch-size", type=int, default=65_536, help="rows per RecordBatch and per output row group (default 65536)")
    p.add_argument("--format", dest="input_format", choices=("jsonl", "csv", "avro", "parquet"), default=None, help="input format (default: from the file extension)")
    p.add_argument("--state-dir", default=None, help="local state directory (default ./.cloakbeam or $CLOAKBEAM_STATE_DIR)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config naming state_dir, keys (KMS) and vault (PostgreSQL DSN env var)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete earlier run in the output directory as a whole (published atomically on local outputs)")
    p.add_argument("--dev", action="store_true", help="development only: create an UNPROTECTED dev keyring pair in the state dir when none is configured")
    p.add_argument("--dask-address", default=None, help="dask scheduler address (runner dask); without it a LocalCluster is started")
    p.add_argument("--workers", type=int, default=None, help="worker processes for local clusters")
    p.add_argument("--streaming", action="store_true", help="watch --input for new files and protect them per event-time window (docs/runners.md)")
    p.add_argument("--window-seconds", type=float, default=None, help="streaming: fixed window size (default 60, or the policy's k_anonymity window)")
    p.add_argument("--allowed-lateness", type=float, default=None, help="streaming: seconds a window accepts late files (default 0)")
    p.add_argument("--poll-seconds", type=float, default=None, help="streaming: how often the local watch lists --input (default 5)")
    p.add_argument("--watch-seconds", type=float, default=None, help="streaming: stop watching after this long (default: forever)")


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {}
    if getattr(args, "dask_address", None):
        opts["dask_address"] = args.dask_address
    if getattr(args, "workers", None):
        opts["workers"] = args.workers
    if getattr(args, "streaming", False):
        opts["streaming"] = True
        for name in ("window_seconds", "allowed_lateness", "poll_seconds", "watch_seconds"):
            if getattr(args, name, None) is not None:
                opts[name] = getattr(args, name)
    else:
        given = [n for n in ("window_seconds", "allowed_lateness", "poll_seconds", "watch_seconds") if getattr(args, n, None) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --streaming runs only")
    return opts


def cmd_run(args: argparse.Namespace) -> int:
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline

    settings = RunSettings(
        inputs=args.input,
        schema=args.schema,
        policy=args.policy,
        output=args.output,
        runner=args.runner,
        batch_size=args.batch_size,
        input_format=args.input_format,
        beam_args=args.beam_args,
        state_dir=args.state_dir,
        config=args.config,
        overwrite=args.overwrite,
        runner_options=_runner_options(args),
        dev=args.dev,
        evaluate=args.evaluate,
        evaluate_label=args.label,
        evaluate_sample=args.evaluate_sample,
        holdout=args.holdout,
    )
    if not args.evaluate and (args.label or args.holdout):
        raise ConfigError("--label and --holdout apply with --evaluate")
    t0 = time.monotonic()
    manifest = run_pipeline(settings)
    print_summary(manifest, time.monotonic() - t0, args.output)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import REFERENCE_POLICY_PATH, SCHEMA_PATH, generate

    if args.rows < 1:
        raise ConfigError("--rows must be at least 1")
    work = Path(args.out).resolve()
    src = work / "input" / f"customers.{args.format}"
    print(f"cloakbeam demo: generating {args.rows:,} synthetic customers ({args.dirty:.0%} dirty) -> {src}", file=sys.stderr)
    generate(src, args.rows, seed=args.seed, fmt=args.format, dirty=args.dirty)
    # Held-out customers of the same population (another seed), never given to the run: the membership test's non-members.
    holdout = work / "input" / f"holdout.{args.format}"
    if args.evaluate:
        generate(holdout, max(200, min(2_000, args.rows // 10)), seed=args.seed + 1_000_003, fmt=args.format, dirty=0.0)
    print(f"cloakbeam demo: running the reference policy on the {args.runner} runner", file=sys.stderr)
    settings = RunSettings(
        inputs=[str(src)],
        schema=str(SCHEMA_PATH),
        policy=str(REFERENCE_POLICY_PATH),
        output=str(work / "output"),
        runner=args.runner,
        batch_size=args.batch_size,
        state_dir=args.state_dir or str(work / ".cloakbeam"),
        overwrite=True,
        beam_args=args.beam_args,
        progress="always",
        dev=True,  # the demo is the one command that makes its own development keyring pair
        evaluate=args.evaluate,
        holdout=[str(holdout)] if args.evaluate else [],
    )
    t0 = time.monotonic()
    manifest = run_pipeline(settings)
    print_summary(manifest, time.monotonic() - t0, settings.output)
    print(f"cloakbeam demo: report {os.path.join(settings.output, 'report.html')}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cloakbeam.schemas.generate import generate

    if args.rows < 0:
        raise ConfigError("--rows must not be negative")
    if not 0.0 <= args.dirty < 1.0:
        raise ConfigError("--dirty must be a fraction between 0 and 1")
    result = generate(args.out, args.rows, seed=args.seed, fmt=args.format, dirty=args.dirty)
    print(f"wrote {result['rows']:,} records ({result['dirty_rows']:,} corrupted) to {result['path']}")
    return 0


def print_summary(manifest: dict[str, Any], seconds: float, output: str) -> None:
    c = manifest["counts"]
    rate = c["input"] / seconds if seconds > 0 else 0.0
    lines = [
        "",
        "cloakbeam run summary",
        "---------------------",
        f"  rows in       {c['input']:>12,}",
        f"  written       {c['written']:>12,}",
        f"  quarantined   {c['quarantined']:>12,}",
        f"  suppressed    {c['suppressed']:>12,}",
        f"  reconciled    {'yes' if manifest.get('reconciled') else 'NO':>12}",
        f"  seconds       {seconds:>12.1f}",
        f"  rows/s        {rate:>12,.0f}",
        "",
        f"  {'field':<16} {'class':<14} action",
    ]
    for path, f in manifest["fields"].items():
        action = f["action"]
        desc = action["action"] + (" (default deny)" if "reason" in action else "")
        lines.append(f"  {path:<16} {f['class']:<14} {desc}")
    for name, report in manifest.get("sections", {}).items():
        summary = report.get("summary") or report.get("statement") if isinstance(report, dict) else None
        if summary:
            lines.append(f"  {name}: {summary}")
    mi = (manifest.get("sections", {}).get("risk") or {}).get("membership_inference") or {}
    if mi:
        lines.append(f"  membership: {mi.get('statement') if mi.get('measured') else 'not measured: ' + str(mi.get('reason'))}")
    out = os.path.abspath(output)
    lines += ["", f"  output        {out}", f"  manifest      {os.path.join(out, 'manifest.json')}"]
    if os.path.exists(os.path.join(out, "report.html")):
        lines.append(f"  report        {os.path.join(out, 'report.html')}")
    lines.append("")
    print("\n".join(lines))
