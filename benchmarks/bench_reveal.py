"""Bounded load test of the reveal service: N concurrent clients send detokenize requests to a real `cloakbeam
serve` process on loopback (SQLite vault, file checkpoint sink, JWTs from a throwaway Ed25519 issuer whose JWKS is
served on loopback). Every request is authenticated, authorized, audited (MAC'd entry + signed checkpoint, fsync'd)
and answered. Prints one JSON line: p50/p99 latency, requests/s, errors, and that the audit trail verifies.

    .venv/bin/python benchmarks/bench_reveal.py                        # 32 clients, 20,000 requests
    .venv/bin/python benchmarks/bench_reveal.py --clients 8 --requests 2000 --tokens-per-request 10

The request count is bounded and every request goes to 127.0.0.1 only; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO.parent)) if (REPO.parent / "cloakbeam").exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--tokens-per-request", type=int, default=1)
    ap.add_argument("--values", type=int, default=10_000, help="distinct tokenized values in the vault")
    args = ap.parse_args()
    if args.requests > 200_000 or args.clients > 256:
        ap.error("bounded load test: at most 200,000 requests and 256 clients")

    import httpx

    from cloakbeam.keys.service import KeyRef, dev_reveal_keyring_path, ensure_local_keyring, open_key_service
    from cloakbeam.tests.service_fixtures import Issuer, start_subprocess_server, write_service_config
    from cloakbeam.vault import Domain, open_vault
    from cloakbeam.vault.audit import AuditLog

    root = Path(tempfile.mkdtemp(prefix="cloakbeam-bench-reveal-"))
    state = root / "state"
    state.mkdir()
    ring = state / "keyring.json"
    ensure_local_keyring(ring)
    vault_ref = {"backend": "sqlite", "path": str(state / "vault.sqlite")}
    vault = open_vault(vault_ref, open_key_service(KeyRef(path=str(ring))))
    values = [f"person.{i:06d}@example.org" for i in range(args.values)]
    tokens = []
    for i in range(0, len(values), 5000):
        tokens += vault.tokenize(Domain("email", normalize="lower"), values[i : i + 5000])
    vault.close()
    issuer = Issuer()
    grants = {"roles": {"support": [{"action": "detokenize", "domains": ["email"], "purposes": ["ticket"]}]}}
    cfg = write_service_config(root, str(ring), str(dev_reveal_keyring_path(ring)), vault_ref, issuer, grants)
    proc, url = start_subprocess_server(cfg)
    token = issuer.token(sub="bench@corp", roles=["support"], purposes=["ticket"], exp=int(time.time()) + 3600)
    per_client = [args.requests // args.clients + (1 if c < args.requests % args.clients else 0) for c in range(args.clients)]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(args.clients + 1)

    def client(c: int) -> None:
        nonlocal errors
        mine, bad = [], 0
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=60) as http:
            barrier.wait()
            for i in range(per_client[c]):
                k = (c * 7919 + i * args.tokens_per_request) % len(tokens)
                batch = [tokens[(k + j) % len(tokens)] for j in range(args.tokens_per_request)]
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/detokenize", json={"domain": "email", "tokens": batch})
                    ok = r.status_code == 200 and all(x["status"] == "ok" for x in r.json()["results"])
                except httpx.HTTPError:
                    ok = False
                mine.append(time.perf_counter() - t0)
                bad += 0 if ok else 1
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    proc.terminate()
    proc.wait(timeout=30)
    issuer.close()
    # the audit trail holds one verified entry per request
    from cloakbeam.keys.sealing import open_reveal_keys
    from cloakbeam.vault.audit import FileCheckpointSink, verify_anchored

    reveal = open_reveal_keys(KeyRef(path=str(dev_reveal_keyring_path(ring))))
    log = AuditLog(root / "service" / "state" / "audit.jsonl", reveal.audit_key())
    audit = verify_anchored(log, FileCheckpointSink(root / "worm" / "checkpoints.jsonl"), reveal.checkpoint_public_key(), reveal._doc["keyring_id"])
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [lat[len(lat) // 2]] * 99
    print(json.dumps({
        "bench": "reveal_detokenize", "clients": args.clients, "requests": len(lat), "tokens_per_request": args.tokens_per_request,
        "errors": errors, "seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2), "max_ms": round(lat[-1] * 1000, 2),
        "audit_entries": audit["entries"], "audit_checkpoints": audit["checkpoints"],
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }))


if __name__ == "__main__":
    main()
