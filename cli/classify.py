"""`cloakbeam classify`: propose a class and an action for every field from a sample of the data.

    cloakbeam classify --input 'raw/*.jsonl' [--schema customers.avsc] [--sample 10000] [--out proposed-policy.yaml]

Without a schema, JSONL and CSV samples are read with `pyarrow.json` / `pyarrow.csv` and their schema inferred
(CSV columns are read as text so leading zeros and 16-digit card numbers survive; numbers and booleans are then
recognised by shape). With a schema, the sample is read by the pipeline's own reader (invalid records are
skipped and counted). The table shows field, class, confidence, where the class came from and the evidence
(detector hit rates, counts); the YAML is a starting point for a reviewer, never applied automatically.
Output holds counts and rates only, never a sampled value.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from cloakbeam.errors import ConfigError

DEFAULT_SAMPLE = 10_000

# Suggested action per class (a reviewer edits this; `generalize` levels belong to the k-anonymity section).
SUGGESTIONS: dict[str, tuple[Any, str]] = {
    "PERSON_NAME": ({"action": "pseudonymize", "kind": "name"}, "realistic keyed surrogate"),
    "EMAIL": ({"action": "mask", "method": "email"}, "keeps the domain; use tokenize when joins need the address"),
    "PHONE": ({"action": "mask", "method": "phone", "keep_last": 2}, "keeps the last two digits"),
    "US_SSN": ("drop", "direct identifier; tokenize if it must stay joinable"),
    "CREDIT_CARD": ("drop", "direct identifier; tokenize if it must stay joinable"),
    "DATE_OF_BIRTH": ("drop", "quasi-identifier: consider generalize (year / age band) under k-anonymity"),
    "POSTAL_CODE": ("drop", "quasi-identifier: consider generalize (3-digit prefix) under k-anonymity"),
    "IP_ADDRESS": ({"action": "mask", "method": "ip"}, "truncated to /24 (IPv4) and /48 (IPv6)"),
    "GENDER": ("keep", "quasi-identifier: include it in k-anonymity"),
    "FREE_TEXT": ({"action": "scrub"}, "add link: [<the record's name/email/phone fields>]"),
    "IDENTIFIER": ("drop", "tokenize if records must stay joinable"),
    "NUMERIC": ("keep", ""),
    "LABEL": ("keep", "training label"),
    "OTHER": ("keep", "REVIEW: unknown content; the classification guard fails the run if SSNs or cards show up"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="propose a data class and a protection action for every field from a data sample",
        description="Sample --input, run the content detectors, combine them with the schema's class annotations and "
        "field-name hints, print a table (field, class, confidence, source, evidence) and write a proposed policy.",
    )
    p.add_argument("--input", action="append", required=True, metavar="GLOB", help="input files (JSONL, CSV, Parquet; Avro with --schema); repeatable")
    p.add_argument("--schema", default=None, metavar="FILE", help="Avro schema; without it the schema is inferred from the sample")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N", help=f"records to sample (default {DEFAULT_SAMPLE})")
    p.add_argument("--format", default=None, choices=("jsonl", "csv", "avro", "parquet"), help="input format (default: from the extension)")
    p.add_argument("--out", default="proposed-policy.yaml", metavar="FILE", help="where to write the proposed policy (default proposed-policy.yaml)")
    p.add_argument("--dataset", default=None, help="dataset name for the proposed policy (default: from the first file name)")
    p.add_argument("--json", action="store_true", help="print the classification as JSON instead of a table")
    p.add_argument("--max-unique-fraction", type=float, default=None, metavar="F",
                   help="uniqueness threshold for quasi-identifier candidates (default 0.01, the scan's default)")
    p.set_defaults(func=cmd_classify)


def _files(patterns: Iterable[str]) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
        if not hits:
            raise ConfigError(f"--input {pat} matches no file")
        out += [h for h in hits if os.path.isfile(h)]
    if not out:
        raise ConfigError("--input matches directories only; name files or use a glob such as 'dir/*.jsonl'")
    return out


def _format(path: str, explicit: str | None) -> str:
    from cloakbeam.transforms.ingest import detect_format

    try:
        return detect_format(path, explicit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _head_lines(path: str, n: int, header: bool) -> bytes:
    """The first n records' lines (plus the header line), decoded leniently: bad UTF-8 becomes U+FFFD."""
    lines = []
    with open(path, "rb") as fh:
        for raw in fh:
            lines.append(raw.decode("utf-8", errors="replace").encode("utf-8"))
            if len(lines) >= n + (1 if header else 0):
                break
    return b"".join(lines)


