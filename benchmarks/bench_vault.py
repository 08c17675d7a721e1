"""Token vault throughput: tokens/s for new and repeated values on SQLite and PostgreSQL (JSON lines on stdout).

    .venv/bin/python benchmarks/bench_vault.py                 # N = 1,000,000, both backends
    .venv/bin/python benchmarks/bench_vault.py --n 100000 --backends sqlite

Modes, each over N values pushed through the `tokenize` action in batches of --batch rows (as the pipeline does):
- `prf_only`: token computation alone (HMAC-SHA256 with a precomputed key state `.copy()`), vs `hmac.new` per value.
- `new`: N distinct values never seen before (vault writes: DEK wrap, AES-GCM, two inserts, blind-index check).
- `repeated_cold`: the same N values again from a fresh worker (empty LRU): one blind-index lookup per batch.
- `repeated_hot`: N values drawn from min(N, 50,000) distinct values the worker has already written (LRU hits).
PostgreSQL: $CLOAKBEAM_BENCH_PG_DSN if set, else a throwaway local server (initdb/pg_ctl as in the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


def _emit(**rec: Any) -> None:
    print(json.dumps(rec), flush=True)


def _values(n: int, offset: int = 0) -> pa.Array:
    return pa.array([f"user.{i:09d}@example.org" for i in range(offset, offset + n)], pa.string())


def _action(fmt: str) -> Any:
    from cloakbeam.schemas.avro import FieldInfo
    from cloakbeam.transforms.tokenize import Tokenize

    info = FieldInfo(path="email", arrow_type=pa.string(), nullable=False, declared_class="EMAIL", max_length=None, is_record=False)
    params = {"format": "opaque", "normalize": "lower"} if fmt == "opaque" else {"format": "digits", "keep_last": 4, "luhn": True}
    return Tokenize(info, params)


def _ctx(ref: dict[str, Any], key_path: str, cache: int) -> Any:
    from cloakbeam.core.config import RuntimeConfig
    from cloakbeam.keys.service import KeyRef
    from cloakbeam.transforms.registry import ActionContext

    rt = RuntimeConfig(run_id="bench", dataset_id="bench", state_dir=str(Path(key_path).parent), keys=KeyRef(path=key_path), vault={**ref, "cache_size": cache})
    return ActionContext(rt)


def _run(action: Any, ctx: Any, col: pa.Array, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(col), batch):
        action.apply(col.slice(i, batch), {}, ctx)
    return time.perf_counter() - t0


def bench_prf(n: int) -> None:
    key = os.urandom(32)
    vals = [f"user.{i:09d}@example.org".encode() for i in range(n)]
    base = hmac.new(key, digestmod=hashlib.sha256)
    t0 = time.perf_counter()
    for v in vals:
        m = base.copy()
        m.update(b"\x00\x00\x00\x00")
        m.update(v)
        m.digest()
    copy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for v in vals:
        hmac.new(key, b"\x00\x00\x00\x00" + v, hashlib.sha256).digest()
    new_s = time.perf_counter() - t0
    _emit(bench="vault", mode="prf_only", variant="hmac_copy", n=n, seconds=round(copy_s, 3), tokens_per_s=round(n / copy_s))
    _emit(bench="vault", mode="prf_only", variant="hmac_new", n=n, seconds=round(new_s, 3), tokens_per_s=round(n / new_s))


def bench_backend(name: str, ref: dict[str, Any], key_path: str, n: int, batch: int, fmt: str) -> None:
    action = _action(fmt)
    col = _values(n) if fmt == "opaque" else pa.array([f"4{i:011d}1111" for i in range(n)], pa.string())
    common = dict(bench="vault", backend=name, format=fmt, n=n, batch=batch)
    ctx = _ctx(ref, key_path, cache=200_000)
    s = _run(action, ctx, col, batch)
    rows = ctx.vault.count()
    _emit(**common, mode="new", seconds=round(s, 3), tokens_per_s=round(n / s), vault_rows=rows)
    ctx.close()
    ctx = _ctx(ref, key_path, cache=200_000)
    s = _run(action, ctx, col, batch)
    _emit(**common, mode="repeated_cold", seconds=round(s, 3), tokens_per_s=round(n / s), vault_rows=ctx.vault.count())
    ctx.close()
    hot = min(50_000, n)  # distinct values the worker has already written; never more than were written
    ctx = _ctx(ref, key_path, cache=200_000)
    _run(action, ctx, col.slice(0, hot), batch)  # warm the worker's LRU
    idx = pa.array(np.random.default_rng(1).integers(0, hot, n))
    stream = col.slice(0, hot).take(idx)
    s = _run(action, ctx, stream, batch)
    _emit(**common, mode="repeated_hot", distinct=hot, seconds=round(s, 3), tokens_per_s=round(n / s), vault_rows=ctx.vault.count())
    ctx.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="values per mode (default 1,000,000)")
    ap.add_argument("--batch", type=int, default=65_536, help="rows per batch (default 65536, the pipeline default)")
    ap.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite,postgres")
    ap.add_argument("--format", choices=("opaque", "digits"), default="opaque")
    args = ap.parse_args(argv)
    from cloakbeam.keys.service import ensure_local_keyring

    _emit(bench="vault", mode="env", python=platform.python_version(), cpus=os.cpu_count(), machine=platform.machine())
    bench_prf(min(args.n, 1_000_000))
    with tempfile.TemporaryDirectory(prefix="cloakbeam-bench-vault-") as d:
        key_path = str(Path(d) / "keyring.json")
        ensure_local_keyring(key_path)
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if name == "sqlite":
                ref = {"backend": "sqlite", "path": str(Path(d) / "vault.sqlite")}
            elif name == "postgres":
                dsn = os.environ.get("CLOAKBEAM_BENCH_PG_DSN")
                if not dsn:
                    from cloakbeam.tests.vault_fixtures import _start_server

                    dsn = _start_server()
                os.environ["CLOAKBEAM_BENCH_VAULT_DSN"] = dsn
                _reset_pg(dsn)
                ref = {"backend": "postgres", "dsn_env": "CLOAKBEAM_BENCH_VAULT_DSN"}
            else:
                print(f"unknown backend {name}", file=sys.stderr)
                return 2
            bench_backend(name, ref, key_path, args.n, args.batch, args.format)
    return 0


def _reset_pg(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in ("cloakbeam_vault_entries", "cloakbeam_vault_keys", "cloakbeam_vault_domains"):
            conn.execute(f"DROP TABLE IF EXISTS {t}")


if __name__ == "__main__":
    sys.exit(main())
