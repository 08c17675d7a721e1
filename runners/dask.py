"""The `dask` profile: Beam's DaskRunner on a dask.distributed cluster.

`--dask-address tcp://host:8786` connects to an existing scheduler. Without it, cloakbeam starts a
`LocalCluster` of worker *processes* (default 2, one thread each) listening on 127.0.0.1 for the duration of the
run and shuts it down afterwards. The DaskRunner opens its own `Client` from `--dask_client_address`; this
profile closes that client when the run ends.

The DaskRunner executes some pipeline shapes wrongly without an error (see runners/shape.py); this profile's
runner checks the built pipeline first and refuses such a shape with ConfigError. It never falls back to
another runner.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cloakbeam.errors import ConfigError
from cloakbeam.runners.base import RunnerHandle, no_fallback, reject_unknown

OPTIONS = ("dask_address", "workers", "threads_per_worker", "npartitions")
DEFAULT_WORKERS = 2
PARTITIONS_PER_WORKER = 2


def _runner_class() -> type:
    try:
        from apache_beam.runners.dask.dask_runner import DaskRunner
    except ImportError as exc:  # pragma: no cover - dask is a declared dependency
        raise no_fallback("dask", exc) from None

    class CheckedDaskRunner(DaskRunner):
        """DaskRunner that refuses pipeline shapes it would run wrongly and remembers the client it opened."""

        def __init__(self) -> None:
            super().__init__()
            self.results: list[Any] = []

        def run_pipeline(self, pipeline: Any, options: Any) -> Any:
            from apache_beam.options.pipeline_options import StandardOptions

            from cloakbeam.runners.shape import dask_shape_problems

            if options.view_as(StandardOptions).streaming:
                raise ConfigError("--runner dask runs batch jobs only; use --runner direct (local) or flink/dataflow for streaming")
            problems = dask_shape_problems(pipeline)
            if problems:
                raise ConfigError("this pipeline would run incorrectly on the DaskRunner: " + "; ".join(problems))
            result = self._run_with_materialized_side_inputs(pipeline, options)
            self.results.append(result)
            return result

        def _run_with_materialized_side_inputs(self, pipeline: Any, options: Any) -> Any:
            """DaskRunner.run_pipeline, except that side inputs are computed on the cluster first and handed to
            their consumers as plain lists.

            Beam's DaskRunner evaluates a side input lazily inside every task that reads it (a nested compute
            from the worker), which re-serializes the graph there: that fails as soon as a DoFn holds anything
            unpicklable after setup() (a socket, a key service), and recomputes the side input per partition.
            """
            import dask
            import dask.distributed as ddist
            from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunnerResult
            from apache_beam.runners.dask.overrides import dask_overrides

            dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
            bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
            npartitions = int(bag_kwargs.get("npartitions") or 1)
            client = ddist.Client(**dask_options)
            try:
                pipeline.replace_all(dask_overrides())
                base = type(self.to_dask_bag_visitor(bag_kwargs))

                class MaterializingVisitor(base):  # type: ignore[misc, valid-type]
                    def visit_transform(self, node: Any) -> None:
                        if type(node.transform).__name__ == "_Reshuffle" and len(node.inputs) == 1:
                            # Beam's DaskRunner turns Reshuffle into a no-op, so one input pattern keeps every
                            # file in one partition (one worker). Spread the elements over the partitions.
                            producer = node.inputs[0].producer
                            if producer in self.bags:
                                bag = self.bags[producer]
                                self.bags[node] = bag.repartition(npartitions=max(bag.npartitions, npartitions))
                                return
                        swapped = {}
                        mains = {pc.producer for pc in node.inputs if hasattr(pc, "producer")}
                        for si in node.side_inputs:
                            producer = si.pvalue.producer
                            if producer in swapped or producer not in self.bags:
                                continue
                            if producer in mains:
                                raise ConfigError(f"step '{node.full_label}' reads the same collection as main and side input, which the DaskRunner cannot run")
                            swapped[producer] = self.bags[producer]
                            self.bags[producer] = list(client.compute(self.bags[producer], optimize_graph=False).result())
                        try:
                            super().visit_transform(node)
                        finally:
                            self.bags.update(swapped)
                        if has_side_inputs and fan_out.get(node, 0) > 1 and hasattr(self.bags.get(node), "dask"):
                            # Side inputs are computed separately (above), so a collection both they and the main
                            # graph read (k-anonymity counts the batches it then generalizes) would be read and
                            # protected twice; keep it in cluster memory instead, computed once.
                            self.bags[node] = client.persist(self.bags[node])

                fan_out, has_side_inputs = _consumer_counts(pipeline)
                visitor = MaterializingVisitor(bag_kwargs=bag_kwargs) if "bag_kwargs" in getattr(base, "__dataclass_fields__", {}) else MaterializingVisitor()
                pipeline.visit(visitor)
                opt_graph = dask.optimize(list(visitor.bags.values())[-1])
                futures = client.compute(opt_graph)
            except BaseException:
                client.close()
                raise
            return DaskRunnerResult(client, futures)

        def close_clients(self) -> None:
            while self.results:
                result = self.results.pop()
                with contextlib.suppress(Exception):
                    result.client.close()

    return CheckedDaskRunner


def _consumer_counts(pipeline: Any) -> tuple[dict[Any, int], bool]:
    """How many steps read each step's output (as main or side input), and whether any side input exists."""
    from apache_beam.pipeline import PipelineVisitor

    counts: dict[Any, int] = {}
    side = [False]

    class Count(PipelineVisitor):
        def visit_transform(self, node: Any) -> None:
            for pc in node.inputs:
                if hasattr(pc, "producer"):
                    counts[pc.producer] = counts.get(pc.producer, 0) + 1
            for si in node.side_inputs:
                side[0] = True
                counts[si.pvalue.producer] = counts.get(si.pvalue.producer, 0) + 1

    pipeline.visit(Count())
    return counts, side[0]


