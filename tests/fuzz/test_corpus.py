"""The fuzz targets pass over their seed corpus (the hostile inputs of issue 13) on every test run; the bounded
mutation runs are `tests/fuzz/run.py`, called by .ci/run after pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_every_target_has_a_seed_corpus():
    targets = sorted(p.stem for p in HERE.glob("fuzz_*.py"))
    assert {"fuzz_jsonl", "fuzz_csv", "fuzz_policy"} <= set(targets)
    for name in ("fuzz_jsonl", "fuzz_csv", "fuzz_policy"):
        assert len(list((HERE / "corpus" / name).iterdir())) >= 8, name


def test_seed_corpus_replays_without_a_crash():
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, str(HERE / "run.py"), "--replay-only"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 failed" in proc.stdout
