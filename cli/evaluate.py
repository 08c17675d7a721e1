"""`cloakbeam evaluate`: measured re-identification risk and ML utility of a finished release.

Reads the raw input (the adversary's knowledge and the utility baseline) and the released files that
OUT/manifest.json lists; prints a summary and writes the figures as JSON (`--out`) and, on request, a report page
(`--report`) built from the manifest with the new `risk` and `utility` sections. The signed manifest itself is
never changed. Prints figures only, never a value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a release's re-identification risk and ML utility against its raw input",
        description="Join the released quasi-identifiers to the raw ones (linkage attack), test membership inference with "
        "--holdout records, and train the same HistGradientBoosting model on the raw and the released training split, "
        "scoring both on the test split. Schema and policy default to the ones the manifest names (their SHA-256 must match).",
    )
    p.add_argument("--raw", action="append", required=True, metavar="GLOB", help="the raw input the release was made from; repeatable")
    p.add_argument("--released", required=True, metavar="DIR", help="the run's output directory (with manifest.json)")
    p.add_argument("--label", default=None, metavar="FIELD", help="binary training label (default: the schema field of class LABEL)")
    p.add_argument("--schema", default=None, metavar="FILE", help="Avro schema (default: the manifest's)")
    p.add_argument("--policy", default=None, metavar="FILE", help="policy YAML (default: the manifest's)")
    p.add_argument("--holdout", action="append", default=[], metavar="GLOB", help="records of the same population the run did not see (membership test)")
    p.add_argument("--format", dest="input_format", choices=("jsonl", "csv", "avro", "parquet"), default=None)
    p.add_argument("--sample", type=int, default=20_000, metavar="N", help="rows sampled for the models and the membership test (default 20000)")
    p.add_argument("--state-dir", default=None, help="local state directory holding the keyring (recomputes the raw rows' splits)")
    p.add_argument("--config", default=None, metavar="FILE", help="config naming the keys (as for `run`)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the figures as JSON here")
    p.add_argument("--report", default=None, metavar="FILE", help="write an HTML report of the release with these figures")
    p.set_defaults(func=cmd_evaluate)


def _checked(given: str | None, recorded: dict[str, Any], what: str) -> str:
    path = given or recorded.get("path")
    if not path or not os.path.exists(path):
        raise ConfigError(f"the {what} the manifest names ({recorded.get('path')}) is not readable here; pass --{what}")
    want = recorded.get("sha256")
    if want:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if what == "schema":
            from cloakbeam.schemas.avro import load_schema

            digest = load_schema(path).content_hash()
        if digest != want:
            raise ConfigError(f"{what} {path} is not the one this release was made with (SHA-256 differs from the manifest's)")
    return path


def _keys(args: argparse.Namespace) -> Any:
    from cloakbeam.core.config import key_ref_from, load_config_file, resolve_state_dir
    from cloakbeam.errors import KeyAccessError
    from cloakbeam.keys.service import open_key_service

    config = load_config_file(args.config)
    state = resolve_state_dir(args.state_dir, config, create=False)
    ref = key_ref_from(config, state)
    if ref.provider == "local" and not (ref.path and os.path.exists(ref.path)):
        return None
    try:
        return open_key_service(ref)
    except KeyAccessError:
        return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cloakbeam.pipeline.evaluate import EvaluationSettings, check_label, evaluate_release
    from cloakbeam.pipeline.report import build_report
    from cloakbeam.schemas.avro import load_schema
    from cloakbeam.transforms.policy import load_policy

    out_dir = os.path.abspath(args.released)
    try:
        manifest = json.loads(Path(out_dir, "manifest.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{out_dir} holds no readable manifest.json; point --released at a run's output directory") from None
    schema = load_schema(_checked(args.schema, manifest.get("schema", {}), "schema"))
    policy = load_policy(_checked(args.policy, manifest.get("policy", {}), "policy"), schema)
    check_label(policy, args.label)
    keys = _keys(args)
    try:
        found = evaluate_release(policy, manifest, out_dir, EvaluationSettings(
            inputs=args.raw, label=args.label, holdout=args.holdout, input_format=args.input_format, sample=args.sample, keys=keys))
    finally:
        if keys is not None:
            keys.close()
    print(summary_lines(found))
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
        print(f"  figures       {os.path.abspath(args.out)}")
    if args.report:
        merged = dict(manifest)
        merged["sections"] = {**manifest.get("sections", {}), **found}
        sig_path = Path(out_dir, "manifest.json.sig")
        sig = json.loads(sig_path.read_text()) if sig_path.exists() else None
        Path(args.report).write_text(build_report(merged, sig), encoding="utf-8")
        print(f"  report        {os.path.abspath(args.report)}")
    return 0


def summary_lines(found: dict[str, Any]) -> str:
    """Risk and utility in a few lines for the terminal (figures only)."""
    risk, util = found.get("risk") or {}, found.get("utility") or {}
    lines = ["", "cloakbeam release evidence", "--------------------------"]
    link = risk.get("linkage")
    if link:
        lines.append(f"  linkage       {link['statement']}")
        lines.append(f"                uniquely matched {link['uniquely_matched']:,} of {link['records_released']:,}; "
                     f"expected re-identifications: prosecutor {link['prosecutor']['expected_reidentifications']:g}, "
                     f"journalist {link['journalist']['expected_reidentifications']:g}, marketer {link['marketer']['expected_reidentifications']:g}")
    elif risk:
        lines.append(f"  linkage       {risk.get('statement') or risk.get('reason')}")
    mi = risk.get("membership_inference") or {}
    lines.append(f"  membership    {mi.get('statement') if mi.get('measured') else 'not measured: ' + str(mi.get('reason'))}")
    lines.append(f"  utility       {util.get('summary') if util.get('measured') else 'not measured: ' + str(util.get('reason'))}")
    return "\n".join(lines) + "\n"