def _infer_jsonl(path: str, n: int) -> tuple[pa.Table, int]:
    """Schema inference by pyarrow.json over the sample; lines that are not JSON objects are skipped (counted)."""
    import pyarrow.json as pj

    data = _head_lines(path, n, header=False)
    try:
        return pj.read_json(io.BytesIO(data)), 0
    except pa.ArrowInvalid:
        pass
    good, skipped = [], 0
    for line in data.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                good.append(line)
                continue
        except ValueError:
            pass
        skipped += int(bool(line.strip()))
    try:
        return pj.read_json(io.BytesIO(b"\n".join(good) + b"\n")), skipped
    except pa.ArrowInvalid:
        # Conflicting types across lines (a number where text is usual): read every value as text.
        rows = [{k: (v if isinstance(v, str) or v is None else json.dumps(v)) for k, v in json.loads(line).items()} for line in good]
        return pa.Table.from_pylist(rows), skipped


def _infer_csv(path: str, n: int) -> tuple[pa.Table, int]:
    """pyarrow.csv over the sample, every column read as text. Lines are screened one by one first (a broken
    quote would otherwise swallow the lines after it); lines that do not parse to the header's width are skipped."""
    import csv

    import pyarrow.csv as pcsv

    lines = _head_lines(path, n, header=True).splitlines(keepends=True)
    if not lines:
        return pa.table({}), 0
    header = next(csv.reader([lines[0].decode()], strict=True))
    good, skipped = [lines[0]], 0
    for line in lines[1:]:
        try:
            ok = len(next(csv.reader([line.decode()], strict=True))) == len(header)
        except (csv.Error, StopIteration):
            ok = False
        if ok:
            good.append(line)
        elif line.strip():
            skipped += 1
    table = pcsv.read_csv(
        io.BytesIO(b"".join(good)),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=True),
    )
    return table, skipped


def _read_parquet(path: str, n: int) -> pa.Table:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    batches, rows = [], 0
    for b in pf.iter_batches(batch_size=min(n, 65_536)):
        batches.append(b)
        rows += b.num_rows
        if rows >= n:
            break
    return pa.Table.from_batches(batches, schema=pf.schema_arrow).slice(0, n)


def _read_with_schema(files: list[str], schema: Any, n: int, fmt: str | None) -> tuple[pa.Table, int]:
    from cloakbeam.transforms.ingest import Rejected, read_source

    batches, rows, rejected = [], 0, 0
    for path in files:
        with open(path, "rb") as fh:
            for item in read_source(fh, path, _format(path, fmt), schema, 4096):
                if isinstance(item, Rejected):
                    rejected += item.records
                    continue
                batches.append(item)
                rows += item.num_rows
                if rows >= n:
                    break
        if rows >= n:
            break
    if not batches:
        return pa.Table.from_batches([], schema=schema.arrow), rejected
    return pa.Table.from_batches(batches).slice(0, n), rejected


def sample_table(files: list[str], n: int, schema: Any = None, fmt: str | None = None) -> tuple[pa.Table, int]:
    """Up to n records from `files` and the number of records skipped as unreadable."""
    if schema is not None:
        return _read_with_schema(files, schema, n, fmt)
    tables, skipped, rows = [], 0, 0
    for path in files:
        kind = _format(path, fmt)
        if kind == "jsonl":
            t, s = _infer_jsonl(path, n - rows)
        elif kind == "csv":
            t, s = _infer_csv(path, n - rows)
        elif kind == "parquet":
            t, s = _read_parquet(path, n - rows), 0
        else:
            raise ConfigError(f"{path}: {kind} input needs --schema (Avro files are read against the schema)")
        tables.append(t)
        skipped += s
        rows += t.num_rows
        if rows >= n:
            break
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise ConfigError("the input files have incompatible columns; classify them one at a time or pass --schema") from None
    return table, skipped


