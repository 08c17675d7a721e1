"""End-to-end benchmark: a whole `cloakbeam run` of the reference policy, as a user runs it.

    .venv/bin/python benchmarks/bench_e2e.py --rows 1000000 [--vault new|populated] [--backend sqlite|postgres]
        [--workers N] [--peer presidio] [--peer-rows 50000] [--json]

What it does:
  1. generates N reference customer rows once (schemas/generate.py; cached under --work by rows and seed;
     generation is not timed);
  2. `--vault new`: a fresh state directory (new dev keyring, empty vault); `--vault populated`: the same input is
     run once untimed into the state directory first, so every token of the timed run already exists;
  3. times `cloakbeam run --dev` in a child process (start-up included), sampling the resident set size of the
     child and all its descendants (worker processes) every 50 ms from /proc; `peak_rss_mb` is the peak of that sum;
  4. reads the run manifest: counts and the per-stage seconds its stage timers recorded (`stages`);
  5. `--peer presidio` (`pip install -e '.[bench]'`): in the same process run, presidio applies the nearest
     equivalent operators to the first --peer-rows of the same rows: presidio-structured's StructuredEngine hashes
     the id, name and email (cloakbeam: vault tokens, keyed pseudonyms), masks phone and card, encrypts ssn; and
     presidio-analyzer (its pattern recognizers; no NLP model can be installed here) + anonymizer replace what
     they find in the notes (cloakbeam: scrub). It has no vault, k-anonymity, splits or DP. The ratio of rows/s
     is printed; presidio's rows/s on its smaller sample is a per-row rate, so it is comparable.

Output: a table, or with --json one JSON line: {"rows", "seconds", "rows_per_s", "peak_rss_mb", "vault",
"backend", "workers", "counts", "stages", "peer"?}. PostgreSQL: $CLOAKBEAM_BENCH_PG_DSN if set, else a throwaway
local server (initdb/pg_ctl, as the tests start it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _tree_rss_kb(root: int) -> int:
    """Resident set size (kB) of process `root` and all its descendants, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/statm", "rb") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        pid, ppid = int(entry), int(stat[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kb, self._done = pid, every, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, _tree_rss_kb(self.pid))
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kb


def _cli_run(src: Path, out: Path, state: Path, config: Path | None, workers: int | None, batch: int,
             policy: Path) -> tuple[float, int, int]:
    from cloakbeam.schemas.generate import SCHEMA_PATH

    cmd = [sys.executable, "-m", "cloakbeam.cli.main", "run", "--input", str(src), "--schema", str(SCHEMA_PATH),
           "--policy", str(policy), "--output", str(out), "--state-dir", str(state), "--dev",
           "--overwrite", "--batch-size", str(batch)]
    if config is not None:
        cmd += ["--config", str(config)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = _RssSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    if proc.returncode != 0:
        sys.stderr.write(err.decode("utf-8", "replace")[-4000:])
    return seconds, peak, proc.returncode


def _postgres_config(state: Path) -> Path:
    dsn = os.environ.get("CLOAKBEAM_BENCH_PG_DSN")
    if not dsn:
        from cloakbeam.tests.vault_fixtures import _start_server

        dsn = _start_server()
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in ("cloakbeam_vault_entries", "cloakbeam_vault_keys", "cloakbeam_vault_domains"):
            conn.execute(f"DROP TABLE IF EXISTS {t} CASCADE")
    os.environ["CLOAKBEAM_BENCH_VAULT_DSN"] = dsn
    cfg = state.parent / f"{state.name}.config.yaml"
    cfg.write_text("vault: {backend: postgres, dsn_env: CLOAKBEAM_BENCH_VAULT_DSN}\n", encoding="utf-8")
    return cfg


def _presidio_text_engines() -> tuple[Any, Any]:
    """presidio-analyzer with its pattern recognizers only (a blank spaCy pipeline: no NLP model is installable
    here) and presidio-anonymizer: the nearest equivalent of cloakbeam's scrub of free text."""
    import logging

    import spacy
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_anonymizer import BatchAnonymizerEngine

    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # it tries to download a suffix list, then uses its own

    class BlankNlpEngine(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}

    nlp = BlankNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    nlp.load()
    return BatchAnalyzerEngine(AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])), BatchAnonymizerEngine()


