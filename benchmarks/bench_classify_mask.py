"""Benchmark: classification, masking, pseudonymization and scrubbing throughput on the reference dataset.

    .venv/bin/python benchmarks/bench_classify_mask.py [--rows 1000000] [--batch 65536] [--only NAME ...]

Prints one JSON line per measurement: {"bench": ..., "rows": ..., "seconds": ..., "rows_per_s": ...}. Timings
are wall-clock on one core of this machine, after generating the data in memory (not timed). Each measured
function is the plain code the pipeline calls (no Beam), run over RecordBatches of --batch rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from cloakbeam.keys.service import KeyRef, ensure_local_keyring
from cloakbeam.transforms.registry import ActionContext


class _Runtime:
    def __init__(self, keys: KeyRef) -> None:
        self.keys, self.run_id, self.dataset_id = keys, "bench", "customers"


def _ctx() -> ActionContext:
    path = Path(tempfile.mkdtemp()) / "keyring.json"
    ensure_local_keyring(path)
    return ActionContext(_Runtime(KeyRef(provider="local", path=str(path))))


def _data(rows: int, batch: int) -> list[pa.RecordBatch]:
    from cloakbeam.schemas.generate import _pools, generate_table

    pools = _pools(1)
    out: list[pa.RecordBatch] = []
    for start in range(0, rows, 50_000):
        t = generate_table(min(50_000, rows - start), 1, start, pools)
        out.extend(t.to_batches())
    table = pa.Table.from_batches(out)
    return table.combine_chunks().to_batches(max_chunksize=batch)


def _emit(name: str, rows: int, seconds: float, **extra) -> None:
    print(json.dumps({"bench": name, "rows": rows, "seconds": round(seconds, 3), "rows_per_s": int(rows / seconds) if seconds else None, **extra}), flush=True)


def _timed(name: str, batches: list[pa.RecordBatch], fn: Callable[[pa.RecordBatch], None], **extra) -> None:
    rows = sum(b.num_rows for b in batches)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    _emit(name, rows, time.perf_counter() - t0, **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=65_536)
    ap.add_argument("--scrub-rows", type=int, default=200_000, help="rows for the (per-row) scrub measurement")
    ap.add_argument("--only", nargs="*", default=None, help="run only measurements whose name starts with one of these")
    args = ap.parse_args()

    from cloakbeam.schemas.avro import load_schema
    from cloakbeam.schemas.generate import SCHEMA_PATH
    from cloakbeam.transforms.detectors import evaluate
    from cloakbeam.transforms.policy import compile_policy
    from cloakbeam.transforms.protect import flatten_columns
    from cloakbeam.transforms.pseudonymize import SurrogateGenerator
    from cloakbeam.transforms.registry import get_action

    t0 = time.perf_counter()
    batches = _data(args.rows, args.batch)
    _emit("generate_input(untimed_setup)", args.rows, time.perf_counter() - t0)
    schema = load_schema(SCHEMA_PATH)
    want = lambda name: args.only is None or any(name.startswith(p) for p in args.only)  # noqa: E731
    cols = [flatten_columns(b) for b in batches]
    by_batch = list(zip(batches, cols))

    def policy(fields: dict, section: dict | None = None):
        raw = {"version": 1, "dataset": "customers", "fields": fields}
        if section is not None:
            raw["classification"] = section
        return compile_policy(raw, schema)

    ref_fields = {"gender": "keep", "income": "keep", "diagnosis": "keep", "signup_ts": "keep", "churned": "keep"}
    # Classification: the per-batch check exactly as protect_batch runs it (all string fields profiled on a
    # strided sample, clear fields scanned in full by the guard detectors).
    for label, section in (("classify.check(default sample 4096/batch)", None), ("classify.check(full scan, sample_rows=0)", {"sample_rows": 0})):
        if not want(label):
            continue
        p = policy(ref_fields, section)
        check = p.checks[0]
        ctx = _ctx()
        rows = sum(b.num_rows for b in batches)
        t = time.perf_counter()
        for _, c in by_batch:
            check(c, ctx)
        _emit(label, rows, time.perf_counter() - t, string_fields=len(p.sections["classification"].string_fields), guarded=sorted(p.sections["classification"].guarded))
    # Single detectors over their own column (full scan; PHONE validation per value, so it is capped here as
    # in the pipeline, and measured uncapped on a 20k-row slice separately).
    for det, col in (("US_SSN", "ssn"), ("CREDIT_CARD", "card_number"), ("EMAIL", "email"), ("IP_ADDRESS", "ip_address"), ("DATE", "notes"), ("US_SSN", "notes")):
        name = f"detector.{det}[{col}]"
        if want(name):
            _timed(name, batches, lambda b, det=det, col=col: evaluate(det, b.column(col)))
    if want("detector.PHONE(uncapped)"):
        sl = [batches[0].slice(0, 20_000)]
        _timed("detector.PHONE(uncapped, phonenumbers per candidate)[phone]", sl, lambda b: evaluate("PHONE", b.column("phone")))

    ctx = _ctx()
    mask_cases = [
        ("mask.partial[card_number]", "card_number", {"method": "partial", "keep_last": 4}),
        ("mask.email[email]", "email", {"method": "email"}),
        ("mask.phone[phone]", "phone", {"method": "phone", "keep_last": 2}),
        ("mask.ip[ip_address, 10% IPv6]", "ip_address", {"method": "ip"}),
        ("mask.redact[ssn]", "ssn", {"method": "redact"}),
        ("mask.date_shift[date_of_birth by customer_id]", "date_of_birth", {"method": "date_shift", "subject": "customer_id", "max_days": 30}),
        ("pseudonymize.name[full_name]", "full_name", {"kind": "name"}),
        ("pseudonymize.email[email]", "email", {"kind": "email"}),
        ("pseudonymize.phone[phone]", "phone", {"kind": "phone"}),
    ]
    for label, path, params in mask_cases:
        if not want(label):
            continue
        action_name = "pseudonymize" if label.startswith("pseudonymize") else "mask"
        action = get_action(action_name)(schema.fields[path], params)
        action.apply(cols[0][path], cols[0], ctx)  # build Faker pools and caches outside the timing
        rows = sum(b.num_rows for b in batches)
        t = time.perf_counter()
        for _b, c in by_batch:
            action.apply(c[path], c, ctx)
        _emit(label, rows, time.perf_counter() - t)

    if want("pseudonymize.collisions"):
        gen = SurrogateGenerator("name")
        n = args.rows
        out = get_action("pseudonymize")(schema.fields["full_name"], {"kind": "name"}).apply(pa.array([f"input {i}" for i in range(n)]), {}, ctx)
        distinct = len(set(out.to_pylist()))
        print(json.dumps({"bench": "pseudonymize.collisions[name]", "distinct_inputs": n, "distinct_surrogates": distinct,
                          "colliding_fraction": round(1 - distinct / n, 5), "space": gen.space()}), flush=True)

    if want("scrub"):
        scrub = get_action("scrub")(schema.fields["notes"], {"link": ["full_name", "email", "phone", "ssn"]})
        limit = args.scrub_rows
        sub, seen = [], 0
        for b, c in by_batch:
            if seen >= limit:
                break
            sub.append((b, c))
            seen += b.num_rows
        sctx = _ctx()
        t = time.perf_counter()
        for _, c in sub:
            scrub.apply(c["notes"], c, sctx)
        secs = time.perf_counter() - t
        changed = sctx.stats.get("scrub.notes.rows_changed", 0)
        _emit("scrub.placeholder[notes, link 4 fields]", seen, secs, rows_sent_to_presidio=changed,
              spans={k.split(".")[-1]: v for k, v in sctx.stats.items() if not k.endswith("rows_changed")})


if __name__ == "__main__":
    main()
