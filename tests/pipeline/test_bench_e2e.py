"""benchmarks/bench_e2e.py: a whole CLI run whose JSON line reconciles, and an RSS sampler that counts workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from cloakbeam.benchmarks.bench_e2e import _tree_rss_kb
from cloakbeam.tests.paths import REPO, small_release_policy


def test_tree_rss_counts_descendant_processes():
    # A shell whose child holds 200 MB: the shell alone is a few MB, the tree must include the child.
    code = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); import time; time.sleep(30)"
    proc = subprocess.Popen(["/bin/sh", "-c", f'{sys.executable} -c "{code}"; true'])
    try:
        deadline, seen = time.monotonic() + 20, 0
        while time.monotonic() < deadline and seen < 200 * 1024:
            seen = _tree_rss_kb(proc.pid)
            time.sleep(0.1)
        assert seen >= 200 * 1024
    finally:
        subprocess.run(["pkill", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()


def test_bench_e2e_small_run_reports_reconciled_counts_and_stages(tmp_path):
    # 1,500 records single people out whatever the generalization (see small_release_policy): the scan reports only.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--rows", "1500", "--vault", "populated",
                           "--policy", str(small_release_policy()), "--json", "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    c = out["counts"]
    assert c["input"] == 1500 and c["input"] == c["written"] + c["quarantined"] + c["suppressed"]
    assert out["rows_per_s"] > 0 and out["peak_rss_mb"] > 50 and out["vault"] == "populated"
    assert out["stages"]["protect"] > 0 and out["stages"]["prepare"] > 0
