"""The vectorized dp_statistics aggregation equals PipelineDP's own per-record aggregation before noise.

The old path is PipelineDP itself: `contributions` (per record) through `DPEngine.aggregate` on its LocalBackend,
with two things swapped for the test only: its random choice of kept contributions (`sample_fixed_per_key`) picks
the same ones the vectorized path keeps (smallest priority), and `compute_metrics` returns the accumulator instead
of adding noise. Random inputs exercise every bound: several rows per unit and partition (per-partition bounding),
units in several partitions (cross-partition bounding), values outside [min, max] (clamping), rows without a unit,
a partition or a value, and batching (partials merged across batches equal one batch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cloakbeam.transforms.dp import (
    DpPartial,
    DpStatistic,
    GroupBy,
    batch_partial,
    bounded_totals,
    contributions,
    partition_priorities,
    row_priorities,
)
from cloakbeam.transforms.dp_beam import _params, budgeted_combiner, compound_accumulators, middle_of

PARTS = ("a", "b", "c", "d")
KEY = bytes(range(32))


def _columns(rng: np.random.Generator, n: int) -> dict[str, pa.Array]:
    units = [f"u{int(i)}" for i in rng.integers(0, max(2, n // 6), n)]
    unit_mask = rng.random(n) < 0.05
    groups = rng.choice(list(PARTS) + ["zz"], n).tolist()
    group_mask = rng.random(n) < 0.05
    values = np.round(rng.uniform(-40.0, 140.0, n), 3)
    value_mask = rng.random(n) < 0.05
    return {
        "id": pa.array(units, mask=unit_mask),
        "g": pa.array(groups, mask=group_mask),
        "v": pa.array(values, mask=value_mask),
    }


def _stat(metric: str, k: int, m: int) -> DpStatistic:
    value, lo, hi = (None, None, None) if metric == "count" else ("v", 0.0, 100.0)
    return DpStatistic(f"s_{metric}", metric, value, GroupBy("g", partitions=PARTS), 1.0, 0.0, "laplace", m, k, lo, hi)


def _old_accumulators(monkeypatch, columns, stat, n):
    """PipelineDP's aggregation of the per-record contributions, before noise, with the same kept contributions."""
    import pipeline_dp
    from pipeline_dp import combiners, pipeline_backend

    code = {p: i for i, p in enumerate(PARTS)}

    def sample(self, col, size, stage_name=None):
        out = []
        for key, values in self.group_by_key(col):
            values = list(values)
            if isinstance(key, tuple):  # ((unit, partition), [value]): per-partition bounding
                pid, pk = key
                prio = row_priorities(stat, np.full(len(values), pid, np.uint64), np.full(len(values), code[pk], np.int64),
                                      np.asarray(values, np.float64))
            else:  # (unit, [(partition, accumulator)]): cross-partition bounding
                prio = partition_priorities(stat, np.full(len(values), key, np.uint64), np.array([code[pk] for pk, _ in values], np.int64))
            out.append((key, [values[i] for i in np.argsort(prio, kind="stable")[:size]]))
        return out

    monkeypatch.setattr(pipeline_backend.LocalBackend, "sample_fixed_per_key", sample)
    monkeypatch.setattr(combiners.CompoundCombiner, "compute_metrics", lambda self, acc: acc)
    pids, keys, vals = contributions(columns, stat, "id", KEY, n)
    rows = list(zip(pids, keys, vals))
    accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=stat.epsilon, total_delta=stat.delta)
    engine = pipeline_dp.DPEngine(accountant, pipeline_backend.LocalBackend())
    extractors = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r[0], partition_extractor=lambda r: r[1], value_extractor=lambda r: r[2])
    result = engine.aggregate(rows, _params(stat), extractors, public_partitions=list(PARTS))
    accountant.compute_budgets()
    merged = {}
    for pk, acc in result:
        merged[pk] = acc
    return merged