def peer_presidio(src: Path, rows: int) -> dict[str, Any]:
    """presidio on the first `rows` rows, reading not timed: presidio-structured's StructuredEngine over the
    structured columns, plus presidio-analyzer + anonymizer over the notes column (cloakbeam's scrub)."""
    try:
        import pandas as pd
        from presidio_anonymizer.entities import OperatorConfig
        from presidio_structured import StructuredAnalysis, StructuredEngine
    except ImportError:
        return {"error": "presidio-structured is not installed: .venv/bin/pip install -e '.[bench]'"}
    lines = []
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            lines.append(json.loads(line))
            if len(lines) >= rows:
                break
    df = pd.DataFrame(lines)
    entity = {"customer_id": "ID", "full_name": "PERSON", "email": "EMAIL_ADDRESS", "phone": "PHONE_NUMBER",
              "ssn": "US_SSN", "card_number": "CREDIT_CARD"}
    structured = df[[c for c in entity if c in df.columns]].astype(str)
    operators = {
        "ID": OperatorConfig("hash", {"hash_type": "sha256"}),
        "PERSON": OperatorConfig("hash", {"hash_type": "sha256"}),
        "EMAIL_ADDRESS": OperatorConfig("hash", {"hash_type": "sha256"}),
        "PHONE_NUMBER": OperatorConfig("mask", {"masking_char": "*", "chars_to_mask": 32, "from_end": False}),
        "US_SSN": OperatorConfig("encrypt", {"key": "WmZq4t7w!z%C&F)J"}),
        "CREDIT_CARD": OperatorConfig("mask", {"masking_char": "*", "chars_to_mask": 32, "from_end": False}),
    }
    analysis = StructuredAnalysis(entity_mapping={c: entity[c] for c in structured.columns})
    engine = StructuredEngine()
    t0 = time.perf_counter()
    engine.anonymize(structured, analysis, operators)
    structured_s = time.perf_counter() - t0
    notes_s = 0.0
    if "notes" in df.columns:
        analyzer, anonymizer = _presidio_text_engines()
        texts = [t if isinstance(t, str) else "" for t in df["notes"]]
        t0 = time.perf_counter()
        found = analyzer.analyze_iterator(texts, language="en")
        anonymizer.anonymize_list(texts, found)
        notes_s = time.perf_counter() - t0
    seconds = structured_s + notes_s
    return {"tool": "presidio-structured + presidio-analyzer (pattern recognizers)", "rows": len(df),
            "seconds": round(seconds, 3), "rows_per_s": round(len(df) / seconds),
            "structured_rows_per_s": round(len(df) / structured_s), "notes_seconds": round(notes_s, 3),
            "operators": sorted({o.operator_name for o in operators.values()} | {"replace"})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vault", choices=("new", "populated"), default="new")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: the runner's default)")
    ap.add_argument("--batch-size", type=int, default=65_536)
    ap.add_argument("--peer", choices=("presidio",), default=None)
    ap.add_argument("--peer-rows", type=int, default=5_000, help="rows the peer runs on (default 5000; it is slow)")
    ap.add_argument("--policy", default=None,
                    help="policy file (default: the reference policy, schemas/customers.policy.yaml)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cloakbeam-bench"))
    args = ap.parse_args(argv)

    from cloakbeam.schemas.generate import REFERENCE_POLICY_PATH, generate

    policy = Path(args.policy) if args.policy else REFERENCE_POLICY_PATH
    if not policy.is_file():
        ap.error(f"--policy {policy}: no such file; give a policy YAML file or leave --policy out for the reference policy")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"customers-{args.rows}-{args.seed}-0.0.jsonl"
    if not src.exists():
        generate(src, args.rows, seed=args.seed, fmt="jsonl", dirty=0.0)
    state, out = work / "e2e-state", work / "e2e-out"
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    config = _postgres_config(state) if args.backend == "postgres" else None
    if args.vault == "populated":
        _, _, code = _cli_run(src, work / "e2e-warm", state, config, args.workers, args.batch_size, policy)
        shutil.rmtree(work / "e2e-warm", ignore_errors=True)
        if code != 0:
            return code
    seconds, peak_kb, code = _cli_run(src, out, state, config, args.workers, args.batch_size, policy)
    if code != 0:
        return code
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {
        "bench": "e2e", "policy": str(policy), "rows": args.rows, "seconds": round(seconds, 2), "rows_per_s": round(args.rows / seconds),
        "peak_rss_mb": round(peak_kb / 1024), "vault": args.vault, "backend": args.backend, "workers": args.workers,
        "batch_size": args.batch_size, "counts": manifest["counts"], "stages": manifest.get("stages", {}),
        "cpus": os.cpu_count(), "python": platform.python_version(), "load": round(os.getloadavg()[0], 2),
    }
    if args.peer == "presidio":
        peer = peer_presidio(src, min(args.rows, args.peer_rows))
        if "rows_per_s" in peer:
            peer["ratio"] = round(result["rows_per_s"] / peer["rows_per_s"], 2)
        result["peer"] = peer
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.rows:,} rows in {seconds:.1f} s: {result['rows_per_s']:,} rows/s, peak RSS {result['peak_rss_mb']:,} MB "
          f"({args.vault} {args.backend} vault, load {result['load']})")
    for name, secs in sorted(result["stages"].items(), key=lambda kv: -float(kv[1])):
        print(f"  {name:<28} {float(secs):8.2f} s")
    if "peer" in result:
        p = result["peer"]
        print(f"  peer {p.get('tool', 'presidio')}: {p.get('rows_per_s', '-')} rows/s on {p.get('rows', '-')} rows; ratio {p.get('ratio', p.get('error'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
