"""Beam adapters for k-anonymity: thin DoFns around the plain functions of `cloakbeam.transforms.kanon`.

Elements are `pa.RecordBatch` (already protected; QIs arrive as full-detail canonical strings) or `RunStats`
(passed through untouched). Everything runs as one linear chain with side inputs — no tagged outputs, no extra
leaves, nothing emitted from `finish_bundle` — so it works on the DaskRunner as well.

Batch:  pcoll ─ CountClasses (per batch group_by) ─ CombineGlobally(merge) ─ SearchLattice ─┐ (AsSingleton)
        pcoll ──────────────────────────────────────────────── Generalize+Suppress ◄───────┘ ─ Flatten ─ out
                                                                      SearchLattice ─ ReportStats ─┘
With a spill directory (local outputs, `run_pipeline`'s default) the protected batches do not wait in the runner:
        pcoll ─ Spill (encrypted file, emits SpillRef) ─ Generalize+Suppress (reads it back) ◄ plan
so only references cross the stage boundary and memory does not grow with the input (`transforms/spill.py`).

Uniqueness scan (quasi-identifier discovery), after enforcement, before the write:
        pcoll ─ SketchBatches ─ CombineGlobally(merge sketches) ─ Evaluate ─┐
        pcoll ─────────────────────────────────────────────────────────────┴─ Flatten ─ out
The sketches are bounded bottom-k sketches with counts (`cloakbeam.transforms.uniqueness`); the report travels
as one RunStats element and the launcher fails the run (and removes the written files) when it failed.

Streaming: FixedWindows(window_seconds) with allowed lateness; per window a single-key GroupByKey is the
delay-bounded buffer (records wait at most until the watermark passes the window's end); each pane runs its own
search and suppresses the records whose class cannot reach k (or l) by that deadline.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms import trigger as _trigger
from apache_beam.transforms import window as _window
from apache_beam.utils.timestamp import Duration

from cloakbeam.core.stats import RunStats
from cloakbeam.errors import IntegrityError
from cloakbeam.transforms.kanon import (
    AnonymityTargetError,
    KAnonSpec,
    Plan,
    enforce_table,
    frequency_set,
    make_plan,
    merge_frequency_sets,
)
from cloakbeam.transforms.spill import read_spill, write_spill
from cloakbeam.transforms.uniqueness import ScanSketch, ScanSpec, evaluate, merge_sketches, sketch_batch

_COMPACT_ROWS = 200_000  # compact a combiner accumulator once its pending tables exceed this many rows


def _columns(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    from cloakbeam.transforms.protect import flatten_columns

    return flatten_columns(batch)


class _CountClasses(beam.DoFn):
    """Per batch: the frequency set of full-detail QI combinations (counts only). RunStats are not counted."""

    def __init__(self, spec: KAnonSpec) -> None:
        self.spec = spec

    def process(self, element: Any) -> Iterator[pa.Table]:
        if isinstance(element, RunStats) or element.num_rows == 0:
            return
        yield frequency_set(_columns(element), self.spec)


class _MergeFrequencies(beam.CombineFn):
    """Sum frequency sets; the accumulator is a list of tables compacted with a group_by when it grows."""

    def create_accumulator(self) -> list[pa.Table]:
        return []

    def _compact(self, acc: list[pa.Table]) -> list[pa.Table]:
        # acc[0] is the merged part, the rest are pending. Merge once the pending rows outgrow both the
        # threshold and the merged part, so the total merge work stays O(n log n) over a bundle.
        if len(acc) < 2:
            return acc
        pending = sum(t.num_rows for t in acc[1:])
        if pending > max(_COMPACT_ROWS, acc[0].num_rows):
            merged = merge_frequency_sets(acc)
            return [merged] if merged is not None else []
        return acc

    def add_input(self, acc: list[pa.Table], table: pa.Table) -> list[pa.Table]:
        acc.append(table)
        return self._compact(acc)

    def merge_accumulators(self, accs: Iterable[list[pa.Table]]) -> list[pa.Table]:
        out: list[pa.Table] = []
        for a in accs:
            out.extend(a)
        out.sort(key=lambda t: -t.num_rows)  # largest first: it becomes the merged part
        return self._compact(out)

    def extract_output(self, acc: list[pa.Table]) -> pa.Table | None:
        return merge_frequency_sets(acc)


class _ApplyPlan(beam.DoFn):
    """Generalize QIs to the chosen levels and remove the records of classes below k (or l); count them."""

    def __init__(self, spec: KAnonSpec) -> None:
        self.spec = spec

    def process(self, element: Any, plan: Plan) -> Iterator[Any]:
        if isinstance(element, RunStats):
            yield element
            return
        t0 = time.perf_counter()
        out, suppressed = enforce_table(element, self.spec, plan)
        stats = RunStats(counts=Counter({"suppressed": suppressed}) if suppressed else Counter())
        stats.add_time("k_anonymity.apply", time.perf_counter() - t0)
        if out.num_rows:
            yield out
        yield stats


def _plan(freq: pa.Table | None, spec: KAnonSpec) -> Plan:
    t0 = time.perf_counter()
    plan = make_plan(freq, spec)
    plan.search_seconds = time.perf_counter() - t0
    return plan


def _report_stats(plan: Plan) -> RunStats:
    stats = RunStats(extra={"k_anonymity": plan.report})
    stats.add_time("k_anonymity.search", plan.search_seconds)
    return stats


@dataclass(frozen=True)
class SpillRef:
    """A protected batch waiting on disk for the plan (`cloakbeam.transforms.spill`): its file name and rows."""

    name: str
    rows: int


def _spill_key(ctx: Any) -> bytes:
    # Derived by every worker from the keyring it already holds; bound to the run, never written anywhere.
    return bytes(ctx.keys.prf_key(f"kanon-spill/{ctx.run_id}"))


class _SpillBatch(beam.DoFn):
    """Write each protected batch to an encrypted spill file and pass on only its reference (RunStats pass)."""

    def __init__(self, spill_dir: str, runtime: Any) -> None:
        self.spill_dir = spill_dir
        self.runtime = runtime

    def setup(self) -> None:
        from cloakbeam.transforms.registry import ActionContext

        self.ctx = ActionContext(self.runtime)
        self.key = _spill_key(self.ctx)
        os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any) -> Iterator[Any]:
        if isinstance(element, RunStats):
            yield element
            return
        if element.num_rows == 0:
            return
        t0 = time.perf_counter()
        name = f"{uuid.uuid4().hex}.spill"
        write_spill(element, os.path.join(self.spill_dir, name), self.key, f"{self.ctx.run_id}/{name}")
        stats = RunStats()
        stats.add_time("k_anonymity.spill", time.perf_counter() - t0)
        yield SpillRef(name, element.num_rows)
        yield stats


class _ApplyPlanFromSpill(_ApplyPlan):
    """`_ApplyPlan` over spill references: read one batch back, generalize, suppress, delete nothing (the run's
    private directory goes as a whole, so a retried bundle can read its files again)."""

    def __init__(self, spec: KAnonSpec, spill_dir: str, runtime: Any) -> None:
        super().__init__(spec)
        self.spill_dir = spill_dir
        self.runtime = runtime

    def setup(self) -> None:
        from cloakbeam.transforms.registry import ActionContext

        self.ctx = ActionContext(self.runtime)
        self.key = _spill_key(self.ctx)

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any, plan: Plan) -> Iterator[Any]:
        if isinstance(element, SpillRef):
            t0 = time.perf_counter()
            batch = read_spill(os.path.join(self.spill_dir, element.name), self.key, f"{self.ctx.run_id}/{element.name}")
            if batch.num_rows != element.rows:
                raise IntegrityError(f"k-anonymity spill file {element.name} holds {batch.num_rows} rows, not {element.rows}")
            stats = RunStats()
            stats.add_time("k_anonymity.spill", time.perf_counter() - t0)
            yield stats
            element = batch
        yield from super().process(element, plan)


class EnforceKAnonymity(beam.PTransform):
    """Batch k-anonymity (and l-diversity) over the whole PCollection; fails the run when the target is unreachable.

    With `spill_dir` (a local directory private to the run) the protected batches wait for the plan in encrypted
    spill files and only their references pass between stages, so memory does not grow with the input; without
    it (remote outputs) the runner holds them until the plan is ready."""

    def __init__(self, spec: KAnonSpec, spill_dir: str | None = None, runtime: Any = None) -> None:
        super().__init__()
        if spill_dir is not None and runtime is None:
            raise ValueError("EnforceKAnonymity: spilling needs the runtime (its keyring derives the spill key)")
        self.spec = spec
        self.spill_dir = spill_dir
        self.runtime = runtime

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        spec = self.spec
        plan = (
            pcoll
            | "CountClasses" >> beam.ParDo(_CountClasses(spec))
            | "MergeCounts" >> beam.CombineGlobally(_MergeFrequencies())
            | "SearchLattice" >> beam.Map(_plan, spec)
        )
        if self.spill_dir is None:
            released = pcoll | "GeneralizeSuppress" >> beam.ParDo(_ApplyPlan(spec), plan=beam.pvalue.AsSingleton(plan))
        else:
            refs = pcoll | "Spill" >> beam.ParDo(_SpillBatch(self.spill_dir, self.runtime))
            released = refs | "GeneralizeSuppress" >> beam.ParDo(
                _ApplyPlanFromSpill(spec, self.spill_dir, self.runtime), plan=beam.pvalue.AsSingleton(plan)
            )
        report = plan | "ReportStats" >> beam.Map(_report_stats)
        return (released, report) | "JoinReport" >> beam.Flatten()


# ---------------------------------------------------------------------------------------------------------
# Uniqueness scan
# ---------------------------------------------------------------------------------------------------------
class _SketchBatch(beam.DoFn):
    """Per released batch: the bottom-k sketches of every measured combination (hashes and counts only)."""

    def __init__(self, spec: ScanSpec) -> None:
        self.spec = spec

    def process(self, element: Any) -> Iterator[ScanSketch]:
        if isinstance(element, RunStats) or element.num_rows == 0:
            return
        t0 = time.perf_counter()
        sketch = sketch_batch(_columns(element), self.spec)
        sketch.seconds += time.perf_counter() - t0
        yield sketch


class _MergeSketches(beam.CombineFn):
    """Union of bottom-k sketches: memory bounded by combinations x sketch size, whatever the data size."""

    def __init__(self, spec: ScanSpec) -> None:
        self.spec = spec

    def create_accumulator(self) -> ScanSketch:
        return ScanSketch()

    def add_input(self, acc: ScanSketch, sketch: ScanSketch) -> ScanSketch:
        return acc.merge(sketch, self.spec.sketch_size)

    def merge_accumulators(self, accs: Iterable[ScanSketch]) -> ScanSketch:
        return merge_sketches(list(accs), self.spec)

    def extract_output(self, acc: ScanSketch) -> ScanSketch:
        return acc


def _scan_report(sketch: ScanSketch, spec: ScanSpec) -> RunStats:
    t0 = time.perf_counter()
    stats = RunStats(extra={"uniqueness": evaluate(sketch, spec)})
    stats.add_time("uniqueness", sketch.seconds + time.perf_counter() - t0)
    return stats


class ScanUniqueness(beam.PTransform):
    """Measure how many released records each column and combination singles out; pass every element through
    and add one RunStats with the report. The verdict is the launcher's (`UniquenessSection.check`)."""

    def __init__(self, spec: ScanSpec) -> None:
        super().__init__()
        self.spec = spec

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        report = (
            pcoll
            | "SketchBatches" >> beam.ParDo(_SketchBatch(self.spec))
            | "MergeSketches" >> beam.CombineGlobally(_MergeSketches(self.spec))
            | "Evaluate" >> beam.Map(_scan_report, self.spec)
        )
        return (pcoll, report) | "JoinScan" >> beam.Flatten()


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------
class _StampForWindow(beam.DoFn):
    """Key every element to its window's single buffer and remember its event time (seconds)."""

    def process(self, element: Any, ts: Any = beam.DoFn.TimestampParam) -> Iterator[tuple[str, tuple[float, Any]]]:
        yield "w", (float(ts), element)


