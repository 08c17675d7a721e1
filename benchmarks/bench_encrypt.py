"""Cell encryption throughput, every kernel in one process: one JSON line per (kernel, cell size).

    .venv/bin/python benchmarks/bench_encrypt.py [--rows 1000000] [--repeat 5] [--sizes 16,64,256,1024]

Kernels (all write cell format v1 under the same AES-256-GCM data key, same dataset and column):
- `native`: `encrypt_column` / `decrypt_column` on the native kernel with its default threads;
- `native-1thread`: the same with `set_threads(1)`;
- `python`: the reference kernel (`PYTHON_KERNEL`: numpy layout, one `cryptography` call per cell);
- `cryptography-loop`: a plain per-row loop: `os.urandom(12)`, `AESGCM.encrypt`, bytes concatenation and
  `pa.array(list)` (decrypt: slicing and `AESGCM.decrypt` per row).

Each line has `cells_per_s` (encrypt) and `decrypt_cells_per_s`, best of --repeat wall-clock runs, and
`cpu_cells_per_s` (cells per second of process CPU time, which a busy shared machine disturbs less; for
the threaded kernel it is per core). The slow kernels run on fewer rows (--slow-rows). Machine, command and
the CPU features the crypto backends use are in every line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloakbeam.keys import cells, native
from cloakbeam.keys.cells import CELL_GCM, GCM_HEADER, KEY_ID_LEN, cell_aad, decrypt_column, encrypt_column
from cloakbeam.keys.service import DataKey


def machine() -> dict[str, object]:
    """Where the numbers come from."""
    return {
        "command": " ".join([".venv/bin/python", "benchmarks/" + os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cpu_features": native.cpu_features(),
        "native_threads": native.get_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best wall seconds, process CPU seconds of that run)."""
    out = (float("inf"), float("inf"))
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < out[0]:
            out = (wall, cpu)
    return out


@contextlib.contextmanager
def kernel(name: str) -> Iterator[None]:
    prev_kernel, prev_threads = cells.current_kernel(), native.get_threads()
    cells.use_kernel(cells.PYTHON_KERNEL if name == "python" else cells.NATIVE_KERNEL)
    native.set_threads(1 if name == "native-1thread" else 0)
    try:
        yield
    finally:
        cells.use_kernel(prev_kernel)
        native.set_threads(prev_threads)


def loop_encrypt(values: list[bytes], aead: AESGCM, key_id: bytes, aad: bytes) -> pa.Array:
    header = bytes([CELL_GCM]) + key_id
    out = []
    for v in values:
        nonce = os.urandom(12)
        out.append(header + nonce + aead.encrypt(nonce, v, aad))
    return pa.array(out, pa.binary())


def loop_decrypt(cells_: list[bytes], aead: AESGCM, aad: bytes) -> pa.Array:
    return pa.array([aead.decrypt(c[1 + KEY_ID_LEN : GCM_HEADER], c[GCM_HEADER:], aad) for c in cells_], pa.binary())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="cells per batch for the native kernels (1024-byte cells: a quarter)")
    ap.add_argument("--slow-rows", type=int, default=100_000, help="cells per batch for the python and cryptography-loop kernels")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="16,64,256,1024")
    ap.add_argument("--kernels", default="native,native-1thread,python,cryptography-loop")
    args = ap.parse_args()
    material = os.urandom(32)
    key = DataKey(os.urandom(8), False, AESGCM(material), {}, material)
    aad = cell_aad(CELL_GCM, key.key_id, "bench", "col")
    where = machine()
    for size in (int(s) for s in args.sizes.split(",")):
        fast_rows = args.rows if size <= 256 else max(args.rows // 4, 1000)
        results: dict[str, dict[str, object]] = {}
        for name in args.kernels.split(","):
            rows = fast_rows if name.startswith("native") else min(args.slow_rows, fast_rows)
            arr = pa.array([os.urandom(size) for _ in range(rows)], pa.binary())
            with kernel(name):
                if name == "cryptography-loop":
                    values = arr.to_pylist()
                    enc_s, enc_cpu = best(lambda: loop_encrypt(values, key.aead, key.key_id, aad), args.repeat)
                    enc = loop_encrypt(values, key.aead, key.key_id, aad)
                    as_list = enc.to_pylist()
                    dec_s, dec_cpu = best(lambda: loop_decrypt(as_list, key.aead, aad), args.repeat)
                    assert loop_decrypt(as_list, key.aead, aad).equals(arr)
                else:
                    enc_s, enc_cpu = best(lambda: encrypt_column(arr, key, dataset="bench", column="col"), args.repeat)
                    enc = encrypt_column(arr, key, dataset="bench", column="col")
                    lookup = {key.key_id: key}
                    dec_s, dec_cpu = best(lambda: decrypt_column(enc, lookup, dataset="bench", column="col"), args.repeat)
                    assert decrypt_column(enc, lookup, dataset="bench", column="col").equals(arr)
                threads = native.get_threads() if name == "native" else 1
            results[name] = {
                "bench": "encrypt",
                "kernel": name,
                "cell_bytes": size,
                "cells": rows,
                "threads": threads,
                "cells_per_s": round(rows / enc_s),
                "decrypt_cells_per_s": round(rows / dec_s),
                "cpu_cells_per_s": round(rows / max(enc_cpu, 1e-9)),
                "decrypt_cpu_cells_per_s": round(rows / max(dec_cpu, 1e-9)),
                "plaintext_mb_per_s": round(rows * size / enc_s / 1e6, 1),
            }
        base = results.get("cryptography-loop")
        for r in results.values():
            if base is not None:
                r["x_cryptography_loop"] = round(int(r["cells_per_s"]) / int(base["cells_per_s"]), 1)
            print(json.dumps({**r, **where}), flush=True)


if __name__ == "__main__":
    main()
