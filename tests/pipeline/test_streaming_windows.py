"""Streaming on the DirectRunner in streaming mode with TestStream: fixed windows, late data (dropped beyond the
allowed lateness, a late pane within it), per-window manifests, and a restart that rewrites the same files."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import IntervalWindow, TimestampedValue

from cloakbeam.errors import ConfigError
from cloakbeam.pipeline.graph import RunSettings, prepare
from cloakbeam.pipeline.streaming import build_streaming_graph, read_window_manifests, stream_options_for, window_label
from cloakbeam.tests.runners_fixtures import POLICY, SCHEMA, make_inputs

ROWS = 300
W = 60.0


def _policy(tmp: Path, lateness: float) -> Path:
    """The reference policy as it is now, with the stream's window and lateness set where k-anonymity needs them."""
    doc = yaml.safe_load(POLICY.read_text())
    if "k_anonymity" in doc:
        doc["k_anonymity"]["streaming"] = {"window_seconds": W, "allowed_lateness_seconds": lateness}
    p = tmp / "policy.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-in")
    out = []
    for i in range(3):
        make_inputs(d / f"f{i}", rows=ROWS, files=1, dirty=0.02)
        out.append(str(next((d / f"f{i}").glob("*.jsonl"))))
    return out


def _run(files, out: Path, state: Path, policy: Path, lateness: float, late_at: float) -> None:
    """Files 0 and 1 in windows [0,60) and [60,120); file 2 (event time 5 s) arrives after the watermark
    passed `late_at`."""
    run = prepare(RunSettings(dev=True, inputs=files, schema=str(SCHEMA), policy=str(policy), output=str(out), batch_size=100, state_dir=str(state), progress=False, runner_options={"streaming": True, "allowed_lateness": lateness}))
    opts = stream_options_for(run.policy, {"allowed_lateness": lateness})
    source = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([TimestampedValue(files[0], 1), TimestampedValue(files[1], W + 1)])
        .add_elements([TimestampedValue(files[0], 2)])  # seen twice in one window: read once
        .advance_watermark_to(late_at)
        .add_elements([TimestampedValue(files[2], 5)])
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(runner=BundleBasedDirectRunner(), options=options)
    build_streaming_graph(p, run, opts, source=source)
    p.run().wait_until_finish()


def _snapshot(out: Path) -> dict:
    files = {f.relative_to(out).as_posix(): pq.read_metadata(f).num_rows for f in (out / "data").rglob("*.parquet")}
    windows = {m["window"]["label"]: (m["counts"], sorted((o["path"], o["rows"]) for o in m["outputs"])) for m in read_window_manifests(str(out))}
    return {"files": files, "windows": windows}


@pytest.fixture(scope="module")
def dropped(tmp_path_factory, files):
    base = tmp_path_factory.mktemp("stream-dropped")
    policy = _policy(base, 0.0)
    _run(files, base / "out", base / "state", policy, lateness=0.0, late_at=2 * W + 1)
    return base


@pytest.fixture(scope="module")
def late_pane(tmp_path_factory, files):
    base = tmp_path_factory.mktemp("stream-late")
    policy = _policy(base, 300.0)
    _run(files, base / "out", base / "state", policy, lateness=300.0, late_at=2 * W + 1)
    return base


W0 = window_label(0, W)
W1 = window_label(W, 2 * W)


def test_one_manifest_per_window_and_each_reconciles(dropped):
    ms = {m["window"]["label"]: m for m in read_window_manifests(str(dropped / "out"))}
    assert sorted(ms) == [W0, W1]
    for label, m in ms.items():
        assert m["mode"] == "streaming" and m["reconciled"], label
        c = m["counts"]
        assert c["input"] == ROWS  # file 0 read once although it was seen twice
        assert c["written"] + c["quarantined"] + c["suppressed"] == ROWS
        assert m["window"]["timing"] == "ON_TIME" and m["window"]["pane_index"] == 0
        assert len(m["inputs"]) == 1


