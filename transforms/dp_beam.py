"""Beam adapter for `dp_statistics`: raw RecordBatches -> PipelineDP (Beam backend) -> one RunStats of results.

    raw ─ Contributions[i] (plain `contributions`, per statistic) ─ DPEngine.aggregate (public partitions)
        ─ ToList ─┐
    ...           ├─ Flatten ─ Collect ─► RunStats(extra={"dp_statistics": [...]})
        ─ ToList ─┘

One linear branch with a single end that the graph joins with its main chain in one final Flatten (the
DaskRunner computes only one leaf). Each statistic has its own NaiveBudgetAccountant holding exactly its declared
(epsilon, delta), so the spent budget is the declared sum (sequential composition). Budgets are computed when the
graph is built, before the run. RunStats elements are not contributions and are dropped here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.core.stats import RunStats, is_stats
from cloakbeam.transforms.dp import KEY_PURPOSE, DpSpec, DpStatistic, contributions


class _Contributions(beam.DoFn):
    """(privacy id digest, partition label, value) tuples of one statistic from a raw batch."""

    def __init__(self, stat: DpStatistic, privacy_unit: str, runtime: RuntimeConfig) -> None:
        self.stat = stat
        self.privacy_unit = privacy_unit
        self.runtime = runtime

    def setup(self) -> None:
        from cloakbeam.transforms.registry import ActionContext

        self.ctx = ActionContext(self.runtime)

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any) -> Iterator[tuple[int, str, float]]:
        if is_stats(element) or element.num_rows == 0:
            return
        from cloakbeam.transforms.protect import flatten_columns

        columns = flatten_columns(element)
        pids, keys, vals = contributions(columns, self.stat, self.privacy_unit, self.ctx.keys.prf_key(KEY_PURPOSE), element.num_rows)
        yield from zip(pids, keys, vals)


def _params(stat: DpStatistic) -> Any:
    import pipeline_dp

    metric = {"count": pipeline_dp.Metrics.COUNT, "sum": pipeline_dp.Metrics.SUM, "mean": pipeline_dp.Metrics.MEAN}[stat.metric]
    kwargs: dict[str, Any] = {}
    if stat.metric in ("sum", "mean"):
        kwargs.update(min_value=stat.min_value, max_value=stat.max_value)
    return pipeline_dp.AggregateParams(
        metrics=[metric],
        noise_kind=pipeline_dp.NoiseKind.GAUSSIAN if stat.noise == "gaussian" else pipeline_dp.NoiseKind.LAPLACE,
        max_partitions_contributed=stat.max_partitions_contributed,
        max_contributions_per_partition=stat.max_contributions_per_partition,
        output_noise_stddev=stat.metric in ("count", "sum"),
        **kwargs,
    )


def _result_record(rows: list[tuple[str, Any]], name: str, metric: str, bounds: tuple[float, float] | None) -> dict[str, Any]:
    results: dict[str, dict[str, float]] = {}
    for key, m in rows:
        d = m._asdict() if hasattr(m, "_asdict") else dict(m)
        value = float(d[metric])
        if bounds is not None:  # post-processing keeps DP: a noisy mean of an empty partition can leave the bounds
            value = min(max(value, bounds[0]), bounds[1])
        entry = {"value": round(value, 6)}
        std = d.get(f"{metric}_noise_stddev")
        if std is not None:
            entry["noise_stddev"] = round(float(std), 6)
        results[str(key)] = entry
    return {"name": name, "metric": metric, "results": dict(sorted(results.items()))}


def _as_stats(records: list[dict[str, Any]]) -> RunStats:
    return RunStats(extra={"dp_statistics": sorted(records, key=lambda r: r["name"])})


class ComputeDpStatistics(beam.PTransform):
    """Every declared statistic over the raw records, with PipelineDP; yields exactly one RunStats."""

    def __init__(self, spec: DpSpec, runtime: RuntimeConfig) -> None:
        super().__init__()
        self.spec = spec
        self.runtime = runtime

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        ends = []
        for i, stat in enumerate(self.spec.statistics):
            rows = pcoll | f"Contributions{i}" >> beam.ParDo(_Contributions(stat, self.spec.privacy_unit, self.runtime))
            ends.append(rows | f"Aggregate{i}" >> _Aggregate(stat))
        return (
            tuple(ends)
            | "JoinStatistics" >> beam.Flatten()
            | "AllStatistics" >> beam.combiners.ToList()
            | "AsRunStats" >> beam.Map(_as_stats)
        )


class _Aggregate(beam.PTransform):
    """One statistic through PipelineDP in its own scope (its stage labels are prefixed by this one's), with its
    own accountant holding exactly the statistic's (epsilon, delta)."""

    def __init__(self, stat: DpStatistic) -> None:
        super().__init__()
        self.stat = stat

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        import pipeline_dp

        stat = self.stat
        accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=stat.epsilon, total_delta=stat.delta)
        engine = pipeline_dp.DPEngine(accountant, pipeline_dp.BeamBackend())
        extractors = pipeline_dp.DataExtractors(privacy_id_extractor=_pid, partition_extractor=_partition, value_extractor=_value)
        result = engine.aggregate(rows, _params(stat), extractors, public_partitions=stat.partitions())
        accountant.compute_budgets()  # before the run: PipelineDP's mechanisms read their budget lazily
        return (
            result
            | "Gather" >> beam.combiners.ToList()
            | "Record" >> beam.Map(_result_record, stat.name, stat.metric, (stat.min_value, stat.max_value) if stat.metric == "mean" else None)
        )


def _pid(row: tuple[int, str, float]) -> int:
    return row[0]


def _partition(row: tuple[int, str, float]) -> str:
    return row[1]


def _value(row: tuple[int, str, float]) -> float:
    return row[2]


__all__ = ["ComputeDpStatistics"]
