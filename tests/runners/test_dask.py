"""The dask profile on a real dask.distributed LocalCluster (worker processes over TCP on loopback): the reference
pipeline on an existing scheduler, and the pipeline shapes the DaskRunner would run wrongly, refused up front."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.transforms import userstate
from apache_beam.transforms.window import FixedWindows

from cloakbeam.errors import ConfigError
from cloakbeam.runners import make_runner
from cloakbeam.runners.dask import start_local_cluster
from cloakbeam.runners.shape import dask_shape_problems
from cloakbeam.tests.runners_fixtures import AddSideFn, BundleTagDoFn, PidDoFn, TouchDoFn, make_inputs, run_reference


@pytest.fixture(scope="module")
def cluster():
    c = start_local_cluster(2)
    yield c
    c.close()


def _run_on(cluster, build) -> list:
    """Run a small pipeline on the cluster through the dask profile; collect results through a file-free path."""
    handle, options = make_runner("dask", ["--dask_npartitions=4"], {"dask_address": cluster.scheduler_address})
    with handle.session():
        p = beam.Pipeline(runner=handle.beam_runner, options=options)
        build(p)
        result = p.run()
        result.wait_until_finish()
        futures = result.futures if isinstance(result.futures, (list, tuple)) else [result.futures]
        return [x for f in futures for x in f.result()]


def _run_clients(cluster) -> list[str]:
    import time

    for _ in range(50):
        left = [c for c in cluster.scheduler.clients if not str(c).startswith("fire-and-forget")]
        if not left:
            break
        time.sleep(0.1)
    return left


# ------------------------------------------------------------------------------------------ real cluster
@pytest.mark.slow
def test_reference_pipeline_on_existing_scheduler(cluster, tmp_path):
    inputs = make_inputs(tmp_path / "in", rows=800, files=2)
    manifest = run_reference(inputs, tmp_path / "out", tmp_path / "state", "dask", {"dask_address": cluster.scheduler_address}, batch_size=300)
    assert manifest["reconciled"] and manifest["runner"] == "dask"
    assert manifest["counts"]["input"] == 1600


@pytest.mark.slow
def test_partitions_follow_the_existing_clusters_workers(cluster):
    from apache_beam.runners.dask.dask_runner import DaskOptions

    handle, options = make_runner("dask", [], {"dask_address": cluster.scheduler_address})
    with handle.session():
        assert options.view_as(DaskOptions).npartitions == 4  # 2 per worker, 2 workers
    handle, options = make_runner("dask", ["--dask_npartitions=3"], {"dask_address": cluster.scheduler_address})
    with handle.session():
        assert options.view_as(DaskOptions).npartitions == 3
    # the existing cluster is left running, with its workers, after the run's own client was closed
    assert len(cluster.scheduler_info["workers"]) == 2
    assert _run_clients(cluster) == []  # the run's client was closed


@pytest.mark.slow
def test_work_runs_in_worker_processes_not_the_launcher(cluster):
    out = _run_on(cluster, lambda p: p | beam.Create(list(range(40))) | beam.ParDo(PidDoFn()))
    pids = {pid for _, pid in out}
    assert pids and os.getpid() not in pids
    assert sorted(x for x, _ in out) == list(range(40))


@pytest.mark.slow
def test_reshuffle_spreads_one_partition_over_the_cluster(cluster):
    """Beam's DaskRunner drops Reshuffle; the profile repartitions there, so files matched from one pattern are
    read in parallel (4 partitions here) instead of all in the partition of their single pattern."""
    out = _run_on(cluster, lambda p: p | beam.Create(["x"]) | beam.FlatMap(lambda _: range(8)) | beam.Reshuffle() | beam.ParDo(BundleTagDoFn()))
    assert sorted(x for x, _ in out) == list(range(8))
    assert len({b for _, b in out}) == 4


@pytest.mark.slow
def test_side_input_is_correct_and_its_upstream_runs_once(cluster, tmp_path):
    """A side input derived from the main input (the k-anonymity shape): right values, upstream computed once."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def build(p):
        xs = p | beam.Create(list(range(10))) | beam.ParDo(TouchDoFn(str(marks)))
        total = xs | beam.CombineGlobally(sum)
        _ = xs | beam.ParDo(AddSideFn(), total=beam.pvalue.AsSingleton(total))

    out = _run_on(cluster, build)
    assert sorted(out) == [(i, 45) for i in range(10)]
    assert len(list(marks.iterdir())) == 10


