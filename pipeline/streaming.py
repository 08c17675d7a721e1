"""The streaming graph: watch for new files, protect them per fixed event-time window, commit each window's
Parquet files and a per-window manifest.

    WatchDirectory(patterns)            -> file paths, timestamped with the file's modification time
    ProtectWindowed(run)                -> FixedWindows; a GroupByKey on the path drops duplicate sightings and
                                           data later than the allowed lateness before anything is read; then
                                           the batch steps (ReadRecords' parser, ProtectRecords, optional
                                           streaming k-anonymity, WriteTrainingParquet, which names files
                                           OUT/data/window=<start>-<end>/part-<batch id>.parquet)
                                        -> per window (accumulating panes) one merged RunStats
                                        -> OUT/manifests/window=<start>-<end>.json, rewritten atomically per pane

Files are written under OUT/.cloakbeam-window-staging/ and moved into place by the step that commits their window,
just before it writes the window manifest: the visible tree holds committed windows only (plus, for a moment,
the files of the window being committed), and a crashed run leaves its uncommitted files in the hidden staging
directory, where a restart overwrites them under the same names.

Restarting on the same input produces the same files, not more: a file's event time is its modification time
(so it lands in the same window again), batch ids derive from the file's path and content digest, and every
file and window manifest is written under a deterministic name with an atomic replace. A window is committed
when its manifest exists; readers use the manifests, never a directory listing.

Locally the watch is PeriodicImpulse plus a stateful DoFn remembering the files it has seen (Beam's
`fileio.MatchContinuously` polls once and stops on local runners); on Flink or Dataflow use
`fileio.MatchContinuously`, or Pub/Sub / Kafka through Beam's own IOs (docs/runners.md: documented, not tested).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.transforms import trigger as _trigger
from apache_beam.transforms import userstate
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from cloakbeam.core import fsio
from cloakbeam.core.stats import FileStat, RunStats, is_stats
from cloakbeam.errors import ConfigError
from cloakbeam.transforms.steps import _MergeStats

MANIFESTS_DIR = "manifests"
SEEN_DIR = "_seen"  # the source's ledger of every file it produced
WINDOW_STAGING = ".cloakbeam-window-staging"  # files written but not yet committed by a window manifest


@dataclass(frozen=True)
class StreamOptions:
    """Window size, allowed lateness and the local watch's poll interval / duration (None = forever)."""

    window_seconds: float = 60.0
    allowed_lateness: float = 0.0
    poll_seconds: float = 5.0
    watch_seconds: float | None = None

    def check(self) -> StreamOptions:
        if self.window_seconds <= 0:
            raise ConfigError("--window-seconds must be positive")
        if self.allowed_lateness < 0:
            raise ConfigError("--allowed-lateness must not be negative")
        if self.poll_seconds <= 0:
            raise ConfigError("--poll-seconds must be positive")
        if self.watch_seconds is not None and self.watch_seconds <= 0:
            raise ConfigError("--watch-seconds must be positive (omit it to watch forever)")
        return self


def window_label(start: float, end: float) -> str:
    """The directory/manifest label of a window; identical to transforms.steps' label for IntervalWindow."""
    s = dt.datetime.fromtimestamp(start, dt.timezone.utc)
    e = dt.datetime.fromtimestamp(end, dt.timezone.utc)
    return f"window={s:%Y%m%dT%H%M%S}-{e:%Y%m%dT%H%M%S}"


# ------------------------------------------------------------------------------------------------ source
class _NewFilesFn(beam.DoFn):
    """On every tick, match the patterns and emit files not seen before (state: the set of seen paths).

    Hidden files ('.' or '_' prefix) are skipped: writers must write under a hidden name and rename, so a file
    is never read half-written. A file's event time is its modification time."""

    SEEN = userstate.SetStateSpec("seen", beam.coders.StrUtf8Coder())

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)

    def process(self, element: Any, seen=beam.DoFn.StateParam(SEEN)) -> Iterator[Any]:
        from apache_beam.io.filesystems import FileSystems

        known = set(seen.read())
        for result in FileSystems.match(self.patterns):
            for meta in sorted(result.metadata_list, key=lambda m: m.path):
                name = meta.path.rstrip("/").rsplit("/", 1)[-1]
                if meta.path in known or name.startswith((".", "_")) or meta.path.endswith("/"):
                    continue
                known.add(meta.path)
                seen.add(meta.path)
                mtime = getattr(meta, "last_updated_in_seconds", None) or 0.0
                yield TimestampedValue(meta.path, Timestamp.of(float(mtime)))


