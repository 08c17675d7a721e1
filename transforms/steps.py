"""The Beam steps: thin DoFns and composable PTransforms around cloakbeam's plain functions.

    ReadRecords(patterns, schema)      -> pa.RecordBatch | RunStats   (ingest + quarantine)
    ProtectRecords(policy, out_dir)    -> pa.RecordBatch | RunStats   (classification checks + actions)
    WriteTrainingParquet(out_dir)      -> RunStats                    (one committed Parquet file per batch)
    CollectRunStats(path)              -> one RunStats saved for the launcher's manifest

Every DoFn passes RunStats elements through untouched and creates keys and connections in `setup()` from
picklable references (RuntimeConfig, PolicyRef): a pickled DoFn holds no key material. The graph is one
linear chain with one end, so it is correct on runners that drop tagged outputs, extra leaves or outputs of
`finish_bundle` (the DaskRunner).
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio

from cloakbeam.core import fsio
from cloakbeam.core.config import RuntimeConfig
from cloakbeam.core.stats import RunStats, is_stats
from cloakbeam.schemas.avro import InputSchema, schema_from_dict
from cloakbeam.transforms.ingest import Rejected, detect_format, read_source
from cloakbeam.transforms.quarantine import damage_report, quarantine_entry, write_quarantine
from cloakbeam.transforms.write import BATCH_ID_KEY, batch_id, write_training_files


@dataclass(frozen=True)
class PolicyRef:
    """What a worker needs to recompile the policy in `setup()`: the schema and policy documents."""

    schema_avro: dict
    policy_raw: dict
    schema_source: str
    policy_source: str
    policy_text: str | None = None
    attachments: dict | None = None  # files the policy names (hierarchy tables), as the launcher read them

    @classmethod
    def of(cls, policy: Any) -> PolicyRef:
        # The text the launcher read and hashed: never re-read the file, which may have changed since.
        return cls(policy.schema.avro, policy.raw, policy.schema.source, policy.source, getattr(policy, "text", None),
                   dict(getattr(policy, "attachments", {}) or {}))

    def compile(self) -> Any:
        from cloakbeam.transforms.policy import compile_policy

        return compile_policy(self.policy_raw, schema_from_dict(self.schema_avro, self.schema_source), self.policy_source, self.policy_text,
                              attachments=self.attachments)


class ArrowBatchCoder(beam.coders.Coder):
    """Arrow IPC stream encoding for RecordBatch elements crossing a fusion break (schema metadata kept)."""

    def encode(self, batch: pa.RecordBatch) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        return sink.getvalue().to_pybytes()

    def decode(self, data: bytes) -> pa.RecordBatch:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()

    def is_deterministic(self) -> bool:
        return True


beam.coders.registry.register_coder(pa.RecordBatch, ArrowBatchCoder)


def _runtime_context(runtime: RuntimeConfig):
    from cloakbeam.transforms.registry import ActionContext

    return ActionContext(runtime)


# ------------------------------------------------------------------------------------------------ read
class _ReadFileFn(beam.DoFn):
    def __init__(
        self, schema_avro: dict, schema_source: str, fmt: str | None, batch_size: int, out_dir: str, runtime: RuntimeConfig, limits: Any = None,
    ) -> None:
        from cloakbeam.core.limits import IngestLimits

        self.schema_avro = schema_avro
        self.schema_source = schema_source
        self.fmt = fmt
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.runtime = runtime
        self.limits = limits or IngestLimits()

    def setup(self) -> None:
        self.schema: InputSchema = schema_from_dict(self.schema_avro, self.schema_source)
        self.ctx = _runtime_context(self.runtime)
        from cloakbeam.core.progress import ProgressReporter

        self.progress = ProgressReporter(getattr(self.runtime, "progress_addr", None))

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        fmt = detect_format(path, self.fmt)
        size, digest = fsio.sha256_of(path)
        source_id = hashlib.sha256(f"{path}\0{digest}".encode()).hexdigest()[:16]
        stats = RunStats()
        entries: list[dict[str, Any]] = []
        damaged: list[dict[str, Any]] = []
        records = 0
        index = 0
        # Stage timer "read": time inside this step only, not while a yielded batch runs through the fused steps
        # downstream (Protect and Write run inside `yield` on the local runners).
        seconds = 0.0
        t0 = time.perf_counter()
        with readable.open(compression_type=beam.io.filesystem.CompressionTypes.AUTO) as fh:
            # read_source turns every parser failure into a rejection (never raises on bad input); what does raise
            # here is a key or storage failure while sealing, which must fail the run rather than lose records.
            for item in read_source(fh, path, fmt, self.schema, self.batch_size, self.limits):
                if isinstance(item, Rejected):
                    entries.append(quarantine_entry(item, self.ctx.keys, self.runtime.dataset_id, self.limits.quarantine_record_bytes))
                    stats.reasons[item.reason] += item.records
                    stats.counts["quarantined"] += item.records
                    records += item.records
                    report = damage_report(item)
                    if report is not None:
                        damaged.append(report)
                    continue
                records += item.num_rows
                meta = dict(item.schema.metadata or {})
                meta[BATCH_ID_KEY] = f"{source_id}-{index:06d}".encode()
                index += 1
                self.progress.send("read", item.num_rows)
                item = item.replace_schema_metadata(meta)
                seconds += time.perf_counter() - t0
                yield item
                t0 = time.perf_counter()
        if entries:
            stats.files.append(write_quarantine(self.out_dir, path, entries))
        stats.add_time("read", seconds + time.perf_counter() - t0)
        stats.counts["input"] += records
        stats.inputs[path] = {"bytes": size, "sha256": digest, "records": records, "format": fmt}
        if damaged:
            stats.inputs[path]["damaged"] = damaged
        yield stats


class ReadRecords(beam.PTransform):
    """Match file patterns (local or Beam FileSystems), parse and validate them into RecordBatches; records
    that fail go to OUT/quarantine/ and are counted in RunStats elements."""

    def __init__(
        self, patterns: Sequence[str], schema: InputSchema, out_dir: str, runtime: RuntimeConfig, batch_size: int = 65_536, fmt: str | None = None,
        limits: Any = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.patterns = list(patterns)
        self.schema = schema
        self.out_dir = out_dir
        self.runtime = runtime
        self.batch_size = batch_size
        self.fmt = fmt
        self.limits = limits  # cloakbeam.core.limits.IngestLimits (the policy's `limits` section); None = defaults

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
            | "Spread" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(_ReadFileFn(self.schema.avro, self.schema.source, self.fmt, self.batch_size, self.out_dir, self.runtime, self.limits))
        )


# ------------------------------------------------------------------------------------------------ protect
class _ProtectFn(beam.DoFn):
    def __init__(self, policy_ref: PolicyRef, runtime: RuntimeConfig, out_dir: str | None = None) -> None:
        self.policy_ref = policy_ref
        self.runtime = runtime
        self.out_dir = out_dir

    def setup(self) -> None:
        from cloakbeam.transforms.protect import protect_batch_with_rejects

        self.policy = self.policy_ref.compile()
        self.output_schema = self.policy.output_schema(_field_classes(self.policy))
        self.ctx = _runtime_context(self.runtime)
        self._protect = protect_batch_with_rejects
        self._sent_keys: set[str] = set()
        self.split = self.policy.sections.get("split")

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any, window=beam.DoFn.WindowParam) -> Iterator[Any]:
        if is_stats(element):
            yield element
            return
        t0 = time.perf_counter()
        meta = element.schema.metadata or {}
        out, rejected = self._protect(element, self.policy, self.ctx, self.output_schema)
        if self.split is not None:
            out = _with_split(out, element, rejected, self.split, self.ctx)
        if BATCH_ID_KEY in meta:
            out = out.replace_schema_metadata({**(out.schema.metadata or {}), BATCH_ID_KEY: meta[BATCH_ID_KEY]})
        quarantined = None
        if rejected:
            quarantined = self._quarantine(element, rejected, meta.get(BATCH_ID_KEY, b"").decode() or batch_id(element), _window_label(window))
        # Wrapped data keys made since the last batch travel to the manifest (extra.wrapped_keys), so
        # outputs stay decryptable even when protect and write run in different worker processes.
        keys = self.ctx._keys
        fresh = [r for r in keys.wrapped_keys_used() if r["key_id"] not in self._sent_keys] if keys is not None else []
        self._sent_keys |= {r["key_id"] for r in fresh}
        # Stage timers: the whole step ("protect") and each action family within it ("protect.<action>"),
        # measured before anything is yielded (downstream steps run inside `yield` when fused).
        stats = RunStats(fields=self.ctx.stats.copy(), extra={"wrapped_keys": fresh} if fresh else {})
        for name, seconds in self.ctx.timers.items():
            stats.add_time(f"protect.{name}", seconds)
        stats.add_time("protect", time.perf_counter() - t0)
        self.ctx.timers.clear()
        self.ctx.stats.clear()
        if quarantined is not None:
            yield quarantined
        yield out
        yield stats


    def _quarantine(self, batch: pa.RecordBatch, rejected: list[tuple[int, str, str]], bid: str, window: str | None) -> RunStats:
        """Rows an action could not protect: sealed into OUT/quarantine/ like ingest rejections, and counted."""
        if self.out_dir is None:
            from cloakbeam.errors import CloakbeamError

            row, reason, field = rejected[0]
            raise CloakbeamError(f"field '{field}': {len(rejected)} row(s) could not be protected ({reason}, first at row {row}) and ProtectRecords has no quarantine directory")
        import json

        rows = batch.take(pa.array([r for r, _, _ in rejected])).to_pylist()
        source = f"batch {bid}"
        limits = self.policy.sections.get("limits")
        cap = getattr(limits, "quarantine_record_bytes", None)
        entries = [
            quarantine_entry(Rejected(source, f"row {row}", reason, field, json.dumps(raw, default=str, sort_keys=True).encode()), self.ctx.keys, self.runtime.dataset_id, cap)
            for (row, reason, field), raw in zip(rejected, rows)
        ]
        stats = RunStats()
        stats.files.append(write_quarantine(self.out_dir, source, entries, window=window))
        stats.counts["quarantined"] += len(rejected)
        for _, reason, _ in rejected:
            stats.reasons[reason] += 1
        return stats


def _with_split(protected: pa.RecordBatch, raw: pa.RecordBatch, rejected: list[tuple[int, str, str]], section: Any, ctx: Any) -> pa.RecordBatch:
    """Label each protected row with its split, computed from the raw subject (rows the protect step rejected are
    not in `protected`, so their labels are left out the same way)."""
    import numpy as np

    from cloakbeam.transforms.protect import flatten_columns
    from cloakbeam.transforms.split import attach

    labels = section.labels(flatten_columns(raw), ctx)
    if rejected:
        keep = np.ones(raw.num_rows, dtype=bool)
        keep[[r for r, _, _ in rejected]] = False
        labels = labels.filter(pa.array(keep))
    return attach(protected, labels)


def _field_classes(policy: Any) -> dict[str, str]:
    section = policy.sections.get("classification")
    if section is not None and hasattr(section, "field_classes"):
        return dict(section.field_classes())
    return {}


class ProtectRecords(beam.PTransform):
    """Apply a compiled policy to every RecordBatch (the plain function `protect_batch`). Rows an action
    rejects are quarantined under `out_dir`; without `out_dir` such a row fails the run (fail closed)."""

    def __init__(self, policy: Any, runtime: RuntimeConfig, out_dir: str | None = None) -> None:
        super().__init__()
        self.policy_ref = PolicyRef.of(policy)
        self.runtime = runtime
        self.out_dir = out_dir

    def expand(self, pcoll):
        return pcoll | "Protect" >> beam.ParDo(_ProtectFn(self.policy_ref, self.runtime, self.out_dir))


# ------------------------------------------------------------------------------------------------ write
class _WriteFn(beam.DoFn):
    def __init__(self, out_dir: str, policy_ref: PolicyRef | None, runtime: RuntimeConfig) -> None:
        self.out_dir = out_dir
        self.policy_ref = policy_ref
        self.runtime = runtime

    def setup(self) -> None:
        self.ctx = _runtime_context(self.runtime)
        self.section = None
        if self.policy_ref is not None:
            self.section = self.policy_ref.compile().sections.get("parquet_encryption")
        from cloakbeam.core.progress import ProgressReporter

        self.progress = ProgressReporter(getattr(self.runtime, "progress_addr", None))

    def teardown(self) -> None:
        self.ctx.close()

    def process(self, element: Any, window=beam.DoFn.WindowParam) -> Iterator[RunStats]:
        if is_stats(element):
            yield element
            return
        if element.num_rows == 0:
            return
        t0 = time.perf_counter()
        kwargs = self.section.writer_kwargs(self.ctx) if self.section is not None else {}
        win = _window_label(window)
        stats = write_training_files(element, self.out_dir, kwargs, _key_metadata(self.ctx), window=win)
        self.progress.send("written", element.num_rows)
        out = RunStats()
        out.add_time("write", time.perf_counter() - t0)
        out.files.extend(stats)
        out.counts["written"] += sum(f.rows for f in stats)
        yield out


def _window_label(window: Any) -> str | None:
    from apache_beam.transforms.window import GlobalWindow, IntervalWindow

    if window is None or isinstance(window, GlobalWindow):
        return None
    if isinstance(window, IntervalWindow):
        s, e = window.start.to_utc_datetime(), window.end.to_utc_datetime()
        return f"window={s:%Y%m%dT%H%M%S}-{e:%Y%m%dT%H%M%S}"
    return None


def _key_metadata(ctx: Any) -> dict[bytes, bytes]:
    """Wrapped data keys used so far by this worker, for the file's key-value metadata (if keys were used)."""
    keys = ctx._keys
    used = getattr(keys, "wrapped_keys_used", None) if keys is not None else None
    if used is None:
        # The DEK cache is per process: records made by the protect DoFn are visible without opening keys.
        from cloakbeam.keys.service import process_wrapped_keys

        ref = getattr(getattr(ctx, "runtime", None), "keys", None)
        used = (lambda: process_wrapped_keys(ref)) if ref is not None else (lambda: [])
    import json

    records: list[dict] = used()
    return {b"cloakbeam.wrapped_keys": json.dumps(records, sort_keys=True).encode()} if records else {}


