"""The launcher's streaming manifest is rebuilt from committed window manifests: that rebuild must give back
exactly the counts, files, inputs and reasons the windows recorded, for any window contents."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.core.stats import FileStat, RunStats
from cloakbeam.pipeline.manifest import build_manifest
from cloakbeam.pipeline.streaming import stats_from_window_manifests, window_label
from cloakbeam.schemas.avro import load_schema
from cloakbeam.tests.runners_fixtures import POLICY, SCHEMA
from cloakbeam.transforms.policy import load_policy

_POLICY = load_policy(str(POLICY), load_schema(str(SCHEMA)))
_T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

names = st.text(alphabet="abcdef0123456789", min_size=1, max_size=8)
files = st.builds(lambda n, r, b, kind: FileStat(path=f"{kind}/{n}.x", rows=r, bytes=b, sha256="0" * 64, kind=kind),
                  names, st.integers(0, 10_000), st.integers(0, 10**9), st.sampled_from(["data", "quarantine"]))


@st.composite
def window_stats(draw) -> RunStats:
    s = RunStats()
    for k in ("input", "written", "quarantined", "suppressed"):
        s.counts[k] = draw(st.integers(0, 10_000))
    for f in draw(st.lists(files, max_size=5, unique_by=lambda f: f.path)):
        s.files.append(f)
    for n in draw(st.lists(names, max_size=3, unique=True)):
        s.inputs[f"/in/{n}.jsonl"] = {"bytes": 1, "sha256": "1" * 64, "records": draw(st.integers(0, 100)), "format": "jsonl"}
    for n in draw(st.lists(names, max_size=3, unique=True)):
        s.reasons[n] = draw(st.integers(1, 50))
        s.fields[f"f.{n}"] = draw(st.integers(1, 50))
    return s


def _window_manifest(stats: RunStats, i: int) -> dict:
    # distinct windows never share file or input names: prefix them per window
    for f in stats.files:
        f.path = f"{f.kind}/w{i}/{f.path.rsplit('/', 1)[1]}"
    stats.inputs = {f"/in/w{i}/{k.rsplit('/', 1)[1]}": v for k, v in stats.inputs.items()}
    m = build_manifest(run_id="r", started=_T, finished=_T, runner="direct", policy=_POLICY, stats=stats, streaming=True)
    m["window"] = {"label": window_label(60 * i, 60 * (i + 1))}
    return json.loads(json.dumps(m))  # as read back from disk


@settings(max_examples=40, deadline=None)
@given(st.lists(window_stats(), min_size=1, max_size=4))
def test_rebuilt_stats_are_the_sum_of_the_windows(windows):
    expected = RunStats()
    manifests = []
    for i, s in enumerate(windows):
        manifests.append(_window_manifest(s, i))
        expected.merge(s)
    got = stats_from_window_manifests(manifests)
    assert dict(got.counts) == {k: v for k, v in expected.counts.items()}
    assert got.reasons == expected.reasons and got.fields == expected.fields
    assert got.inputs == expected.inputs
    assert sorted((f.path, f.rows, f.bytes, f.kind) for f in got.files) == sorted((f.path, f.rows, f.bytes, f.kind) for f in expected.files)