class WatchDirectory(beam.PTransform):
    """Unbounded source of new file paths for local runs: PeriodicImpulse + a stateful DoFn (seen files)."""

    def __init__(self, patterns: Sequence[str], poll_seconds: float = 5.0, watch_seconds: float | None = None, start: float | None = None) -> None:
        super().__init__()
        self.patterns = list(patterns)
        self.poll_seconds = poll_seconds
        self.watch_seconds = watch_seconds
        self.start = start

    def expand(self, pbegin):
        from apache_beam.transforms.periodicsequence import PeriodicImpulse
        from apache_beam.utils.timestamp import MAX_TIMESTAMP

        start = Timestamp.of(self.start) if self.start is not None else Timestamp.now()
        stop = start + Duration(seconds=self.watch_seconds) if self.watch_seconds else MAX_TIMESTAMP
        return (
            pbegin
            | "Tick" >> PeriodicImpulse(start_timestamp=start, stop_timestamp=stop, fire_interval=self.poll_seconds)
            | "OneKey" >> beam.Map(lambda ts: ("watch", ts))
            | "NewFiles" >> beam.ParDo(_NewFilesFn(self.patterns))
        )


class MatchContinuouslySource(beam.PTransform):
    """Unbounded source of new file paths for production runners (Flink, Dataflow): Beam's
    fileio.MatchContinuously, with each file's modification time as its event time. Not run here: on local
    runners MatchContinuously polls once and stops (see WatchDirectory)."""

    def __init__(self, patterns: Sequence[str], poll_seconds: float = 30.0) -> None:
        super().__init__()
        self.patterns = list(patterns)
        self.poll_seconds = poll_seconds

    def expand(self, pbegin):
        from apache_beam.io import fileio

        streams = [
            pbegin | f"Match{i}" >> fileio.MatchContinuously(pattern, interval=self.poll_seconds, has_deduplication=True)
            for i, pattern in enumerate(self.patterns)
        ]
        merged = streams[0] if len(streams) == 1 else tuple(streams) | "MergePatterns" >> beam.Flatten()
        return merged | "EventTime" >> beam.Map(lambda m: TimestampedValue(m.path, Timestamp.of(float(m.last_updated_in_seconds or 0.0))))