def _assert_same(old: dict, new: list, metric: str) -> None:
    assert sorted(old) == sorted(label for label, _ in new)
    for label, (rows, (acc,)) in new:
        old_rows, (old_acc,) = old[label]
        assert rows == old_rows, label
        if metric == "count":
            assert acc == old_acc, label
        elif metric == "sum":
            assert acc == pytest.approx(float(old_acc), rel=1e-9, abs=1e-6), label
        else:
            assert acc[0] == old_acc[0], label
            assert acc[1] == pytest.approx(float(old_acc[1]), rel=1e-9, abs=1e-6), label


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["count", "sum", "mean"])
def test_vectorized_aggregation_equals_pipeline_dp_before_noise(monkeypatch, seed, metric):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    columns = _columns(rng, n)
    stat = _stat(metric, k=int(rng.integers(1, 4)), m=int(rng.integers(1, 4)))
    # Batches of random sizes, merged as the CombineFn merges them.
    cuts = sorted(rng.choice(np.arange(1, n), 3, replace=False).tolist())
    partials = [batch_partial({c: a.slice(lo, hi - lo) for c, a in columns.items()}, stat, "id", KEY, hi - lo)
                for lo, hi in zip([0, *cuts], [*cuts, n])]
    merged = DpPartial.merge(partials)
    new = compound_accumulators(stat, bounded_totals(merged, stat, middle_of(stat)))
    old = _old_accumulators(monkeypatch, columns, stat, n)
    _assert_same(old, new, metric)
    # Bounding bit in these inputs (otherwise the test proves little).
    whole = batch_partial(columns, stat, "id", KEY, n)
    assert len(whole) < len(contributions(columns, stat, "id", KEY, n)[0]) or stat.max_contributions_per_partition > 1
    assert np.array_equal(whole.pid, merged.pid) and np.array_equal(whole.value, merged.value)  # batching does not matter


def test_bounding_bites_on_heavy_units(monkeypatch):
    """One unit with many rows in every partition counts at most m partitions x k rows, values clamped."""
    n = 200
    columns = {"id": pa.array(["heavy"] * n), "g": pa.array([PARTS[i % 4] for i in range(n)]), "v": pa.array([1000.0] * n)}
    stat = _stat("sum", k=2, m=3)
    totals = bounded_totals(batch_partial(columns, stat, "id", KEY, n), stat)
    assert int(totals.count.sum()) == 6 and int((totals.count > 0).sum()) == 3
    assert float(totals.total.sum()) == pytest.approx(600.0)  # 6 contributions clamped to max_value 100
    _assert_same(_old_accumulators(monkeypatch, columns, stat, n), compound_accumulators(stat, totals), "sum")


@pytest.mark.parametrize("metric, noise, delta", [("count", "laplace", 0.0), ("mean", "gaussian", 1e-6), ("sum", "laplace", 0.0)])
def test_noise_budget_is_the_one_dpengine_requests(metric, noise, delta):
    """Same mechanisms, same (epsilon, delta) split as DPEngine.aggregate with its own accountant."""
    import pipeline_dp

    base = _stat(metric, 1, 1)
    stat = DpStatistic(base.name, metric, base.value, base.group_by, 0.7, delta, noise, 2, 1, base.min_value, base.max_value)
    combiner = budgeted_combiner(stat)
    ours = [(s.mechanism_type, s.eps, s.delta) for c in combiner._combiners
            for s in (c.mechanism_spec() if isinstance(c.mechanism_spec(), tuple) else (c.mechanism_spec(),))]
    accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=stat.epsilon, total_delta=stat.delta)
    engine = pipeline_dp.DPEngine(accountant, pipeline_dp.LocalBackend())
    extractors = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r[0], partition_extractor=lambda r: r[1], value_extractor=lambda r: r[2])
    engine.aggregate([(1, "a", 1.0)], _params(stat), extractors, public_partitions=list(PARTS))
    accountant.compute_budgets()
    theirs = [(m.mechanism_spec.mechanism_type, m.mechanism_spec.eps, m.mechanism_spec.delta) for m in accountant._mechanisms]
    assert ours == theirs and ours
    out = combiner.compute_metrics((1, ((3, 0.0),) if metric == "mean" else (3,)))
    assert hasattr(out, metric)