def test_window_files_live_under_their_window_and_match_the_manifest(dropped):
    out = dropped / "out"
    for m in read_window_manifests(str(out)):
        label = m["window"]["label"]
        on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "data" / label).rglob("*.parquet"))  # split=<name>/ below
        listed = sorted(o["path"] for o in m["outputs"])
        assert on_disk == listed and listed, label
        for o in m["outputs"]:
            data = (out / o["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == o["sha256"]
            assert pq.read_metadata(out / o["path"]).num_rows == o["rows"]
            assert o["window"] == label
        assert sum(o["rows"] for o in m["outputs"]) == m["counts"]["written"]
    assert not list(out.rglob(".tmp-*"))  # nothing left half-committed


def test_data_later_than_allowed_lateness_is_dropped_before_it_is_read(dropped, files):
    ms = read_window_manifests(str(dropped / "out"))
    read = {i["path"] for m in ms for i in m["inputs"]}
    assert files[2] not in read
    assert sum(m["counts"]["input"] for m in ms) == 2 * ROWS


def test_dropped_late_file_is_listed_not_lost(dropped, late_pane, files):
    """The source's ledger names every file it produced, so the one Beam dropped for lateness is reported."""
    from cloakbeam.pipeline.streaming import unread_late_files

    late = unread_late_files(str(dropped / "out"))
    assert [f["path"] for f in late] == [files[2]] and late[0]["event_time"] == 5.0
    assert unread_late_files(str(late_pane / "out")) == []  # within the lateness: read in a late pane


def test_late_data_within_lateness_updates_its_window_with_a_late_pane(late_pane, files):
    ms = {m["window"]["label"]: m for m in read_window_manifests(str(late_pane / "out"))}
    w0 = ms[W0]
    assert w0["window"]["timing"] == "LATE" and w0["window"]["pane_index"] >= 1
    assert w0["counts"]["input"] == 2 * ROWS  # cumulative: on-time file 0 plus late file 2
    assert {i["path"] for i in w0["inputs"]} == {files[0], files[2]}
    assert w0["reconciled"]
    assert ms[W1]["counts"]["input"] == ROWS


def test_restart_on_the_same_input_does_not_duplicate(tmp_path, files):
    policy = _policy(tmp_path, 0.0)
    out, state = tmp_path / "out", tmp_path / "state"
    _run(files, out, state, policy, lateness=0.0, late_at=2 * W + 1)
    first = _snapshot(out)
    _run(files, out, state, policy, lateness=0.0, late_at=2 * W + 1)  # restart: same output, same keys
    second = _snapshot(out)
    assert second == first
    assert sum(first["files"].values()) == sum(c["written"] for c, _ in first["windows"].values())


def test_window_label_matches_the_sink_directory_label():
    from cloakbeam.transforms.steps import _window_label

    assert _window_label(IntervalWindow(120, 180)) == window_label(120, 180)


def test_window_manifests_hold_no_raw_values(dropped, files):
    text = "\n".join(p.read_text() for p in (dropped / "out" / "manifests").glob("*.json"))
    rows = []
    for line in Path(files[0]).read_bytes().decode("utf-8", "replace").splitlines()[:50]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    secrets = [r.get(k) for r in rows if isinstance(r, dict) for k in ("email", "ssn", "full_name", "phone") if isinstance(r.get(k), str)]
    assert secrets
    assert not [s for s in secrets if s in text]


def test_kanon_window_mismatch_is_refused(tmp_path):
    doc = yaml.safe_load(POLICY.read_text())
    if "k_anonymity" not in doc:
        pytest.skip("reference policy has no k_anonymity section")
    run = prepare(RunSettings(dev=True, inputs=[str(tmp_path / "*.jsonl")], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), state_dir=str(tmp_path / "s"), progress=False, runner_options={"streaming": True}))
    with pytest.raises(ConfigError, match="differs from the policy's k_anonymity window"):
        stream_options_for(run.policy, {"window_seconds": 17})


@pytest.mark.parametrize("opts,message", [({"window_seconds": 0}, "--window-seconds must be positive"), ({"allowed_lateness": -1}, "must not be negative"), ({"poll_seconds": -2}, "--poll-seconds")])
def test_bad_stream_options(tmp_path, opts, message):
    from cloakbeam.pipeline.streaming import StreamOptions

    kw = {"window_seconds": 60.0, "allowed_lateness": 0.0, "poll_seconds": 5.0, **{k: float(v) for k, v in opts.items()}}
    with pytest.raises(ConfigError, match=message):
        StreamOptions(**kw).check()


def test_cli_stream_options_need_streaming(tmp_path, capsys):
    from cloakbeam.cli.main import main

    inputs = make_inputs(tmp_path / "in", rows=10, files=1, dirty=0.0)
    code = main(["run", "--dev", "--input", inputs[0], "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "out"), "--window-seconds", "30"])
    assert code == 2 and "applies to --streaming runs only" in capsys.readouterr().err


def test_cli_streaming_on_dask_is_refused(tmp_path, capsys):
    from cloakbeam.cli.main import main

    code = main(["run", "--dev", "--streaming", "--runner", "dask", "--input", str(tmp_path / "*.jsonl"), "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "out")])
    assert code == 2 and "cannot run the streaming pipeline" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_watch_picks_up_files_as_they_arrive(tmp_path, capsys):
    """The local watch (PeriodicImpulse + seen-file state): a file present at start, one arriving later, one
    hidden (still being written) that must be ignored; manifest.json summarizes the committed windows."""
    from cloakbeam.cli.main import main

    make_inputs(tmp_path / "src", rows=150, files=3, dirty=0.0)
    src = sorted((tmp_path / "src").glob("*.jsonl"))
    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copy(src[0], watch / src[0].name)
    shutil.copy(src[2], watch / (".partial-" + src[2].name))

    def later():
        time.sleep(2.5)
        shutil.copy(src[1], watch / src[1].name)

    t = threading.Thread(target=later)
    t.start()
    code = main(["run", "--dev", "--streaming", "--watch-seconds", "6", "--poll-seconds", "1", "--input", str(watch / "*.jsonl"), "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "out"), "--batch-size", "100"])
    t.join()
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["mode"] == "streaming" and m["reconciled"]
    assert m["counts"]["input"] == 300
    assert {Path(i["path"]).name for i in m["inputs"]} == {src[0].name, src[1].name}
    assert m["windows"] and all(w["reconciled"] for w in m["windows"])
    for w in m["windows"]:
        assert (tmp_path / "out" / w["manifest"]).is_file()
    try:
        from cloakbeam.keys.signing import verify_output
    except ImportError:
        return
    assert verify_output(tmp_path / "out") == []  # signed, every listed file intact, nothing unlisted
    for w in m["windows"]:
        assert (tmp_path / "out" / (w["manifest"] + ".sig")).is_file()  # each window manifest is signed too


@pytest.mark.parametrize("runner", ["flink", "dataflow"])
def test_production_streaming_graph_translates_to_portable_proto(tmp_path, runner):
    """On Flink/Dataflow the source is fileio.MatchContinuously; the graph must build and translate (not run here)."""
    from cloakbeam.pipeline.streaming import StreamOptions

    run = prepare(RunSettings(dev=True, inputs=[str(tmp_path / "*.jsonl")], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), state_dir=str(tmp_path / "s"), progress=False, runner_options={"streaming": True}))
    run.settings.runner = runner
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(options=options)
    build_streaming_graph(p, run, stream_options_for(run.policy, {}))
    proto = p.to_runner_api()
    names = " ".join(t.unique_name for t in proto.components.transforms.values())
    assert "Source/Match0" in names and "CommitWindow" in names and "Tick" not in names
    assert isinstance(stream_options_for(run.policy, {}), StreamOptions)