def classify_table(table: pa.Table, schema: Any = None) -> list[dict[str, Any]]:
    """One row per leaf field: path, class, confidence, source, evidence, suggested action."""
    from cloakbeam.transforms.classify import infer_class, profile_column
    from cloakbeam.transforms.protect import flatten_columns

    columns = flatten_columns(table)
    out = []
    for path, col in columns.items():
        declared = None
        if schema is not None and path in schema.fields:
            declared = schema.fields[path].declared_class
        prof = profile_column(col)
        inf = infer_class(path, col.type, declared, None, prof)
        contradiction = None
        for det in ("US_SSN", "CREDIT_CARD"):
            rate = prof.rate(det, contains=True)
            if rate > 0 and inf.cls not in (det, "FREE_TEXT"):
                contradiction = f"{det} found in {rate:.1%} of values"
        out.append(
            {
                "field": path,
                "class": inf.cls,
                "confidence": inf.confidence,
                "source": inf.source,
                "evidence": inf.evidence,
                "warning": contradiction,
                "suggested": SUGGESTIONS[inf.cls][0] if inf.cls in SUGGESTIONS else "drop",
            }
        )
    return out


#: Classes that are quasi-identifiers by nature: the proposal declares them to k-anonymity.
QI_CLASSES = {"DATE_OF_BIRTH": {"hierarchy": "date", "levels": ["month", "year", "decade"]},
              "POSTAL_CODE": {"hierarchy": "prefix", "lengths": [3, 1]},
              "GENDER": {"hierarchy": "suppress"}}
_VALUE_REVEALING = {"keep", "generalize"}  # actions that release the raw value (masked and scrubbed columns differ from it)
_ROUND_STEPS = [m * 10 ** e for e in range(0, 8) for m in (1, 2.5, 5)]
_TRUNCATE = ("hour", "day", "month", "year")


def _action_name(action: Any) -> str:
    return action if isinstance(action, str) else action.get("action", "")


def propose_quasi_identifiers(table: pa.Table, rows: list[dict[str, Any]], limit: float, max_combination: int = 3) -> dict[str, Any]:
    """The uniqueness scan on the raw sample: which released-as-is columns single out more than `limit` of the
    sampled records, and a generalization for each that brings it under the limit on the sample (rounding for
    numbers, truncation for times), or a quasi-identifier declaration. Counts and fractions only; the steps
    are round numbers, never a sampled value."""
    from cloakbeam.transforms.protect import flatten_columns
    from cloakbeam.transforms.uniqueness import ScanSpec, combinations, evaluate, sketch_batch

    columns = flatten_columns(table)
    revealing = [r["field"] for r in rows if _action_name(r["suggested"]) in _VALUE_REVEALING or r["class"] in QI_CLASSES]
    if not revealing:
        return {"columns": {}, "combinations": []}
    n = table.num_rows
    spec = ScanSpec(tuple(revealing), tuple(combinations(revealing, max_combination)), (), (), 10, limit, max_combination,
                    max(1024, n), b"cloakbeam-classify"[:16])
    rep = evaluate(sketch_batch({c: columns[c] for c in revealing}, spec), spec)
    singles: dict[str, float] = {}
    for f in rep["riskiest"] + rep["failing"]:
        if len(f["columns"]) == 1:
            singles[f["columns"][0]] = f["unique_fraction"]
    out: dict[str, Any] = {"columns": {}, "combinations": [f for f in rep["failing"] if len(f["columns"]) > 1]}
    by_field = {r["field"]: r for r in rows}
    for path in revealing:
        r = by_field[path]
        u = singles.get(path, 0.0)
        if r["class"] in QI_CLASSES:
            out["columns"][path] = {"unique_fraction": u, "proposal": "quasi-identifier", "hierarchy": QI_CLASSES[r["class"]]}
            continue
        if u <= limit:
            continue
        col = columns[path]
        proposal = _coarsen(col, limit, spec)
        out["columns"][path] = {"unique_fraction": u, **proposal}
    return out


