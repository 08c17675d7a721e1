"""Encryption throughput: the column kernel (encrypt_column) vs a naive per-row AESGCM.encrypt loop.

Prints one JSON line per (cell size, method): cells/s and MB/s of plaintext, best of --repeat runs.

    .venv/bin/python benchmarks/bench_encrypt.py [--rows 200000] [--repeat 3]

The naive loop is what a straightforward implementation does: for each Python value, draw a nonce, call
AESGCM.encrypt, concatenate header + nonce + ciphertext, and build the Arrow array from a Python list.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloakbeam.keys.cells import CELL_GCM, cell_aad, decrypt_column, encrypt_column
from cloakbeam.keys.service import init_keyring, open_key_service


def naive_loop(values: list[bytes], aesgcm: AESGCM, key_id: bytes, aad: bytes) -> pa.Array:
    header = bytes([CELL_GCM]) + key_id
    out = []
    for v in values:
        nonce = os.urandom(12)
        out.append(header + nonce + aesgcm.encrypt(nonce, v, aad))
    return pa.array(out, pa.binary())


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="16,64,256,1024")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        import logging

        logging.getLogger("cloakbeam.keys").setLevel(logging.ERROR)
        ref = init_keyring(os.path.join(d, "k.json"), protection="dev")
        ks = open_key_service(ref)
        key = ks.data_key("bench", "col", uses=1)
        raw_key = os.urandom(32)
        naive_aead = AESGCM(raw_key)
        aad = cell_aad(CELL_GCM, key.key_id, "bench", "col")
        for size in (int(s) for s in args.sizes.split(",")):
            rows = args.rows if size <= 256 else max(args.rows // 4, 1000)
            values = [os.urandom(size) for _ in range(rows)]
            arr = pa.array(values, pa.binary())
            results = {}
            results["stage"] = _best(lambda arr=arr: encrypt_column(arr, key, dataset="bench", column="col"), args.repeat)
            results["naive_loop"] = _best(lambda arr=arr: naive_loop(arr.to_pylist(), naive_aead, key.key_id, aad), args.repeat)
            enc = encrypt_column(arr, key, dataset="bench", column="col")
            lookup = {key.key_id: key}
            results["stage_decrypt"] = _best(lambda enc=enc, lookup=lookup: decrypt_column(enc, lookup, dataset="bench", column="col"), args.repeat)
            assert decrypt_column(enc, lookup, dataset="bench", column="col").equals(arr)
            for method, secs in results.items():
                print(json.dumps({
                    "bench": "encrypt", "method": method, "cell_bytes": size, "cells": rows,
                    "seconds": round(secs, 4), "cells_per_s": round(rows / secs), "mb_per_s": round(rows * size / secs / 1e6, 1),
                    "python": platform.python_version(), "cpus": os.cpu_count(),
                }), flush=True)
            print(json.dumps({"bench": "encrypt", "cell_bytes": size, "speedup_stage_vs_naive": round(results["naive_loop"] / results["stage"], 2)}), flush=True)


if __name__ == "__main__":
    main()