class WriteTrainingParquet(beam.PTransform):
    """Write each RecordBatch as a committed Parquet file under OUT/data/; emit RunStats with file stats."""

    def __init__(self, out_dir: str, runtime: RuntimeConfig, policy: Any = None) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.runtime = runtime
        self.policy_ref = PolicyRef.of(policy) if policy is not None else None

    def expand(self, pcoll):
        return pcoll | "WriteParquet" >> beam.ParDo(_WriteFn(self.out_dir, self.policy_ref, self.runtime))


# ------------------------------------------------------------------------------------------------ collect
class _MergeStats(beam.CombineFn):
    def create_accumulator(self) -> RunStats:
        return RunStats()

    def add_input(self, acc: RunStats, element: Any) -> RunStats:
        if is_stats(element):
            acc.merge(element)
        return acc

    def merge_accumulators(self, accs: Iterable[RunStats]) -> RunStats:
        return RunStats.merged(accs)

    def extract_output(self, acc: RunStats) -> RunStats:
        acc.files.sort(key=lambda f: f.path)
        return acc


class _SaveStats(beam.DoFn):
    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, stats: RunStats) -> Iterator[int]:
        with fsio.atomic_writer(self.path) as w:
            w.write(pickle.dumps(stats))
        yield 1


class CollectRunStats(beam.PTransform):
    """Merge every RunStats element into one and save it where the launcher builds the manifest from it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        return pcoll | "Merge" >> beam.CombineGlobally(_MergeStats()).without_defaults() | "Save" >> beam.ParDo(_SaveStats(self.path))