class _RecordSightingFn(beam.DoFn):
    """Note every file the source produced, before windowing can drop it.

    Beam drops a file whose event time is later than the allowed lateness at the window's GroupByKey, before it
    is read, so no window manifest can count it. This ledger (OUT/manifests/_seen/<path digest>.json, written
    atomically, idempotent on retries) lets the launcher list such files in the run manifest instead of
    losing them silently. It holds paths and event times only."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def process(self, path: str, ts=beam.DoFn.TimestampParam) -> Iterator[str]:
        digest = hashlib.sha256(path.encode()).hexdigest()[:16]
        target = fsio.join(self.out_dir, MANIFESTS_DIR, SEEN_DIR, f"{digest}.json")
        with fsio.atomic_writer(target) as w:
            w.write(json.dumps({"path": path, "event_time": float(ts)}, sort_keys=True).encode())
        yield path  # keeps its timestamp


# ------------------------------------------------------------------------------------------------ windows
def _windowing(opts: StreamOptions, accumulating: bool) -> beam.WindowInto:
    return beam.WindowInto(
        FixedWindows(opts.window_seconds),
        trigger=_trigger.AfterWatermark(late=_trigger.AfterCount(1)),
        accumulation_mode=_trigger.AccumulationMode.ACCUMULATING if accumulating else _trigger.AccumulationMode.DISCARDING,
        allowed_lateness=Duration(seconds=opts.allowed_lateness),
    )


class _WindowManifestFn(beam.DoFn):
    """Write one window's manifest (cumulative over its panes) to OUT/manifests/<label>.json, atomically."""

    def __init__(self, out_dir: str, policy_ref: Any, runtime: Any, runner: str, staging: str | None = None) -> None:
        self.out_dir = out_dir
        self.policy_ref = policy_ref
        self.runtime = runtime
        self.runner = runner
        self.staging = staging  # where the window's files were written (local outputs); None = in place

    def _commit_files(self, stats: RunStats) -> None:
        """Move this window's staged files into place (os.replace, atomic per file); files an earlier pane
        committed are already there. Runs before the window manifest is written, so the manifest only ever
        names files that are in place."""
        if self.staging is None:
            return
        for f in stats.files:
            src, dst = os.path.join(self.staging, f.path), os.path.join(self.out_dir, f.path)
            if os.path.exists(src):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            elif not os.path.exists(dst):
                from cloakbeam.errors import IntegrityError

                raise IntegrityError(f"window file {f.path} is neither staged nor committed; rerun the window")

    def setup(self) -> None:
        from cloakbeam.keys.service import open_key_service

        self.policy = self.policy_ref.compile()
        self.keys = open_key_service(self.runtime.keys)

    def teardown(self) -> None:
        self.keys.close()

    def _sign(self, path: str) -> None:
        """Sign the window manifest (`<manifest>.sig`) when the key layer offers it; local outputs only."""
        try:
            from cloakbeam.keys.signing import sign_manifest
        except ImportError:
            return
        if fsio.is_local(path):
            sign_manifest(path, self.keys)

    def process(self, stats: RunStats, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam) -> Iterator[str]:
        from cloakbeam.pipeline.manifest import build_manifest

        start, end = float(window.start), float(window.end)
        label = window_label(start, end)
        manifest = build_manifest(
            run_id=self.runtime.run_id,
            started=dt.datetime.fromtimestamp(start, dt.timezone.utc),
            finished=dt.datetime.fromtimestamp(end, dt.timezone.utc),
            runner=self.runner,
            policy=self.policy,
            stats=stats,
            key_ref=self.runtime.keys.describe(),
            streaming=True,
        )
        manifest["window"] = {
            "label": label,
            "start": manifest.pop("started_at"),
            "end": manifest.pop("finished_at"),
            "pane_index": int(getattr(pane, "index", 0)),
            "timing": {0: "EARLY", 1: "ON_TIME", 2: "LATE"}.get(getattr(pane, "timing", 3), "UNKNOWN"),
        }
        manifest.pop("seconds", None)
        self._commit_files(stats)
        path = fsio.join(self.out_dir, MANIFESTS_DIR, f"{label}.json")
        with fsio.atomic_writer(path) as w:
            w.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        self._sign(path)
        yield path


class _WindowBatchIdFn(beam.DoFn):
    """Name batches by window + pane + position after a step that regroups a window's records (k-anonymity
    merges a pane into one table, losing the source batch ids), and cut them back to `batch_size` rows.

    The name must not depend on content: encrypted cells differ on every run, so a content hash would give
    a restart new file names, i.e. duplicates. Position counts per (window, pane) within the bundle: the
    regrouping step emits a pane's batches from one call, in order."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = max(1, int(batch_size))

    def start_bundle(self) -> None:
        self.counters: dict[tuple[str, int], int] = {}

    def process(self, element: Any, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam) -> Iterator[Any]:
        from cloakbeam.transforms.write import BATCH_ID_KEY

        if is_stats(element):
            yield element
            return
        label = window_label(float(window.start), float(window.end)).split("=", 1)[1]
        index = int(getattr(pane, "index", 0))
        key = (label, index)
        for start in range(0, element.num_rows, self.batch_size):
            n = self.counters.get(key, 0)
            self.counters[key] = n + 1
            part = element.slice(start, self.batch_size)
            meta = dict(part.schema.metadata or {})
            meta[BATCH_ID_KEY] = f"w{label}-p{index:03d}-{n:06d}".encode()
            yield part.replace_schema_metadata(meta)


class _MergeWindowStats(_MergeStats):
    """_MergeStats for accumulating panes: each pane's output is a copy, with files deduplicated by path."""

    def extract_output(self, acc: RunStats) -> RunStats:
        out = RunStats.merged([acc])  # a copy: accumulating panes keep adding to `acc`
        out.files = sorted({f.path: f for f in out.files}.values(), key=lambda f: f.path)
        return out