class DaskHandle(RunnerHandle):
    name = "dask"

    def __init__(self, beam_runner: Any, options: Any, address: str | None, workers: int, threads: int) -> None:
        super().__init__(beam_runner, options)
        self.address = address
        self.workers = workers
        self.threads = threads
        self.cluster: Any = None
        self.auto_partitions = False

    @contextlib.contextmanager
    def session(self) -> Iterator[DaskHandle]:
        """Start a LocalCluster when no scheduler address was given; close the run's client and the cluster."""
        from apache_beam.runners.dask.dask_runner import DaskOptions

        dopts = self.options.view_as(DaskOptions)
        try:
            if self.address is None:
                self.cluster = start_local_cluster(self.workers, self.threads)
                dopts.address = self.cluster.scheduler_address
            else:
                dopts.address = self.address
                if self.auto_partitions:
                    dopts.npartitions = PARTITIONS_PER_WORKER * max(1, count_workers(self.address, dopts.timeout))
            yield self
        finally:
            self.beam_runner.close_clients()
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.close()
                self.cluster = None


def count_workers(address: str, timeout: Any = None) -> int:
    """Workers currently registered with the scheduler at `address` (raises when it cannot be reached)."""
    from distributed import Client

    kwargs = {"timeout": timeout} if isinstance(timeout, (int, float)) else {}
    with Client(address, **kwargs) as client:
        return len(client.scheduler_info().get("workers", {}))


def start_local_cluster(workers: int = DEFAULT_WORKERS, threads_per_worker: int = 1) -> Any:
    """A dask.distributed LocalCluster of worker processes over TCP on loopback, without a dashboard."""
    try:
        from distributed import LocalCluster
    except ImportError as exc:  # pragma: no cover
        raise no_fallback("dask", exc) from None
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
        silence_logs=logging.WARNING,
    )


def make(beam_args: Sequence[str], runner_options: Mapping[str, Any] | None) -> tuple[DaskHandle, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.dask.dask_runner import DaskOptions

    opts = reject_unknown("dask", runner_options, OPTIONS)
    options = PipelineOptions(list(beam_args))
    if options.view_as(StandardOptions).streaming:
        raise ConfigError("--runner dask runs batch jobs only; drop --streaming or use another runner")
    dopts = options.view_as(DaskOptions)
    address = opts.get("dask_address")
    if dopts.address and address and dopts.address != address:
        raise ConfigError("--dask-address and --dask_client_address name different schedulers; give only one")
    address = address or dopts.address
    if address is not None and not str(address).strip():
        raise ConfigError("--dask-address is empty; give the scheduler address, e.g. tcp://10.0.0.5:8786")
    workers = int(opts.get("workers") or DEFAULT_WORKERS)
    threads = int(opts.get("threads_per_worker") or 1)
    if workers < 1 or threads < 1:
        raise ConfigError("--workers must be at least 1")
    if address is not None and opts.get("workers"):
        raise ConfigError("--workers sizes a local cluster; with --dask-address the existing cluster decides its workers")
    auto_partitions = False
    if dopts.npartitions is None and dopts.partition_size is None:
        auto_partitions = address is not None and not opts.get("npartitions")
        dopts.npartitions = int(opts.get("npartitions") or workers * PARTITIONS_PER_WORKER)
    if dopts.npartitions is not None and dopts.npartitions < 1:
        raise ConfigError("--dask_npartitions must be at least 1")
    options.view_as(StandardOptions).runner = None
    handle = DaskHandle(_runner_class()(), options, address, workers, threads)
    handle.auto_partitions = auto_partitions
    return handle, options