def _iso(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(float(seconds), _dt.timezone.utc).isoformat().replace("+00:00", "Z")


class _EnforceWindow(beam.DoFn):
    """One pane of one window: search on the pane's records, release classes >= k (and l), suppress the rest."""

    def __init__(self, spec: KAnonSpec) -> None:
        self.spec = spec

    def process(self, keyed: tuple[str, Iterable[tuple[float, Any]]], win: Any = beam.DoFn.WindowParam,
                pane: Any = beam.DoFn.PaneInfoParam) -> Iterator[Any]:
        _, items = keyed
        batches: list[pa.RecordBatch] = []
        stamps: list[float] = []
        for ts, element in items:
            if isinstance(element, RunStats):
                yield element
                continue
            if element.num_rows:
                batches.append(element)
                stamps.append(ts)
        timing = {0: "EARLY", 1: "ON_TIME", 2: "LATE"}.get(getattr(pane, "timing", 3), "UNKNOWN")
        start, end = float(win.start), float(win.end)
        n_in = sum(b.num_rows for b in batches)
        record: dict[str, Any] = {
            "window_start": _iso(start),
            "window_end": _iso(end),
            "pane_index": int(getattr(pane, "index", 0)),
            "timing": timing,
            "records_in": n_in,
            "k_target": self.spec.k,
            "l_target": self.spec.l,
            "suppression_limit": self.spec.suppression_limit,
            "delay_bound_seconds": self.spec.window_seconds,
            # The buffer releases a window's on-time records when the watermark passes its end: no record waits
            # (in event time) longer than end - its timestamp <= window_seconds.
            "max_event_delay_seconds": round(end - min(stamps), 6) if stamps and timing == "ON_TIME" else None,
        }
        if not batches:
            record.update(records_released=0, records_suppressed=0, k_achieved=None, l_achieved=None,
                          target_met=True, levels=None)
            yield RunStats(extra={"k_anonymity_windows": [record]})
            return
        table = pa.Table.from_batches(batches).combine_chunks()
        from cloakbeam.transforms.protect import flatten_columns

        columns = flatten_columns(table)
        freq = frequency_set(columns, self.spec)
        try:
            plan = make_plan(freq, self.spec)
            target_met = True
        except AnonymityTargetError:
            # Too few records (or sensitive values) in this pane to reach the target by its deadline:
            # suppress them all and say so; a stream cannot be failed half-way.
            plan = None
            target_met = False
        if plan is None:
            suppressed = n_in
            record.update(records_released=0, records_suppressed=suppressed, k_achieved=None, l_achieved=None,
                          target_met=False, levels=None)
        else:
            out, suppressed = enforce_table(table, self.spec, plan)
            for b in out.to_batches() if isinstance(out, pa.Table) else [out]:
                if b.num_rows:
                    yield b
            rep = plan.report
            record.update(records_released=rep["records_released"], records_suppressed=suppressed,
                          k_achieved=rep["k_achieved"], l_achieved=rep["l_achieved"], target_met=target_met,
                          levels={p: v["name"] for p, v in rep["levels"].items()},
                          prosecutor_risk=rep["prosecutor_risk"], information_loss=rep["information_loss"])
        counts = Counter({"suppressed": suppressed} if suppressed else {})
        yield RunStats(counts=counts, extra={"k_anonymity_windows": [record]})


class EnforceKAnonymityStreaming(beam.PTransform):
    """Per-window k-anonymity with a bounded delay (window_seconds), late panes within allowed lateness."""

    def __init__(self, spec: KAnonSpec) -> None:
        super().__init__()
        self.spec = spec

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        spec = self.spec
        return (
            pcoll
            | "KAnonWindows" >> beam.WindowInto(
                _window.FixedWindows(spec.window_seconds),
                trigger=_trigger.AfterWatermark(late=_trigger.AfterCount(1)),
                accumulation_mode=_trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(seconds=spec.allowed_lateness_seconds),
            )
            | "KeyToWindowBuffer" >> beam.ParDo(_StampForWindow())
            | "WindowBuffer" >> beam.GroupByKey()
            | "EnforcePerWindow" >> beam.ParDo(_EnforceWindow(spec))
        )