class ProtectWindowed(beam.PTransform):
    """File paths (timestamped) in, committed window manifests' paths out; see the module docstring."""

    def __init__(self, run: Any, opts: StreamOptions) -> None:
        super().__init__()
        self.run = run
        self.opts = opts.check()

    def expand(self, paths):
        from apache_beam.io import fileio

        from cloakbeam.transforms.steps import PolicyRef, ProtectRecords, WriteTrainingParquet, _ReadFileFn

        run, s = self.run, self.run.settings
        schema = run.policy.schema
        # Local outputs: every file goes to the hidden staging directory; the window commit moves it into place.
        staging = fsio.join(run.out_dir, WINDOW_STAGING) if fsio.is_local(run.out_dir) else None
        out = staging or run.out_dir
        records = (
            paths
            | "Window" >> _windowing(self.opts, accumulating=False)
            | "KeyByPath" >> beam.Map(lambda p: (p, p))
            | "OncePerWindow" >> beam.GroupByKey()
            | "Path" >> beam.Map(lambda kv: kv[0])
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(_ReadFileFn(schema.avro, schema.source, s.input_format, s.batch_size, out, run.runtime, run.policy.sections.get("limits")))
        )
        protected = records | "ProtectRecords" >> ProtectRecords(run.policy, run.runtime, out)
        kanon = run.policy.sections.get("k_anonymity")
        if kanon is not None:
            protected = (
                protected
                | "EnforceKAnonymity" >> kanon.streaming_transform(run.runtime)
                | "WindowBatchIds" >> beam.ParDo(_WindowBatchIdFn(s.batch_size))
            )
        written = protected | "WriteTrainingParquet" >> WriteTrainingParquet(out, run.runtime, run.policy)
        return (
            written
            | "WindowStats" >> _windowing(self.opts, accumulating=True)
            | "MergeWindowStats" >> beam.CombineGlobally(_MergeWindowStats()).without_defaults()
            | "CommitWindow" >> beam.ParDo(_WindowManifestFn(run.out_dir, PolicyRef.of(run.policy), run.runtime, s.runner, staging))
        )


def stream_options_for(policy: Any, runner_options: dict[str, Any]) -> StreamOptions:
    """StreamOptions from CLI options, reconciled with the policy's k-anonymity window (which must match)."""
    kanon = policy.sections.get("k_anonymity")
    spec = getattr(kanon, "spec", None)
    window = runner_options.get("window_seconds")
    lateness = runner_options.get("allowed_lateness")
    if spec is not None:
        if window is not None and float(window) != float(spec.window_seconds):
            raise ConfigError(
                f"--window-seconds {window} differs from the policy's k_anonymity window ({spec.window_seconds} s); "
                "drop the option or change k_anonymity.streaming.window_seconds so both agree"
            )
        window = spec.window_seconds
        if lateness is not None and float(lateness) != float(spec.allowed_lateness_seconds):
            raise ConfigError("--allowed-lateness differs from the policy's k_anonymity.streaming.allowed_lateness_seconds; make them agree")
        lateness = spec.allowed_lateness_seconds
    return StreamOptions(
        window_seconds=float(window if window is not None else 60.0),
        allowed_lateness=float(lateness if lateness is not None else 0.0),
        poll_seconds=float(runner_options.get("poll_seconds") or 5.0),
        watch_seconds=float(runner_options["watch_seconds"]) if runner_options.get("watch_seconds") else None,
    ).check()


def build_streaming_graph(p: Any, run: Any, opts: StreamOptions, source: Any = None) -> Any:
    """Attach the streaming graph to `p`; `source` (a PTransform over PBegin yielding timestamped paths)
    defaults to watching the run's input patterns."""
    if source is not None:
        src = source
    elif run.settings.runner in ("flink", "dataflow"):
        src = MatchContinuouslySource(run.settings.inputs, opts.poll_seconds)
    else:
        src = WatchDirectory(run.settings.inputs, opts.poll_seconds, opts.watch_seconds)
    return p | "Source" >> src | "RecordSightings" >> beam.ParDo(_RecordSightingFn(run.out_dir)) | "ProtectWindowed" >> ProtectWindowed(run, opts)


# ------------------------------------------------------------------------------------------------ launcher
def read_window_manifests(out_dir: str) -> list[dict[str, Any]]:
    """Every committed window manifest under OUT/manifests/, sorted by window label (local outputs)."""
    d = os.path.join(out_dir, MANIFESTS_DIR)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.startswith("window=") and name.endswith(".json"):  # not the .json.sig signatures
            with open(os.path.join(d, name), encoding="utf-8") as fh:
                out.append(json.load(fh))
    return out


