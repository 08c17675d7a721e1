"""Crash-consistent outputs (issue 13): a run publishes its output in one step; a failed run leaves the previous
complete output (or nothing) plus a failure record saying why; a rerun replaces, never adds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloakbeam.cli.main import main
from cloakbeam.errors import ConfigError
from cloakbeam.pipeline import publish
from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.tests.paths import POLICY, SCHEMA


def _tree(d: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `d`."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _strict_policy(tmp_path: Path) -> Path:
    raw = yaml.safe_load(open(POLICY))
    raw["k_anonymity"]["k"] = 100_000  # cannot be met: the run fails after ingest wrote its quarantine
    pol = tmp_path / "strict.yaml"
    pol.write_text(yaml.safe_dump(raw))
    return pol


def _siblings(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def _run_cli(inp: str, out: Path, policy: Path = POLICY, *extra: str) -> int:
    return main(["run", "--dev", "--input", inp, "--schema", str(SCHEMA), "--policy", str(policy), "--output", str(out), *extra])


def test_a_failed_run_leaves_nothing_but_a_failure_record(tmp_path, reference_inputs, capsys):
    out = tmp_path / "out"
    assert _run_cli(reference_inputs["jsonl"]["path"], out, _strict_policy(tmp_path)) == 1
    assert "cannot be met" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [publish.FAILURE_NAME]
    record = json.loads((out / publish.FAILURE_NAME).read_text())
    assert record["error"] == "ConfigError" or record["error"].endswith("Error")
    assert "k-anonymity target k=100000 cannot be met" in record["reason"]
    assert _siblings(out) == []
    # Nothing complete was there: a rerun needs no --overwrite and replaces the failure record.
    assert _run_cli(reference_inputs["jsonl"]["path"], out) == 0
    assert (out / "manifest.json").exists() and not (out / publish.FAILURE_NAME).exists()


def test_a_failed_rerun_keeps_the_previous_complete_output(tmp_path, reference_inputs):
    out = tmp_path / "out"
    assert _run_cli(reference_inputs["csv"]["path"], out) == 0
    before = _tree(out)
    assert _run_cli(reference_inputs["csv"]["path"], out, _strict_policy(tmp_path), "--overwrite") == 1
    after = _tree(out)
    assert after.pop(publish.FAILURE_NAME)
    assert after == before
    assert main(["verify", str(out), "--public-key", os.path.join(os.environ["CLOAKBEAM_STATE_DIR"], "keyring.json")]) == 0
    assert _siblings(out) == []


def test_overwrite_replaces_the_whole_output_without_leftovers(tmp_path, reference_inputs):
    out = tmp_path / "out"
    assert _run_cli(reference_inputs["jsonl"]["path"], out, POLICY, "--batch-size", "500") == 0
    first = set(_tree(out))
    assert _run_cli(reference_inputs["jsonl"]["path"], out, POLICY, "--overwrite", "--batch-size", "1000") == 0
    second = set(_tree(out))
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {o["path"] for o in manifest["outputs"]} | {q["path"] for q in manifest["quarantine"]}
    assert {p for p in second if p.startswith(("data/", "quarantine/"))} == listed
    assert first != second and _siblings(out) == []


def test_without_overwrite_a_complete_run_is_refused_and_strangers_are_protected(tmp_path, reference_inputs):
    s = RunSettings(dev=True, inputs=[reference_inputs["parquet"]["path"]], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "o"), progress=False)
    run_pipeline(s)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_pipeline(s)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("not a run")
    with pytest.raises(ConfigError, match=r"is not empty and holds no cloakbeam run \(first entry: thesis.txt\)"):
        run_pipeline(RunSettings(dev=True, inputs=s.inputs, schema=s.schema, policy=s.policy, output=str(mine), progress=False, overwrite=True))
    assert (mine / "thesis.txt").read_text() == "not a run"


def test_an_input_inside_the_output_is_refused(tmp_path, reference_inputs):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    src = out / "raw" / "c.jsonl"
    src.write_bytes(Path(reference_inputs["jsonl"]["path"]).read_bytes())
    with pytest.raises(ConfigError, match="lies inside the output directory"):
        run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(POLICY), output=str(out), progress=False))


def test_a_killed_runs_staging_is_removed_and_recorded_by_the_next_run(tmp_path, reference_inputs):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    staging = tmp_path / f".out{publish.STAGING_TAG}deadbeef"
    (staging / "data").mkdir(parents=True)
    (staging / "data" / "part-x.parquet").write_bytes(b"half")
    (staging / publish.OWNER_NAME).write_text(json.dumps({"run_id": "deadbeef", "pid": int(dead), "host": __import__("socket").gethostname()}))
    assert publish.recover_abandoned(str(out)) == ["deadbeef"]
    assert not staging.exists()
    record = json.loads((out / publish.FAILURE_NAME).read_text())
    assert record["run_id"] == "deadbeef" and "did not finish" in record["reason"]


def test_a_live_runs_staging_is_not_touched(tmp_path):
    out = tmp_path / "out"
    staging = tmp_path / f".out{publish.STAGING_TAG}live"
    staging.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (staging / publish.OWNER_NAME).write_text(json.dumps({"run_id": "live", "pid": sleeper.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(ConfigError, match=r"another run \(live, process \d+\) is writing to"):
            publish.recover_abandoned(str(out))
        assert staging.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_publish_without_rename_exchange_and_a_crash_between_the_renames(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    plan = publish.plan_output(str(final), "r1", overwrite=True)
    Path(plan.staging, "manifest.json").write_text("new")
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    publish.publish(plan)
    assert (final / "manifest.json").read_text() == "new" and os.listdir(tmp_path) == ["out"]
    # A crash after `final` was renamed aside but before the staged tree arrived: the next run restores it.
    os.rename(final, tmp_path / f".out{publish.OLD_TAG}r2")
    publish.recover_abandoned(str(final))
    assert (final / "manifest.json").read_text() == "new"


def test_publish_swaps_atomically_with_rename_exchange(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    inode = final.stat().st_ino
    plan = publish.plan_output(str(final), "r1", overwrite=True)
    staged_inode = Path(plan.staging).stat().st_ino
    Path(plan.staging, "manifest.json").write_text("new")
    publish.publish(plan)
    assert (final / "manifest.json").read_text() == "new"
    assert final.stat().st_ino in (staged_inode,) and final.stat().st_ino != inode
    assert os.listdir(tmp_path) == ["out"]


def test_failure_records_hold_no_value(tmp_path):
    plan = publish.plan_output(str(tmp_path / "o"), "r", overwrite=False)
    publish.fail(plan, ValueError("secret 219-09-9999"))
    text = (tmp_path / "o" / publish.FAILURE_NAME).read_text()
    assert "219-09-9999" not in text and "ValueError" in text
    assert not Path(plan.staging).exists()


def test_a_streaming_window_commit_moves_its_staged_files_before_its_manifest(tmp_path):
    from cloakbeam.core.stats import FileStat, RunStats
    from cloakbeam.errors import IntegrityError
    from cloakbeam.pipeline.streaming import WINDOW_STAGING, _WindowManifestFn

    out = tmp_path / "out"
    staged = out / WINDOW_STAGING / "data" / "window=w" / "part-1.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"rows")
    fn = _WindowManifestFn(str(out), None, None, "direct", staging=str(out / WINDOW_STAGING))
    stats = RunStats(files=[FileStat("data/window=w/part-1.parquet", 1, 4, "0" * 64)])
    fn._commit_files(stats)
    assert (out / "data" / "window=w" / "part-1.parquet").read_bytes() == b"rows" and not staged.exists()
    fn._commit_files(stats)  # a later pane: already committed
    stats.files.append(FileStat("data/window=w/part-2.parquet", 1, 4, "0" * 64))
    with pytest.raises(IntegrityError, match="neither staged nor committed"):
        fn._commit_files(stats)


def test_an_output_that_cannot_be_renamed_is_staged_inside_and_published_manifest_last(tmp_path, monkeypatch):
    final = tmp_path / "out"
    (final / "data").mkdir(parents=True)
    (final / "data" / "old.parquet").write_text("old")
    (final / "manifest.json").write_text("old")
    monkeypatch.setattr(publish.os.path, "ismount", lambda p: str(p) == str(final))
    plan = publish.plan_output(str(final), "r1", overwrite=True)
    assert plan.mode == "inside" and Path(plan.staging).parent == final
    (Path(plan.staging) / "data").mkdir()
    (Path(plan.staging) / "data" / "new.parquet").write_text("new")
    (Path(plan.staging) / "manifest.json").write_text("new")
    publish.publish(plan)
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == ["data/new.parquet", "manifest.json"]
    assert (final / "manifest.json").read_text() == "new"


def test_a_failed_runs_staging_recreated_by_a_late_worker_is_removed(tmp_path):
    """When one worker dies its sibling may still write into the staging directory for a moment; the failure
    path keeps removing it until it stays gone, and a leftover never overwrites the run's own failure record."""
    import threading
    import time as _time

    plan = publish.plan_output(str(tmp_path / "o"), "r9", overwrite=False)

    def late_writer() -> None:
        _time.sleep(0.3)
        os.makedirs(os.path.join(plan.staging, "data"), exist_ok=True)
        Path(plan.staging, "data", "late.parquet").write_bytes(b"late")

    t = threading.Thread(target=late_writer)
    t.start()
    publish.fail(plan, RuntimeError("worker died"))
    t.join()
    assert not Path(plan.staging).exists()
    os.makedirs(os.path.join(plan.staging, "data"))  # a leftover after all: the next run removes it quietly
    publish.recover_abandoned(str(tmp_path / "o"))
    record = json.loads((tmp_path / "o" / publish.FAILURE_NAME).read_text())
    assert record["run_id"] == "r9" and record["error"] == "RuntimeError"
