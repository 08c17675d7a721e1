"""Reference dataset generator: realistic synthetic customer records, reproducible by seed, written in chunks.

Faker seeds pools of names, streets, cities and zips once; rows are then drawn from those pools with numpy, so
generating 10 M rows never holds more than one chunk in memory and never calls Faker per row. `notes` embeds
some of the same record's PII (name, email, phone or SSN) so free-text scrubbing and leak tests have something
to find. `dirty` corrupts a fraction of records in the ways real feeds break, for reliability tests; the kinds
applied depend on what each format can carry.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cloakbeam.schemas.avro import InputSchema, load_schema

SCHEMA_PATH = Path(__file__).with_name("customers.avsc")
REFERENCE_POLICY_PATH = Path(__file__).with_name("customers.policy.yaml")
FORMATS = ("jsonl", "csv", "avro", "parquet")
CHUNK_ROWS = 50_000

DIAGNOSES = ["none", "E11.9 type 2 diabetes", "I10 hypertension", "J45 asthma", "F32 depression", "M54.5 low back pain",
             "E78.5 hyperlipidemia", "K21.9 GERD", "G43 migraine", "N39.0 urinary tract infection"]
GENDERS = ["female", "male", "nonbinary", "unknown"]
EMAIL_DOMAINS = ["example.com", "example.org", "mail.example.net", "corp.example", "inbox.example.io"]
NOTE_TEMPLATES = [
    "Customer {name} called about a billing dispute; call back at {phone}.",
    "Sent renewal offer to {email} after complaint about service quality.",
    "Identity verified with SSN {ssn} before changing the account owner.",
    "{name} asked to be contacted by email ({email}) rather than by phone.",
    "Escalated ticket: customer reports slow support response times.",
    "Left voicemail for {name} at {phone} regarding upgrade options.",
]
DIRTY_KINDS = {
    "jsonl": ("malformed", "wrong_type", "missing_required", "oversize", "invalid_utf8"),
    "csv": ("malformed", "wrong_type", "missing_required", "oversize", "invalid_utf8"),
    "avro": ("oversize", "missing_required", "truncated_block"),
    "parquet": ("oversize", "missing_required"),
}


@dataclass
class _Pools:
    first: np.ndarray
    last: np.ndarray
    zips: np.ndarray


def _pools(seed: int) -> _Pools:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    first = np.array(sorted({fake.first_name() for _ in range(3000)}), dtype=object)
    last = np.array(sorted({fake.last_name() for _ in range(3000)}), dtype=object)
    zips = np.array([fake.zipcode() for _ in range(2000)], dtype=object)
    return _Pools(first, last, zips)


def _luhn_complete(digits: np.ndarray) -> np.ndarray:
    """Given an (n, 15) array of digits, return (n, 16) with a Luhn check digit appended."""
    d = digits.copy()
    # Positions that are doubled in the final 16-digit number: counting from the right, every second digit,
    # i.e. indexes 0, 2, 4, ... of the 15-digit payload.
    dbl = d[:, 0::2] * 2
    dbl = np.where(dbl > 9, dbl - 9, dbl)
    total = dbl.sum(axis=1) + d[:, 1::2].sum(axis=1)
    check = (10 - total % 10) % 10
    return np.concatenate([d, check[:, None]], axis=1)


def _join_digits(d: np.ndarray) -> np.ndarray:
    return np.array(["".join(map(str, row)) for row in d.tolist()], dtype=object)


def generate_table(n: int, seed: int, start: int, pools: _Pools) -> pa.Table:
    """Rows [start, start+n) of the reference dataset for `seed`, as an Arrow table matching the schema."""
    rng = np.random.default_rng([seed, start])
    ids = np.arange(start, start + n)
    first = pools.first[rng.integers(0, len(pools.first), n)]
    last = pools.last[rng.integers(0, len(pools.last), n)]
    names = first + " " + last
    domains = np.array(EMAIL_DOMAINS, dtype=object)[rng.integers(0, len(EMAIL_DOMAINS), n)]
    emails = np.array([f"{f.lower()}.{l.lower()}{i % 997}@{d}" for f, l, i, d in zip(first, last, ids, domains)], dtype=object)
    area = rng.integers(201, 990, (n, 2))
    line = rng.integers(0, 10000, n)
    phones = np.array([f"+1 ({a}) {b:03d}-{c:04d}" for a, b, c in zip(area[:, 0], area[:, 1] % 1000, line)], dtype=object)
    phones[rng.random(n) < 0.05] = None
    # SSN: area 001-665 or 667-899, group 01-99, serial 0001-9999.
    ssn_area = rng.integers(1, 899, n)
    ssn_area = np.where(ssn_area == 666, 667, ssn_area)
    ssns = np.array([f"{a:03d}-{g:02d}-{s:04d}" for a, g, s in zip(ssn_area, rng.integers(1, 100, n), rng.integers(1, 10000, n))], dtype=object)
    payload = rng.integers(0, 10, (n, 15))
    payload[:, 0] = rng.choice([4, 5], n)
    cards = _join_digits(_luhn_complete(payload))
    dob = (np.datetime64("1940-01-01") + rng.integers(0, 365 * 65, n).astype("timedelta64[D]"))
    zips = pools.zips[rng.integers(0, len(pools.zips), n)]
    gender = np.array(GENDERS, dtype=object)[rng.choice(4, n, p=[0.49, 0.47, 0.03, 0.01])]
    income = np.round(rng.lognormal(10.8, 0.5, n), 2).astype(object)
    income[rng.random(n) < 0.03] = None
    diagnosis = np.array(DIAGNOSES, dtype=object)[rng.integers(0, len(DIAGNOSES), n)]
    tmpl = rng.integers(0, len(NOTE_TEMPLATES), n)
    notes = np.array(
        [NOTE_TEMPLATES[t].format(name=nm, phone=ph or "(no phone)", email=em, ssn=ss) for t, nm, ph, em, ss in zip(tmpl, names, phones, emails, ssns)],
        dtype=object,
    )
    notes[rng.random(n) < 0.1] = None
    v6 = rng.random(n) < 0.1
    octets = rng.integers(1, 255, (n, 4))
    ips = np.array(
        [f"2001:db8:{a:x}:{b:x}::{c:x}" if six else f"{a}.{b}.{c}.{d}" for six, (a, b, c, d) in zip(v6, octets.tolist())],
        dtype=object,
    )
    signup = np.datetime64("2018-01-01T00:00:00", "us") + rng.integers(0, 6 * 365 * 86400, n).astype("timedelta64[s]")
    age = (np.datetime64("2025-01-01") - dob).astype(int) / 365.25
    inc = np.array([x if x is not None else 50000.0 for x in income], dtype=float)
    logit = -1.0 + 0.03 * (40 - age) - 0.00001 * (inc - 50000) + (gender == "unknown") * 0.5
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))
    internal = np.array([f"REF-{x:08x}" for x in rng.integers(0, 2**32, n)], dtype=object)
    schema = load_schema(SCHEMA_PATH).arrow
    cols = {
        "customer_id": pa.array([f"C{i:010d}" for i in ids]),
        "full_name": pa.array(names, pa.string()),
        "email": pa.array(emails, pa.string()),
        "phone": pa.array(phones, pa.string()),
        "ssn": pa.array(ssns, pa.string()),
        "card_number": pa.array(cards, pa.string()),
        "date_of_birth": pa.array(dob.astype("datetime64[D]"), pa.date32()),
        "zip": pa.array(zips, pa.string()),
        "gender": pa.array(gender, pa.string()),
        "income": pa.array(income, pa.float64()),
        "diagnosis": pa.array(diagnosis, pa.string()),
        "notes": pa.array(notes, pa.string()),
        "ip_address": pa.array(ips, pa.string()),
        "signup_ts": pa.array(signup, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
        "churned": pa.array(churned, pa.bool_()),
        "internal_ref": pa.array(internal, pa.string()),
    }
    return pa.table(cols, schema=schema)


def _json_value(v: object) -> object:
    if isinstance(v, dt.datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    return v


def _dirty_plan(n: int, fraction: float, fmt: str, rng: np.random.Generator) -> dict[int, str]:
    if fraction <= 0:
        return {}
    hit = np.flatnonzero(rng.random(n) < fraction)
    kinds = DIRTY_KINDS[fmt]
    return {int(i): kinds[int(k)] for i, k in zip(hit, rng.integers(0, len(kinds), len(hit)))}


def _corrupt_row(row: dict, kind: str, rng: np.random.Generator) -> dict:
    row = dict(row)
    if kind == "wrong_type":
        field, bad = [("income", "lots"), ("churned", "maybe"), ("date_of_birth", 12345)][int(rng.integers(0, 3))]
        row[field] = bad
    elif kind == "missing_required":
        row.pop(["email", "ssn", "customer_id"][int(rng.integers(0, 3))], None)
    elif kind == "oversize":
        row["full_name"] = "X" * 5000
    return row


def iter_lines_jsonl(table: pa.Table, plan: dict[int, str], rng: np.random.Generator) -> Iterator[bytes]:
    for i, row in enumerate(table.to_pylist()):
        kind = plan.get(i)
        row = {k: _json_value(v) for k, v in (_corrupt_row(row, kind, rng) if kind else row).items()}
        line = json.dumps(row, ensure_ascii=False).encode()
        if kind == "malformed":
            line = line[: max(5, len(line) // 2)]
        elif kind == "invalid_utf8":
            line = line.replace(b'"gender": "', b'"gender": "\xff\xfe', 1)
        yield line + b"\n"


def iter_lines_csv(table: pa.Table, plan: dict[int, str], rng: np.random.Generator, header: bool) -> Iterator[bytes]:
    names = table.schema.names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(names)
        yield buf.getvalue().encode()
    for i, row in enumerate(table.to_pylist()):
        kind = plan.get(i)
        if kind:
            row = _corrupt_row(row, kind, rng)
        buf.seek(0)
        buf.truncate()
        w.writerow(["" if row.get(k) is None else _csv_value(row.get(k)) for k in names])
        line = buf.getvalue().encode()
        if kind == "malformed":
            line = line.rstrip(b"\n").rsplit(b",", 3)[0] + b',"unterminated\n'
        elif kind == "invalid_utf8":
            line = line.replace(b",", b",\xff\xfe", 1)
        yield line


def _csv_value(v: object) -> str:
    v = _json_value(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def generate(out: str | Path, rows: int, seed: int = 0, fmt: str = "jsonl", dirty: float = 0.0, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Write `rows` reference records to `out` in `fmt`; return {rows, dirty_rows, path, format}."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not 0.0 <= dirty < 1.0:
        raise ValueError("dirty must be a fraction in [0, 1)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pools = _pools(seed)
    schema: InputSchema = load_schema(SCHEMA_PATH)
    rng = np.random.default_rng([seed, 7919])
    dirty_rows = 0
    tmp = out.with_name(out.name + ".partial")
    writer = None
    with open(tmp, "wb") as fh:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            table = generate_table(n, seed, start, pools)
            plan = _dirty_plan(n, dirty, fmt, rng)
            dirty_rows += len(plan)
            if fmt == "jsonl":
                fh.writelines(iter_lines_jsonl(table, plan, rng))
            elif fmt == "csv":
                fh.writelines(iter_lines_csv(table, plan, rng, header=start == 0))
            elif fmt == "parquet":
                writer = _write_parquet_chunk(fh, writer, table, plan)
            else:
                _write_avro_chunk(fh, table, plan, schema, rng, first=start == 0)
        if writer is not None:
            writer.close()
    if fmt == "avro" and dirty > 0:
        dirty_rows += _truncate_avro_blocks(tmp, rng, dirty)
    os.replace(tmp, out)
    return {"path": str(out), "rows": rows, "dirty_rows": dirty_rows, "format": fmt}


def _write_parquet_chunk(fh, writer, table: pa.Table, plan: dict[int, str]):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # Parquet is typed: it can carry oversize strings and nulls in required columns, not malformed rows.
    loose = pa.schema([f.with_nullable(True) for f in table.schema])
    if plan:
        idx = np.zeros(table.num_rows, dtype=bool)
        over = np.array([plan.get(i) == "oversize" for i in range(table.num_rows)])
        miss = np.array([plan.get(i) == "missing_required" for i in range(table.num_rows)])
        del idx
        names = pc.if_else(pa.array(over), pa.scalar("X" * 5000), table["full_name"])
        email = pc.if_else(pa.array(miss), pa.scalar(None, pa.string()), table["email"])
        table = table.set_column(table.schema.get_field_index("full_name"), "full_name", names)
        table = table.set_column(table.schema.get_field_index("email"), "email", email)
    table = table.cast(loose)
    if writer is None:
        writer = pq.ParquetWriter(fh, loose, compression="zstd")
    writer.write_table(table, row_group_size=len(table))
    return writer


def _write_avro_chunk(fh, table: pa.Table, plan: dict[int, str], schema: InputSchema, rng, first: bool) -> None:
    import fastavro

    rows = table.to_pylist()
    for i, kind in plan.items():
        if kind == "oversize":
            rows[i]["full_name"] = "X" * 5000
        elif kind == "missing_required":
            rows[i]["email"] = ""  # Avro cannot omit a required field; an empty required string is the closest
    parsed = schema.parsed()
    if first:
        fastavro.writer(fh, parsed, rows, codec="null", sync_interval=16_000)
    else:
        # Append blocks to the same container: re-open in append mode needs a readable handle; write a fresh
        # block stream with the file's sync marker instead.
        fh.flush()
        with open(fh.name, "a+b") as app:
            fastavro.writer(app, parsed, rows, codec="null", sync_interval=16_000)


def _truncate_avro_blocks(path: Path, rng: np.random.Generator, dirty: float) -> int:
    """Damage a few data blocks (bytes cut from their middle) and truncate the last block, the ways Avro files
    break in transit. Returns the number of records in the damaged blocks."""
    import fastavro

    data = bytearray(path.read_bytes())
    head = io.BytesIO(bytes(data))
    reader = fastavro.block_reader(head)
    blocks = []
    pos = head.tell()
    for block in reader:
        blocks.append((pos, head.tell() - pos, block.num_records))
        pos = head.tell()
    if len(blocks) < 2:
        return 0
    n_victims = max(1, int(round(len(blocks) * dirty)))
    victims = set(rng.choice(np.arange(0, len(blocks) - 1), size=min(n_victims, len(blocks) - 1), replace=False).tolist())
    lost = sum(blocks[v][2] for v in victims) + blocks[-1][2]
    # Truncate the last block first (the file ends mid-block), then cut from the chosen blocks back to front.
    last_off, last_size, _ = blocks[-1]
    del data[last_off + last_size // 2 :]
    for v in sorted(victims, reverse=True):
        off, size, _ = blocks[v]
        mid = off + size // 2
        del data[mid : mid + min(64, max(1, size // 4))]
    path.write_bytes(bytes(data))
    return lost