def unread_late_files(out_dir: str, manifests: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Files the source saw that no committed window read: later than the allowed lateness (local outputs)."""
    d = os.path.join(out_dir, MANIFESTS_DIR, SEEN_DIR)
    if not os.path.isdir(d):
        return []
    manifests = read_window_manifests(out_dir) if manifests is None else manifests
    read = {i["path"] for m in manifests for i in m.get("inputs", [])}
    seen = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            with open(os.path.join(d, name), encoding="utf-8") as fh:
                seen.append(json.load(fh))
    return sorted((s for s in seen if s["path"] not in read), key=lambda s: s["path"])


def stats_from_window_manifests(manifests: Iterable[dict[str, Any]]) -> RunStats:
    """Rebuild the merged RunStats of a streaming run from its committed window manifests."""
    total = RunStats()
    for m in manifests:
        s = RunStats()
        s.counts.update(m["counts"])
        s.fields.update(m.get("field_stats", {}))
        s.reasons.update(m.get("quarantine_reasons", {}))
        for kind, key in (("data", "outputs"), ("quarantine", "quarantine")):
            for f in m.get(key, []):
                s.files.append(FileStat(path=f["path"], rows=f["rows"], bytes=f["bytes"], sha256=f["sha256"], kind=kind, window=f.get("window"), split=f.get("split")))
        for i in m.get("inputs", []):
            i = dict(i)
            s.inputs[i.pop("path")] = i
        s.extra.update(m.get("extra", {}))
        total.merge(s)
    total.files.sort(key=lambda f: f.path)
    return total


def run_streaming(settings: Any) -> dict[str, Any]:
    """Run the streaming graph on a streaming-capable runner until the watch ends (local runs: --watch-seconds),
    then write OUT/manifest.json summarizing every committed window. On production runners the job does not
    end; the per-window manifests are the record."""
    from cloakbeam.pipeline import publish as _publish
    from cloakbeam.pipeline.graph import _attach_key_records, _nullcontext, _sign, note_unreadable, prepare
    from cloakbeam.pipeline.manifest import build_manifest, check_reconciled, write_manifest
    from cloakbeam.runners import make_runner

    opts_in = dict(settings.runner_options or {})
    opts_in["streaming"] = True
    settings.runner_options = opts_in
    run = prepare(settings)
    opts = stream_options_for(run.policy, opts_in)
    started = dt.datetime.now(dt.timezone.utc)
    runner, options = make_runner(settings.runner, settings.beam_args, opts_in)
    try:
        with runner.session() if hasattr(runner, "session") else _nullcontext():
            p = beam.Pipeline(runner=runner.beam_runner, options=options)
            build_streaming_graph(p, run, opts)
            p.run().wait_until_finish()
    except BaseException as exc:
        # Committed windows stay (each is complete); uncommitted files stay hidden in the staging directory.
        if run.plan is not None:
            _publish.fail(run.plan, exc)
        raise
    finished = dt.datetime.now(dt.timezone.utc)
    windows = read_window_manifests(run.out_dir)
    stats = stats_from_window_manifests(windows)
    manifest = build_manifest(
        run_id=run.runtime.run_id, started=started, finished=finished, runner=settings.runner, policy=run.policy,
        stats=stats, key_ref=run.runtime.keys.describe(), streaming=True,
    )
    manifest["windows"] = [
        {"label": w["window"]["label"], "manifest": f"{MANIFESTS_DIR}/{w['window']['label']}.json", "counts": w["counts"], "reconciled": w["reconciled"], "pane_index": w["window"]["pane_index"]}
        for w in windows
    ]
    late = unread_late_files(run.out_dir, windows)
    if late:
        # Not silent: listed in the manifest and on stderr. Their records were never read, so they are outside
        # the counts; rerun them as a batch job or raise --allowed-lateness.
        manifest["unread_late_files"] = late
        print(f"cloakbeam: {len(late)} file(s) arrived later than the allowed lateness and were not read; see 'unread_late_files' in the manifest", file=sys.stderr)
    _attach_key_records(manifest, run)
    path = write_manifest(run.out_dir, manifest)
    _sign(path, run)
    from cloakbeam.pipeline.report import write_report

    write_report(run.out_dir, manifest)
    check_reconciled(manifest)
    if fsio.is_local(run.out_dir):
        import shutil

        shutil.rmtree(os.path.join(run.out_dir, WINDOW_STAGING), ignore_errors=True)  # only uncommitted leftovers
        stale = os.path.join(run.out_dir, _publish.FAILURE_NAME)
        if os.path.exists(stale):
            os.unlink(stale)  # this run completed: an earlier failure record no longer describes the output
    note_unreadable(manifest)
    return manifest
