"""Keyed digests and tokens, native vs Python, in one process: one JSON line per (case, kernel).

    .venv/bin/python benchmarks/bench_digests.py [--rows 1000000] [--repeat 5]

Cases over short strings (`user<i>@example.org`, 18-24 bytes) and 16-digit card numbers:
- `hmac`: HMAC-SHA256 of every value (keyed digests, blind indexes, subject key ids): native kernel vs a
  Python loop of `hmac.digest` (the one-shot C call the reference uses);
- `token-opaque`: `Tokenizer.tokens_array` (HMAC + base32 in the kernel) vs `Tokenizer.reference_tokens`;
- `token-digits-luhn`: the card format (`keep_last: 4, luhn: true`), native vs reference.
Kernels: `native` (default threads), `native-1thread`, `python`. `values_per_s` is wall clock, best of
--repeat; `cpu_values_per_s` is per second of process CPU time (per core for the threaded kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
from collections.abc import Callable, Iterator

import pyarrow as pa
from bench_encrypt import best, machine  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])

from cloakbeam.keys import native
from cloakbeam.vault.tokens import TokenFormat, Tokenizer


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    prev = native.get_threads()
    native.set_threads(n)
    try:
        yield
    finally:
        native.set_threads(prev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--slow-rows", type=int, default=200_000, help="values for the Python kernels")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    key = os.urandom(32)
    where = machine()
    emails = [f"user{i}@example.org" for i in range(args.rows)]
    cards = [f"{4000_0000_0000_0000 + i * 7919:016d}" for i in range(args.rows)]
    email_arr, card_arr = pa.array(emails), pa.array(cards)
    opaque, luhn = Tokenizer(key, TokenFormat()), Tokenizer(key, TokenFormat("digits", keep_last=4, luhn=True))
    slow = args.slow_rows
    cases: dict[str, dict[str, tuple[int, Callable[[], object]]]] = {
        "hmac": {
            "native": (args.rows, lambda: native.hmac_sha256(key, email_arr)),
            "python": (slow, lambda: b"".join(hmac.digest(key, v.encode(), "sha256") for v in emails[:slow])),
        },
        "token-opaque": {
            "native": (args.rows, lambda: opaque.tokens_array(email_arr)),
            "python": (slow, lambda: opaque.reference_tokens(emails[:slow])),
        },
        "token-digits-luhn": {
            "native": (args.rows, lambda: luhn.tokens_array(card_arr)),
            "python": (slow, lambda: luhn.reference_tokens(cards[:slow])),
        },
    }
    assert opaque.tokens(emails[:1000]) == opaque.reference_tokens(emails[:1000])
    assert luhn.tokens(cards[:1000]) == luhn.reference_tokens(cards[:1000])
    for case, kernels in cases.items():
        runs = [("native", 0), ("native-1thread", 1), ("python", 1)]
        out = {}
        for name, n_threads in runs:
            rows, fn = kernels["python" if name == "python" else "native"]
            with threads(n_threads):
                wall, cpu = best(fn, args.repeat)
                used = native.get_threads() if name == "native" else 1
            out[name] = {
                "bench": "digests",
                "case": case,
                "kernel": name,
                "values": rows,
                "threads": used,
                "values_per_s": round(rows / wall),
                "cpu_values_per_s": round(rows / max(cpu, 1e-9)),
            }
        for r in out.values():
            r["x_python"] = round(int(r["values_per_s"]) / int(out["python"]["values_per_s"]), 1)
            print(json.dumps({**r, **where}), flush=True)


if __name__ == "__main__":
    main()
