"""The run manifest: what went in, what came out, under which schema, policy, keys and code, and proof that
every record is accounted for (input = written + quarantined + suppressed).

Assembled by the launcher from the merged RunStats the workers emitted; written atomically to
OUT/manifest.json and then signed when the key layer provides a signer. It holds names, counts, hashes and
class labels only, never a record value or key material.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from typing import Any

from cloakbeam import __version__
from cloakbeam.core import fsio
from cloakbeam.core.stats import RunStats
from cloakbeam.errors import ReconciliationError

MANIFEST_NAME = "manifest.json"
FORMAT = "cloakbeam-manifest/1"


def _versions() -> dict[str, str]:
    import apache_beam
    import pyarrow

    return {"cloakbeam": __version__, "apache_beam": apache_beam.__version__, "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def field_report(policy: Any) -> dict[str, dict[str, Any]]:
    """Per leaf field: class, where the class came from, and the action (or why it was dropped)."""
    section = policy.sections.get("classification")
    classes = dict(section.field_classes()) if section is not None and hasattr(section, "field_classes") else {}
    sources = dict(section.class_sources()) if section is not None and hasattr(section, "class_sources") else {}
    out: dict[str, dict[str, Any]] = {}
    for path in policy.schema.leaf_paths:
        info = policy.schema.fields[path]
        cls = classes.get(path) or info.declared_class or "OTHER"
        src = sources.get(path) or ("schema annotation" if info.declared_class else "default")
        action = policy.actions.get(path)
        entry: dict[str, Any] = {"class": cls, "class_source": src}
        if action is None:
            entry["action"] = {"action": "drop", "reason": "not mentioned in the policy (default deny)"}
        else:
            entry["action"] = action.describe()
        out[path] = entry
    return out


def unreadable_regions(stats: RunStats) -> list[dict[str, Any]]:
    """Damaged regions of the inputs whose record count is unknown (a truncated Parquet footer, a damaged Avro
    header or block count, a reader that failed mid-file). Their records are in no count: listed, never silent."""
    out = []
    for path, info in sorted(stats.inputs.items()):
        for d in info.get("damaged", []):
            if d.get("records") == "unknown":
                out.append({"path": path, "location": d["location"], "reason": d["reason"], "records": "unknown"})
    return out


def limits_report(policy: Any) -> dict[str, Any]:
    """The limits in force for this run: per-record caps (policy `limits`) and the fixed document caps."""
    from cloakbeam.core.limits import MAX_YAML_BYTES, MAX_YAML_DEPTH, IngestLimits

    record = policy.sections.get("limits") or IngestLimits()
    return {**record.to_json(), "max_yaml_bytes": MAX_YAML_BYTES, "max_yaml_depth": MAX_YAML_DEPTH}


def stage_seconds(stats: RunStats) -> dict[str, float]:
    """Stage timers (`RunStats.timers`): wall seconds per stage, summed across workers and batches; launcher-side
    `prepare` and `graph` are measured once. Names: read, protect, protect.<action family> (classify, tokenize,
    scrub, encrypt, ...), write, dp_statistics, prepare, graph, and any a section adds (k_anonymity, uniqueness)."""
    timers = getattr(stats, "timers", None) or {}
    return {name: round(float(sec), 4) for name, sec in sorted(timers.items())}


def reconcile(counts: dict[str, int], stats: RunStats) -> list[str]:
    """Every way the counts fail to add up, as sentences; empty when they reconcile.

    `input` counts the records that could be counted. A damaged region whose count is unknown adds nothing to
    any count: it is declared in its input's `damaged` list with records "unknown", listed in the manifest's
    `unreadable` section and has a quarantine entry counting 0 records, so it is accounted for, never silent."""
    problems = []
    for path, info in sorted(stats.inputs.items()):
        known = sum(int(d["records"]) for d in info.get("damaged", []) if d.get("records") != "unknown")
        if known > int(info.get("records", 0)):
            problems.append(f"input {path}: damaged regions hold {known} records but the file counts {info.get('records', 0)}")
    total = counts["written"] + counts["quarantined"] + counts["suppressed"]
    if counts["input"] != total:
        problems.append(
            f"input records ({counts['input']}) != written ({counts['written']}) + quarantined ({counts['quarantined']}) + suppressed ({counts['suppressed']})"
        )
    data_rows = sum(f.rows for f in stats.files if f.kind == "data")
    if data_rows != counts["written"]:
        problems.append(f"rows in output files ({data_rows}) != records counted as written ({counts['written']})")
    q_rows = sum(f.rows for f in stats.files if f.kind == "quarantine")
    if q_rows != counts["quarantined"]:
        problems.append(f"entries in quarantine files ({q_rows}) != records counted as quarantined ({counts['quarantined']})")
    in_rows = sum(int(i.get("records", 0)) for i in stats.inputs.values())
    if in_rows != counts["input"]:
        problems.append(f"records counted per input file ({in_rows}) != input records ({counts['input']})")
    return problems


def build_manifest(
    *,
    run_id: str,
    started: dt.datetime,
    finished: dt.datetime,
    runner: str,
    policy: Any,
    stats: RunStats,
    key_ref: dict[str, Any] | None = None,
    streaming: bool = False,
) -> dict[str, Any]:
    counts = {k: int(stats.counts.get(k, 0)) for k in ("input", "written", "quarantined", "suppressed")}
    sections = {}
    for name, section in policy.sections.items():
        if hasattr(section, "report"):
            sections[getattr(section, "manifest_name", name)] = section.report(stats)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "seconds": round((finished - started).total_seconds(), 3),
        "versions": _versions(),
        "runner": runner,
        "mode": "streaming" if streaming else "batch",
        "inputs": [{"path": p, **v} for p, v in sorted(stats.inputs.items())],
        "schema": {"path": policy.schema.source, "sha256": policy.schema.content_hash()},
        "policy": {"path": policy.source, "sha256": policy.content_hash, "dataset": policy.dataset},
        "fields": field_report(policy),
        "dropped_fields": policy.dropped,
        "dropped_by_default_deny": list(policy.unmentioned),
        "counts": counts,
        "quarantine_reasons": dict(sorted(stats.reasons.items())),
        "unreadable": unreadable_regions(stats),
        "limits": limits_report(policy),
        "outputs": [f.to_json() for f in stats.files if f.kind == "data"],
        "quarantine": [f.to_json() for f in stats.files if f.kind == "quarantine"],
        "field_stats": dict(sorted(stats.fields.items())),
        "sections": sections,
        "stages": stage_seconds(stats),
    }
    if key_ref is not None:
        manifest["keys"] = key_ref
    if stats.extra:
        manifest["extra"] = stats.extra
    problems = reconcile(counts, stats)
    manifest["reconciled"] = not problems
    if manifest["unreadable"]:
        n = len(manifest["unreadable"])
        files = len({u["path"] for u in manifest["unreadable"]})
        manifest["reconciliation_note"] = (
            f"{n} damaged region(s) in {files} input file(s) hide their record count; they are quarantined and listed under "
            "'unreadable', and the counts cover every record that could be counted"
        )
    if problems:
        manifest["reconciliation_problems"] = problems
    return manifest


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> str:
    path = fsio.join(out_dir, MANIFEST_NAME)
    with fsio.atomic_writer(path) as w:
        w.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    return path


def check_reconciled(manifest: dict[str, Any]) -> None:
    if not manifest.get("reconciled", False):
        raise ReconciliationError("manifest counts do not reconcile: " + "; ".join(manifest.get("reconciliation_problems", [])))
