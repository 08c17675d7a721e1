"""benchmarks/bench_vault.py runs for any --n (issue 13: `hot = 50_000` made --n below 50,000 crash)."""

from __future__ import annotations

import json
import subprocess
import sys

from cloakbeam.tests.paths import REPO


def test_bench_vault_small_n_runs_and_reports_every_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vault.py"), "--n", "3000", "--batch", "1000", "--backends", "sqlite"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    modes = {r["mode"] for r in rows}
    assert {"prf_only", "new", "repeated_cold", "repeated_hot"} <= modes
    hot = next(r for r in rows if r["mode"] == "repeated_hot")
    assert hot["distinct"] == 3000 and hot["n"] == 3000 and hot["vault_rows"] == 3000
