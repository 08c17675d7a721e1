"""Memory of `cryptography` AEAD objects, as the vault used them (JSON lines on stdout; RSS from /proc).

    .venv/bin/python benchmarks/bench_aead_memory.py [--n 100000] [--batches 8]

- `held`: RSS growth for --n AESGCM objects, each used once and all kept alive (what a cache of one AESGCM per
  subject key cost before `DataKey` made its AEAD object lazily).
- `churn`: per batch, 65,536 AESGCM objects made, used once and dropped, beside an LRU of 200,000 small
  (domain, value) -> token entries (the vault's allocation pattern): RSS growth after each batch. A plateau means
  that pattern does not fragment the heap into growth with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import OrderedDict

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def _rss_mb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    env = {"python": platform.python_version(), "cpus": os.cpu_count()}

    r0 = _rss_mb()
    held = []
    for _ in range(args.n):
        a = AESGCM(os.urandom(32))
        a.encrypt(os.urandom(12), b"x" * 16, b"aad")
        held.append(a)
    grown = _rss_mb() - r0
    print(json.dumps({"bench": "aead_memory", "mode": "held", "n": args.n, "rss_growth_mb": grown,
                      "bytes_per_object": round(grown * 2**20 / max(args.n, 1)), **env}))
    del held

    r0 = _rss_mb()
    lru: OrderedDict[tuple[str, str], str] = OrderedDict()
    for b in range(args.batches):
        deks = {}
        for i in range(65_536):
            a = AESGCM(os.urandom(32))
            a.encrypt(os.urandom(12), b"value-%d" % i, b"aad")
            deks[i] = a
            lru[("d", f"value-{b}-{i}")] = f"tok_{b}_{i}"
            if len(lru) > 200_000:
                lru.popitem(last=False)
        del deks
        print(json.dumps({"bench": "aead_memory", "mode": "churn", "batch": b, "rss_growth_mb": _rss_mb() - r0,
                          "lru": len(lru), **env}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
