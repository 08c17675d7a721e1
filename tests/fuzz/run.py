"""Run every atheris target in this folder (`fuzz_*.py`) for a bounded time; exit 1 on any crash.

    .venv/bin/python tests/fuzz/run.py                 # each target: replay its seed corpus, then fuzz 60 s
    .venv/bin/python tests/fuzz/run.py --seconds 300   # longer ($CLOAKBEAM_FUZZ_SECONDS works too)
    .venv/bin/python tests/fuzz/run.py --replay-only   # only the seed corpus (what the pytest suite runs)
    .venv/bin/python tests/fuzz/run.py fuzz_csv        # some targets only

Targets are discovered, not listed: a new `tests/fuzz/fuzz_<name>.py` (with seeds in `corpus/fuzz_<name>/`,
optional) is picked up by this runner and so by the CI step. Each target runs in its own process twice:
first over its whole seed corpus at full size (the hostile inputs of issue 13, some of them 200 KB), then
mutating for the time budget with inputs up to `--max-len` bytes in a scratch copy of the corpus, so the
repository's corpus never changes. A crash leaves its input under `--artifacts` (default a temporary folder)
and is printed with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def targets(names: list[str]) -> list[str]:
    found = sorted(glob.glob(os.path.join(HERE, "fuzz_*.py")))
    if names:
        found = [t for t in found if os.path.basename(t)[:-3] in names or os.path.basename(t) in names]
    return found


def run_target(path: str, seconds: int, max_len: int, artifacts: str, replay_only: bool) -> bool:
    name = os.path.basename(path)[:-3]
    seeds = os.path.join(HERE, "corpus", name)
    seed_files = sorted(glob.glob(os.path.join(seeds, "*"))) if os.path.isdir(seeds) else []
    prefix = os.path.join(artifacts, f"{name}-")
    common = [f"-artifact_prefix={prefix}", "-rss_limit_mb=3072", "-timeout=30", "-print_final_stats=0"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    t0 = time.monotonic()
    if seed_files:
        replay = subprocess.run([sys.executable, path, *common, "-runs=0", *seed_files], env=env, capture_output=True, text=True)
        if replay.returncode != 0:
            return _report(name, "seed corpus", replay, prefix, path)
    if not replay_only:
        with tempfile.TemporaryDirectory(prefix=f"cloakbeam-{name}-") as work:
            for f in seed_files:
                shutil.copy(f, work)
            fuzz = subprocess.run(
                [sys.executable, path, *common, f"-max_total_time={seconds}", f"-max_len={max_len}", work],
                env=env, capture_output=True, text=True,
            )
        if fuzz.returncode != 0:
            return _report(name, f"{seconds} s of fuzzing", fuzz, prefix, path)
    print(f"fuzz: {name}: ok ({len(seed_files)} seeds{'' if replay_only else f', {seconds} s fuzzing'}, {time.monotonic() - t0:.0f} s)", flush=True)
    return True


def _report(name: str, phase: str, proc: subprocess.CompletedProcess, prefix: str, path: str) -> bool:
    tail = "\n".join((proc.stderr or "").splitlines()[-40:])
    crashes = sorted(glob.glob(prefix + "*"))
    print(f"fuzz: {name}: CRASH during {phase} (exit {proc.returncode})\n{tail}", flush=True)
    for c in crashes:
        print(f"fuzz: {name}: reproduce with: {sys.executable} {path} {c}", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="targets to run (default: every tests/fuzz/fuzz_*.py)")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("CLOAKBEAM_FUZZ_SECONDS", "60")), help="fuzzing time per target (default 60)")
    ap.add_argument("--max-len", type=int, default=8192, help="largest mutated input in bytes (default 8192)")
    ap.add_argument("--artifacts", default=None, help="where crash inputs are kept (default: a new temporary folder)")
    ap.add_argument("--replay-only", action="store_true", help="run the seed corpus only, no mutation")
    args = ap.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed; pip install -e '.[dev]'", file=sys.stderr)
        return 2
    found = targets(args.names)
    if not found:
        print("fuzz: no targets found", file=sys.stderr)
        return 2
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="cloakbeam-fuzz-artifacts-")
    os.makedirs(artifacts, exist_ok=True)
    results = [run_target(t, args.seconds, args.max_len, artifacts, args.replay_only) for t in found]
    bad = results.count(False)
    print(f"fuzz: {len(results) - bad} passed, {bad} failed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
