"""Fault injection (issue 13): a worker SIGKILLed mid-run, PostgreSQL restarted mid-run, a full disk under the
output, the KMS gone. Each run fails with one sentence (or completes), publishes nothing partial, and a rerun
gives exactly what a clean run gives: same rows, same tokens, no duplicate vault rows."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloakbeam.pipeline import publish
from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.tests.runners_fixtures import POLICY, SCHEMA, comparable_manifest, make_inputs, read_output, run_reference

CLI = [sys.executable, "-m", "cloakbeam.cli.main"]


def _cli_run(inputs: list[str], out: Path, state: Path, *extra: str) -> list[str]:
    return [*CLI, "run", "--dev", "--input", inputs[0], "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(out),
            "--state-dir", str(state), "--batch-size", "200", *extra]


def _staged(out: Path) -> list[str]:
    # data files sit under data/split=<name>/ when the policy splits (the reference policy does)
    return glob.glob(str(out.parent / f".{out.name}{publish.STAGING_TAG}*" / "data" / "**" / "*.parquet"), recursive=True)


def _assert_nothing_published(out: Path) -> None:
    """Either no output at all or only the failure record: never data, quarantine or a manifest."""
    if out.exists():
        assert sorted(os.listdir(out)) in ([], [publish.FAILURE_NAME]), os.listdir(out)
    assert not glob.glob(str(out.parent / f".{out.name}.cloakbeam-*")), "staging left behind"


def _one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("cloakbeam: error")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _same_output(a: Path, b: Path, state: Path) -> None:
    ta, tb = read_output(a, state), read_output(b, state)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].equals(tb[name]), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert comparable_manifest(ma) == comparable_manifest(mb)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------- worker killed
@pytest.mark.slow
def test_sigkill_a_worker_mid_run_then_rerun_equals_a_clean_run(tmp_path):
    import psutil

    inputs = make_inputs(tmp_path / "in", rows=3000, files=3)
    state = tmp_path / "state"
    clean = tmp_path / "clean"
    run_reference(inputs, clean, state, "direct", batch_size=200)

    out = tmp_path / "out"
    proc = subprocess.Popen(_cli_run(inputs, out, state, "--workers", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert _wait_for(lambda: len(_staged(out)) >= 2, proc, 240), "the run ended before it could be interrupted"
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "sdk_worker_main" in " ".join(c.cmdline()) and "python" in os.path.basename(c.cmdline()[0])]
        assert workers, "no SDK worker process found"
        workers[0].send_signal(signal.SIGKILL)
        launcher_killed = False
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:  # a runner that hangs on a lost worker is killed whole: also a crash
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            launcher_killed = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if launcher_killed:
        # The launcher died with its staging directory: nothing is visible under OUT; the rerun cleans up.
        assert not (out / "manifest.json").exists() and not (out / "data").exists()
    else:
        assert proc.returncode == 1, err[-3000:]
        assert "runner failed" in _one_sentence(err)
        assert "RuntimeError" in json.loads((out / publish.FAILURE_NAME).read_text())["reason"]
        _assert_nothing_published(out)
    run_reference(inputs, out, state, "direct", runner_options={"workers": 2}, batch_size=200)
    _same_output(out, clean, state)
    assert not glob.glob(str(tmp_path / ".out.cloakbeam-*"))


# ---------------------------------------------------------------------------------------------- PostgreSQL
@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarted_mid_run_then_rerun_gives_the_same_tokens_and_no_duplicate_rows(tmp_path, monkeypatch):
    import psycopg

    from cloakbeam.tests.vault_fixtures import DedicatedPostgres

    server = DedicatedPostgres()
    try:
        inputs = make_inputs(tmp_path / "in", rows=2500, files=2)
        state = tmp_path / "state"
        config = tmp_path / "config.yaml"
        config.write_text("vault:\n  backend: postgres\n  dsn_env: CB_FAULT_DSN\n")
        clean_db, fault_db = server.database(), server.database()

        monkeypatch.setenv("CB_FAULT_DSN", clean_db)
        clean = tmp_path / "clean"
        run_pipeline(RunSettings(dev=True, inputs=inputs, schema=str(SCHEMA), policy=str(POLICY), output=str(clean), batch_size=200,
                                 state_dir=str(state), config=str(config), progress=False))

        out = tmp_path / "out"
        env = {**os.environ, "CB_FAULT_DSN": fault_db}
        proc = subprocess.Popen([*_cli_run(inputs, out, state), "--config", str(config)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        restarted = threading.Event()

        def restart_when_busy() -> None:
            if _wait_for(lambda: len(_staged(out)) >= 1, proc, 240):
                server.restart()
                restarted.set()

        t = threading.Thread(target=restart_when_busy)
        t.start()
        try:
            _, err = proc.communicate(timeout=400)
        finally:
            t.join()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert restarted.is_set(), "the run ended before the server could be restarted"
        if proc.returncode != 0:  # failed with a sentence, published nothing; else it retried and completed
            assert proc.returncode == 1 and "runner failed" in _one_sentence(err)
            _assert_nothing_published(out)
        monkeypatch.setenv("CB_FAULT_DSN", fault_db)
        run_pipeline(RunSettings(dev=True, inputs=inputs, schema=str(SCHEMA), policy=str(POLICY), output=str(out), batch_size=200,
                                 state_dir=str(state), config=str(config), progress=False, overwrite=True))
        _same_output(out, clean, state)

        def rows(dsn: str) -> list[tuple]:
            with psycopg.connect(dsn) as conn:
                return conn.execute("SELECT domain, token FROM cloakbeam_vault_entries ORDER BY domain, token").fetchall()

        a, b = rows(clean_db), rows(fault_db)
        assert a == b and len(set(b)) == len(b) > 0
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted by the test (root only); skipped, with the reason, where mounting is refused."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this sandbox refuses mounts ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_disk_full_on_the_output_fails_cleanly_and_publishes_nothing(tmp_path, small_disk):
    inputs = make_inputs(tmp_path / "in", rows=6000, files=2, dirty=0.0)
    state = tmp_path / "state"
    out = small_disk / "out"
    proc = subprocess.run(_cli_run(inputs, out, state), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_sentence(proc.stderr)
    assert "No space left on device" in line
    _assert_nothing_published(out)
    assert not [p for p in small_disk.rglob("*") if p.is_file() and p.name != publish.FAILURE_NAME]


@pytest.mark.slow
def test_disk_full_keeps_the_previous_complete_output(tmp_path, small_disk):
    small = make_inputs(tmp_path / "small_in", rows=300, files=1, dirty=0.0)
    big = make_inputs(tmp_path / "big_in", rows=6000, files=2, dirty=0.0)
    state = tmp_path / "state"
    out = small_disk / "out"
    assert subprocess.run(_cli_run(small, out, state), capture_output=True, text=True, timeout=600).returncode == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run(_cli_run(big, out, state, "--overwrite"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "No space left on device" in _one_sentence(proc.stderr)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    after.pop(publish.FAILURE_NAME, None)
    assert after == before
    assert subprocess.run([*CLI, "verify", str(out), "--public-key", str(state / "keyring.json")], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------- KMS gone
@pytest.mark.slow
def test_kms_unavailable_is_a_clear_error_and_nothing_is_written(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    from cloakbeam.keys import service as svc
    from cloakbeam.keys.service import init_keyring
    from cloakbeam.tests.keys_fixtures import free_port

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    ring = tmp_path / "kms-keyring.json"
    init_keyring(ring, provider="aws-kms", params={"endpoint_url": url, "region": "us-east-1"})
    config = tmp_path / "config.yaml"
    config.write_text(f"keys:\n  provider: aws-kms\n  path: {ring}\n  endpoint_url: {url}\n  region: us-east-1\n")
    inputs = make_inputs(tmp_path / "in", rows=300, files=1)
    out = tmp_path / "out"
    server.stop()
    svc._PROCESS.clear()
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    proc = subprocess.run([*_cli_run(inputs, out, tmp_path / "state"), "--config", str(config)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("cloakbeam:")][-1]
    assert "KMS" in line or "aws-kms" in line, line
    assert not out.exists() and not glob.glob(str(tmp_path / ".out.cloakbeam-*"))
