"""Beam adapter for `dp_statistics`: raw RecordBatches -> bounded partial aggregates -> PipelineDP's noise -> one RunStats.

    raw ─ Partials (per batch and statistic: `batch_partial`, contributions bounded per (unit, partition), numpy)
        ─ MergePerStatistic (CombinePerKey: partials merged, still at most k contributions per pair)
        ─ AllStatistics (ToList) ─ AsRunStats (cross-partition bounding, per-partition totals, then PipelineDP's
          combiners' `compute_metrics` add the noise) ─► RunStats(extra={"dp_statistics": [...]})

One linear branch with a single end that the graph joins with its main chain in one final Flatten (the
DaskRunner computes only one leaf). The aggregation before noise is PipelineDP's (same contribution bounding,
same clamping, same accumulators; transforms/dp.py), done over whole batches instead of per record through
Beam; the noise is PipelineDP's own combiners, built and budgeted as `DPEngine.aggregate` builds them: each
statistic has its own NaiveBudgetAccountant holding exactly its declared (epsilon, delta), so the spent budget
is the declared sum (sequential composition). Budgets are computed when the graph is built, before the run.
RunStats elements are not contributions and are dropped here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.core.stats import RunStats, is_stats
from cloakbeam.transforms.dp import (
    KEY_PURPOSE,
    DpPartial,
    DpSpec,
    DpStatistic,
    PartitionTotals,
    batch_partial,
    bounded_totals,
)


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


def budgeted_combiner(stat: DpStatistic) -> Any:
    """PipelineDP's compound combiner for `stat`, with its budget computed: exactly what `DPEngine.aggregate` builds
    (same combiners, same scope, same NaiveBudgetAccountant split of the statistic's (epsilon, delta))."""
    import pipeline_dp
    from pipeline_dp import combiners

    params = _params(stat)
    accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=stat.epsilon, total_delta=stat.delta)
    with accountant.scope(weight=params.budget_weight):
        combiner = combiners.create_compound_combiner(params, accountant)
    accountant.compute_budgets()  # before the run: the mechanisms read their budget lazily
    return combiner


def middle_of(stat: DpStatistic) -> float:
    from pipeline_dp import dp_computations

    return dp_computations.compute_middle(stat.min_value, stat.max_value) if stat.metric == "mean" else 0.0


def compound_accumulators(stat: DpStatistic, totals: PartitionTotals) -> list[tuple[str, Any]]:
    """(partition, PipelineDP compound accumulator) per declared partition: the per-(unit, partition) accumulators
    merged, plus the empty accumulator DPEngine adds for every public partition (row count + 1)."""
    out = []
    for i, label in enumerate(stat.partitions()):
        if stat.metric == "count":
            acc: Any = int(totals.count[i])
        elif stat.metric == "sum":
            acc = float(totals.total[i])
        else:
            acc = (int(totals.count[i]), float(totals.normalized[i]))
        out.append((label, (int(totals.pairs[i]) + 1, (acc,))))
    return out


class _Partials(beam.DoFn):
    """(statistic index, DpPartial) per statistic from a raw batch: contributions bounded per (unit, partition)."""

    def __init__(self, spec: DpSpec, runtime: RuntimeConfig) -> None:
        self.spec = spec
        self.runtime = runtime

    def setup(self) -> None:
        from cloakbeam.transforms.registry import ActionContext

        self.ctx = ActionContext(self.runtime)

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any) -> Iterator[tuple[int, DpPartial]]:
        if is_stats(element) or element.num_rows == 0:
            return
        import time

        from cloakbeam.transforms.protect import flatten_columns

        t0 = time.perf_counter()
        columns = flatten_columns(element)
        key = self.ctx.keys.prf_key(KEY_PURPOSE)
        for i, stat in enumerate(self.spec.statistics):
            part = batch_partial(columns, stat, self.spec.privacy_unit, key, element.num_rows)
            part.seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            if len(part):
                yield i, part


class _MergePartials(beam.CombineFn):
    """Concatenates partials of one statistic, keeping at most k contributions per (unit, partition)."""

    def create_accumulator(self) -> list[DpPartial]:
        return []

    def add_input(self, acc: list[DpPartial], element: DpPartial) -> list[DpPartial]:
        acc.append(element)
        if len(acc) >= 16:
            acc[:] = [self._merge(acc)]
        return acc

    def merge_accumulators(self, accs: Iterable[list[DpPartial]]) -> list[DpPartial]:
        flat = [p for a in accs for p in a]
        return [self._merge(flat)] if flat else []

    def extract_output(self, acc: list[DpPartial]) -> DpPartial | None:
        return self._merge(acc) if acc else None

    @staticmethod
    def _merge(parts: list[DpPartial]) -> DpPartial:
        import time

        t0 = time.perf_counter()
        out = DpPartial.merge(parts)
        out.seconds = float(sum(p.seconds for p in parts)) + time.perf_counter() - t0
        return out


def noisy_record(stat: DpStatistic, combiner: Any, partial: DpPartial | None) -> dict[str, Any]:
    """Cross-partition bounding, then PipelineDP's `compute_metrics` (its noise) per public partition."""
    totals = bounded_totals(partial if partial is not None else DpPartial.empty(stat.max_contributions_per_partition), stat, middle_of(stat))
    rows = [(label, combiner.compute_metrics(acc)) for label, acc in compound_accumulators(stat, totals)]
    bounds = (stat.min_value, stat.max_value) if stat.metric == "mean" and stat.min_value is not None and stat.max_value is not None else None
    return _result_record(rows, stat.name, stat.metric, bounds)


def _as_stats_of(pairs: list[tuple[int, DpPartial]], spec: DpSpec, combiners: list[Any]) -> RunStats:
    import time

    t0 = time.perf_counter()
    got = dict(pairs)
    records = [noisy_record(stat, combiners[i], got.get(i)) for i, stat in enumerate(spec.statistics)]
    stats = _as_stats(records)
    worker = sum(p.seconds for p in got.values())
    stats.add_time("dp_statistics", worker + time.perf_counter() - t0)
    return stats


class ComputeDpStatistics(beam.PTransform):
    """Every declared statistic over the raw records; yields exactly one RunStats.

    Vectorized: each batch is reduced to its bounded contributions (`DpPartial`, numpy over Arrow), partials are
    combined per statistic, and PipelineDP's combiners (built and budgeted as DPEngine builds them) add the noise
    per public partition. Partitions with no contribution are released too, as DPEngine does for public ones."""

    def __init__(self, spec: DpSpec, runtime: RuntimeConfig) -> None:
        super().__init__()
        self.spec = spec
        self.runtime = runtime

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        combiners = [budgeted_combiner(stat) for stat in self.spec.statistics]
        return (
            pcoll
            | "Partials" >> beam.ParDo(_Partials(self.spec, self.runtime))
            | "MergePerStatistic" >> beam.CombinePerKey(_MergePartials())
            | "AllStatistics" >> beam.combiners.ToList()
            | "AsRunStats" >> beam.Map(_as_stats_of, self.spec, combiners)
        )


__all__ = ["ComputeDpStatistics"]