def _unique_fraction(col: pa.Array, spec: Any) -> float:
    from dataclasses import replace

    from cloakbeam.transforms.uniqueness import evaluate, sketch_batch

    one = replace(spec, columns=("c",), combos=((0,),))
    return float(evaluate(sketch_batch({"c": col}, one), one)["riskiest"][0]["unique_fraction"])


def _coarsen(col: pa.Array, limit: float, spec: Any) -> dict[str, Any]:
    """The finest rounding or truncation that brings one column under the limit on the sample."""
    import pyarrow.compute as pc

    from cloakbeam.transforms.generalize import _as_floats, _truncate, round_half_up

    t = col.type
    vals = None
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t):
        parsed, ok = _as_floats(col if not pa.types.is_string(t) else col)
        nonnull = len(col) - col.null_count
        if nonnull and ok.sum() >= 0.95 * nonnull:  # numbers, give or take a few malformed values
            vals = np.where(ok, parsed, np.nan)
    if vals is not None:
        for step in _ROUND_STEPS:
            rounded = pa.array(np.where(np.isnan(vals), np.nan, round_half_up(np.nan_to_num(vals), step)), mask=np.isnan(vals))
            after = _unique_fraction(rounded, spec)
            if after <= limit:
                to: Any = int(step) if float(step).is_integer() else step
                return {"proposal": "generalize", "action": {"action": "generalize", "method": "round", "to": to}, "after": after}
    ts = None
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        ts = col
    elif pa.types.is_string(t):
        ts = pc.strptime(pc.utf8_slice_codeunits(col, 0, 19), format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True)
        if ts.null_count == len(ts):
            ts = pc.strptime(pc.utf8_slice_codeunits(col, 0, 19), format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
        if ts.null_count > col.null_count + len(col) // 20:
            ts = None
    if ts is not None:
        for unit in _TRUNCATE:
            if unit == "hour" and pa.types.is_date(ts.type):
                continue
            after = _unique_fraction(_truncate(ts, unit), spec)
            if after <= limit:
                method = "truncate" if (pa.types.is_timestamp(t) or pa.types.is_date(t)) else "date"
                return {"proposal": "generalize", "action": {"action": "generalize", "method": method, "to": unit}, "after": after}
    return {"proposal": "quasi-identifier", "hierarchy": {"hierarchy": "suppress"}}


def proposed_policy_yaml(rows: list[dict[str, Any]], dataset: str, note: str, qis: dict[str, Any] | None = None,
                         limit: float = 0.01) -> str:
    """A reviewable policy: one line per field with the class, confidence and evidence as a comment; columns
    that single out more than `limit` of the sample are generalized or declared quasi-identifiers."""
    qis = qis or {"columns": {}, "combinations": []}
    rows = [dict(r) for r in rows]
    declared: dict[str, Any] = {}
    for r in rows:
        prop = qis["columns"].get(r["field"])
        if prop is None:
            continue
        u = f"{prop['unique_fraction']:.1%} of sampled records unique"
        if prop["proposal"] == "generalize":
            r["suggested"] = prop["action"]
            r["qi_note"] = f"uniqueness: {u} at full detail, {prop['after']:.1%} after this generalization"
        else:
            r["suggested"] = {"action": "generalize", "level": "auto"}
            declared[r["field"]] = prop["hierarchy"]
            r["qi_note"] = f"quasi-identifier ({u}): k_anonymity below chooses its level"
    lines = [
        f"# Proposed by `cloakbeam classify` ({note}). REVIEW EVERY LINE before use:",
        "# the class comes from schema annotations, content detectors and field names; the action is a suggestion.",
        "version: 1",
        f"dataset: {dataset}",
        "fields:",
    ]
    linkable = [r["field"] for r in rows if r["class"] in ("PERSON_NAME", "EMAIL", "PHONE", "US_SSN")]
    for r in rows:
        action = r["suggested"]
        if r["class"] == "FREE_TEXT" and linkable:
            action = {"action": "scrub", "link": linkable}
        text = action if isinstance(action, str) else json.dumps(action).replace('"', "")
        why = SUGGESTIONS.get(r["class"], ("", ""))[1] if action == r["suggested"] else "linked to the record's own PII fields"
        comment = f"{r['class']} ({r['source']}, confidence {r['confidence']:.2f}; {r['evidence']})"
        if r["warning"]:
            comment += f" WARNING: {r['warning']}"
        if r.get("qi_note"):
            why = r["qi_note"]
        if why:
            comment += f" -- {why}"
        key = r["field"] if all(c.isalnum() or c in "._-" for c in r["field"]) else json.dumps(r["field"])
        if not _is_avro_name(r["field"]):
            safe = avro_safe_name(r["field"])
            comment += (f" -- NOTE: '{r['field']}' is not an Avro name; name the schema field '{safe}' with "
                        f"\"cloakbeam.source_name\": \"{r['field']}\" and use '{safe}' here")
        lines.append(f"  {key}: {text}  # {comment}")
    if declared:
        lines += ["# Quasi-identifiers: k-anonymity picks their levels (docs/k-anonymity.md); REVIEW k and the hierarchies.",
                  "k_anonymity:", "  k: 10", "  suppression_limit: 0.02", "  quasi_identifiers:"]
        lines += [f"    {p}: {json.dumps(h).replace(chr(34), '')}" for p, h in declared.items()]
    for f in qis.get("combinations", [])[:10]:
        lines.append(f"# uniqueness: {' + '.join(f['columns'])} single out {f['unique_fraction']:.1%} of sampled records together; "
                     "consider declaring them quasi-identifiers")
    lines += ["# The uniqueness scan of the release (on by default): fails the run when a released column or combination",
              "# of up to three singles out more than this share of records.",
              "uniqueness:", f"  max_unique_fraction: {limit}"]
    return "\n".join(lines) + "\n"


def _is_avro_name(name: str) -> bool:
    return all(_is_avro_part(p) for p in name.split("."))


def _is_avro_part(part: str) -> bool:
    return bool(part) and (part[0].isalpha() or part[0] == "_") and all(c.isascii() and (c.isalnum() or c == "_") for c in part)


def avro_safe_name(name: str) -> str:
    """A valid Avro field name for an input column name (`marital-status` -> `marital_status`)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name) or "_"
    return safe if safe[0].isalpha() or safe[0] == "_" else "_" + safe


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("FIELD", "CLASS", "CONF", "SOURCE", "EVIDENCE")
    body = [(r["field"], r["class"], f"{r['confidence']:.2f}", r["source"], r["evidence"] + (f"  !! {r['warning']}" if r["warning"] else "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*row) for row in [head, *body])


def cmd_classify(args: argparse.Namespace) -> int:
    if args.sample < 1:
        raise ConfigError("--sample must be a positive number of records")
    files = _files(args.input)
    schema = None
    if args.schema:
        from cloakbeam.schemas.avro import load_schema

        schema = load_schema(args.schema)
    table, skipped = sample_table(files, args.sample, schema, args.format)
    if table.num_rows == 0:
        raise ConfigError("the sample holds no readable record; check --input and --format")
    rows = classify_table(table, schema)
    limit = 0.01 if args.max_unique_fraction is None else args.max_unique_fraction
    if not 0 < limit < 1:
        raise ConfigError("--max-unique-fraction must be a share between 0 and 1, e.g. 0.01")
    qis = propose_quasi_identifiers(table, rows, limit)
    dataset = args.dataset or "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(files[0]).split(".")[0]) or "dataset"
    note = f"{table.num_rows} sampled records" + (f", {skipped} unreadable skipped" if skipped else "") + (f", schema {args.schema}" if schema else ", inferred schema")
    text = proposed_policy_yaml(rows, dataset, note, qis, limit)
    tmp = args.out + ".partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.out)
    if args.json:
        json.dump({"sampled": table.num_rows, "skipped": skipped, "fields": rows, "quasi_identifier_candidates": qis},
                  sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_table(rows))
        for path, prop in qis["columns"].items():
            print(f"quasi-identifier candidate: {path} ({prop['unique_fraction']:.1%} of sampled records unique) -> "
                  + (json.dumps(prop["action"]).replace('"', "") if prop["proposal"] == "generalize" else "declared to k_anonymity"))
        print(f"\n{table.num_rows} records sampled" + (f" ({skipped} unreadable skipped)" if skipped else "") + f"; proposed policy written to {args.out}")
    return 0