@pytest.mark.slow
def test_no_silent_fallback_when_scheduler_unreachable(tmp_path):
    inputs = make_inputs(tmp_path / "in", rows=10, files=1, dirty=0.0)
    with pytest.raises(Exception) as info:
        run_reference(inputs, tmp_path / "out", tmp_path / "state", "dask", {"dask_address": "tcp://127.0.0.1:9"}, beam_args=["--dask_connection_timeout=2"])
    assert not isinstance(info.value, AssertionError)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ shape checks
def test_reference_graph_has_no_dask_problems(tmp_path):
    from cloakbeam.pipeline.graph import RunSettings, build_graph, prepare
    from cloakbeam.tests.runners_fixtures import POLICY, SCHEMA

    inputs = make_inputs(tmp_path / "in", rows=10, files=1, dirty=0.0)
    run = prepare(RunSettings(dev=True, inputs=inputs, schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), state_dir=str(tmp_path / "s"), runner="dask", progress=False))
    p = beam.Pipeline()
    build_graph(p, run)
    assert dask_shape_problems(p) == []


class _Tagged(beam.DoFn):
    def process(self, x):
        yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x)


class _FinishBundle(beam.DoFn):
    def process(self, x):
        yield x

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        yield WindowedValue(-1, 0, [GlobalWindow()])


class _Stateful(beam.DoFn):
    SEEN = userstate.BagStateSpec("seen", beam.coders.VarIntCoder())

    def process(self, kv, seen=beam.DoFn.StateParam(SEEN)):
        seen.add(kv[1])
        yield kv


def _two_leaves(p):
    xs = p | beam.Create([1, 2])
    _ = xs | "A" >> beam.Map(lambda x: x)
    _ = xs | "B" >> beam.Map(lambda x: x)


def _tagged(p):
    outs = p | beam.Create([1, 2]) | beam.ParDo(_Tagged()).with_outputs("odd", "even")
    _ = (outs.odd, outs.even) | beam.Flatten()


SHAPES = {
    "two ends": (_two_leaves, "ends"),
    "tagged outputs": (_tagged, "tagged outputs"),
    "windowing": (lambda p: p | beam.Create([1]) | beam.WindowInto(FixedWindows(60)) | beam.Map(lambda x: x), "ignores windowing"),
    "finish_bundle": (lambda p: p | beam.Create([1]) | beam.ParDo(_FinishBundle()), "finish_bundle"),
    "read source": (lambda p: p | beam.io.ReadFromText(__file__), "Read()-based source"),
    "state": (lambda p: p | beam.Create([("k", 1)]) | beam.ParDo(_Stateful()), "state or timers"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bad_shapes_are_listed(shape):
    build, message = SHAPES[shape]
    p = beam.Pipeline()
    build(p)
    problems = dask_shape_problems(p)
    assert any(message in x for x in problems), problems


@pytest.mark.parametrize("shape", ["two ends", "tagged outputs", "finish_bundle"])
def test_bad_shapes_are_refused_before_any_work(shape):
    """The runner refuses the pipeline before it opens a client: an unreachable address proves nothing ran."""
    build, message = SHAPES[shape]
    handle, options = make_runner("dask", ["--dask_npartitions=2"], {"dask_address": "tcp://127.0.0.1:9"})
    p = beam.Pipeline(runner=handle.beam_runner, options=options)
    build(p)
    with pytest.raises(ConfigError, match="would run incorrectly on the DaskRunner.*" + message):
        with handle.session():
            p.run()


def test_linear_chain_with_one_end_is_accepted():
    p = beam.Pipeline()
    _ = p | beam.Create([1, 2]) | beam.Map(lambda x: x + 1) | beam.CombineGlobally(sum).without_defaults()
    assert dask_shape_problems(p) == []


@pytest.mark.slow
def test_local_cluster_started_by_the_profile_is_loopback_processes_and_shut_down():
    import psutil

    handle, options = make_runner("dask", [], {"workers": 2})
    with handle.session():
        cluster = handle.cluster
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        workers = cluster.scheduler_info["workers"]
        assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
        pids = {nanny.pid for nanny in cluster.workers.values()}
        assert os.getpid() not in pids and None not in pids  # separate worker processes
    assert handle.cluster is None
    deadline = __import__("time").time() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids) and __import__("time").time() < deadline:
        __import__("time").sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
