"""Build and run the cloakbeam pipeline: Read -> Protect -> [k-anonymity] -> Write -> CollectRunStats.

`run_pipeline(settings)` is what `cloakbeam run` and `cloakbeam demo` call: it validates everything at
construction (schema, policy, options, keys), runs the graph on the chosen runner, then assembles, checks and
signs the manifest from the RunStats the workers emitted. It fails loudly when the counts do not reconcile.

Local outputs are crash-consistent (pipeline/publish.py): the graph writes into a staging directory
(`PreparedRun.out_dir`) that is published as `PreparedRun.final_dir` in one step after the manifest is signed;
a failed run leaves the previous output untouched plus `OUT/.cloakbeam-failure.json`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloakbeam.core import fsio
from cloakbeam.core.config import (
    RuntimeConfig,
    key_ref_from,
    load_config_file,
    new_run_id,
    resolve_state_dir,
    vault_ref_from,
)
from cloakbeam.errors import CloakbeamError, ConfigError, KeyAccessError
from cloakbeam.pipeline import publish as _publish
from cloakbeam.pipeline.manifest import build_manifest, check_reconciled, write_manifest
from cloakbeam.pipeline.report import write_report
from cloakbeam.schemas.avro import load_schema
from cloakbeam.transforms.policy import CompiledPolicy, load_policy

log = logging.getLogger(__name__)
STATS_DIR = ".cloakbeam-run"


@dataclass
class RunSettings:
    """Everything one run needs; validated by `prepare()` before any data moves."""

    inputs: Sequence[str]
    schema: str
    policy: str
    output: str
    runner: str = "direct"
    batch_size: int = 65_536
    input_format: str | None = None
    beam_args: Sequence[str] = field(default_factory=list)
    state_dir: str | None = None
    config: str | None = None
    overwrite: bool = False
    progress: bool | str = True
    runner_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"dask_address": ..., "workers": 2}
    dev: bool = False  # create an unprotected development keyring pair when none is configured (demo, --dev)
    #: Release evidence after the run (pipeline/evaluate.py): measured risk and ML utility on a bounded sample.
    evaluate: bool = False
    evaluate_label: str | None = None
    evaluate_sample: int = 20_000
    holdout: Sequence[str] = field(default_factory=list)


@dataclass
class PreparedRun:
    settings: RunSettings
    policy: CompiledPolicy
    runtime: RuntimeConfig
    out_dir: str  # where the graph writes: the staging directory for local batch outputs
    stats_path: str
    final_dir: str = ""  # where the output is published (the user's --output)
    plan: _publish.OutputPlan | None = None
    prepare_seconds: float = 0.0  # launcher start-up (stage timer "prepare"): schema, policy compile, keyring open, checks


def prepare(settings: RunSettings) -> PreparedRun:
    """Validate schema, policy, options and keys; raise ConfigError with a sentence saying what to fix."""
    if not settings.inputs:
        raise ConfigError("no input given; pass --input GLOB")
    if settings.batch_size < 1:
        raise ConfigError("--batch-size must be a positive number of rows")
    schema = load_schema(settings.schema)
    policy = load_policy(settings.policy, schema)
    if not settings.runner_options.get("streaming"):  # a streaming watch may start before its first file
        _check_inputs(settings.inputs)
    if settings.evaluate:
        _check_evaluation(settings, policy)
    policy = _resolve_sampled(policy, settings)
    config = load_config_file(settings.config)
    state = resolve_state_dir(settings.state_dir, config)
    keys = key_ref_from(config, state)
    vault = vault_ref_from(config, state)
    out_dir = settings.output if not fsio.is_local(settings.output) else os.path.abspath(settings.output)
    streaming = bool(settings.runner_options.get("streaming"))
    _check_output(out_dir, settings.inputs, settings.overwrite, streaming)
    _ensure_keys(keys, settings.dev)
    runtime = RuntimeConfig(run_id=new_run_id(), dataset_id=policy.dataset, state_dir=str(state), keys=keys, vault=vault)
    # Fail at construction, not mid-run, when keys cannot be opened.
    from cloakbeam.keys.service import open_key_service

    try:
        ks = open_key_service(keys)
        try:  # every reveal key the policy seals to must be in the keyring (keys/sealing.py)
            ks.require_reveal_keys(policy.sealing_keys())
        finally:
            ks.close()
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None
    if "vault" in policy.requires():  # token vault reachable before any data moves (vault issue)
        from cloakbeam.vault import check_vault_ref

        check_vault_ref(vault, keys)
    from cloakbeam.runners import check_runner_compatibility

    check_runner_compatibility(settings.runner, runtime, settings.runner_options, output=out_dir)
    # Last, once nothing else can refuse the run: clean up after killed runs and create the staging directory.
    # A streaming run resumes into its output: file and window-manifest names are deterministic, so a restart
    # rewrites the same files instead of adding duplicates (pipeline/streaming.py stages per window).
    plan = _publish.plan_output(out_dir, runtime.run_id, settings.overwrite, in_place=streaming)
    stats_path = fsio.join(plan.staging, STATS_DIR, f"{runtime.run_id}.stats")
    return PreparedRun(settings, policy, runtime, plan.staging, stats_path, final_dir=plan.final, plan=plan)


def _ensure_keys(keys: Any, dev: bool) -> None:
    """No silent dev keyring: a missing local keyring is created only for `--dev` runs and the demo."""
    if keys.provider != "local" or not keys.path or os.path.exists(keys.path):
        return
    if not dev:
        raise ConfigError(
            f"no keyring at {keys.path}: create one with 'cloakbeam keys init --reveal-key ...' (or configure a KMS in --config), "
            "or pass --dev for an UNPROTECTED development keyring"
        )
    from cloakbeam.keys.service import ensure_local_keyring

    if ensure_local_keyring(keys.path):
        print(f"cloakbeam: created an UNPROTECTED development keyring pair at {keys.path} (--dev; never for real data)", file=__import__("sys").stderr)


QUANTILE_SAMPLE_ROWS = 10_000


def _resolve_sampled(policy: CompiledPolicy, settings: RunSettings) -> CompiledPolicy:
    """Quantile bands are computed on a sample of the input before any data moves: the first
    QUANTILE_SAMPLE_ROWS valid records of the input files in name order, so the same input gives the same
    edges on every runner. The edges are written into the policy document the workers compile (and so into
    the manifest's field report); the sample itself is never stored."""
    from cloakbeam.transforms.generalize import needs_sample, resolve_quantiles
    from cloakbeam.transforms.policy import compile_policy

    fields = needs_sample(policy.raw)
    if not fields:
        return policy
    sample, rows = _sample_inputs(settings, policy, fields, QUANTILE_SAMPLE_ROWS)
    if rows == 0 and settings.runner_options.get("streaming"):
        # A stream's bands come from the files present when it starts and hold for the whole stream.
        raise ConfigError(f"field '{fields[0]}' uses quantile bands, which are computed on a sample of the input when the run "
                          "starts, and the stream has no readable record yet: start it with some input, or give the bands as "
                          "edges (method: band, edges: [...]) instead")
    if rows == 0:  # nothing valid to release: any edges do, and the manifest records that they came from no records
        import pyarrow as pa

        sample = {f: pa.array([], pa.float64()) for f in fields}
    raw = resolve_quantiles(policy.raw, sample, rows)
    return compile_policy(raw, policy.schema, source=policy.source, attachments=policy.attachments,
                          text=_policy_text(policy.source))


def _policy_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def _sample_inputs(settings: RunSettings, policy: CompiledPolicy, fields: Sequence[str], n: int) -> tuple[dict[str, Any], int]:
    import pyarrow as pa
    from apache_beam.io.filesystems import FileSystems

    from cloakbeam.transforms.ingest import Rejected, detect_format, read_source
    from cloakbeam.transforms.protect import flatten_columns

    paths = sorted({m.path for pattern in settings.inputs for m in FileSystems.match([pattern])[0].metadata_list})
    batches, rows = [], 0
    for path in paths:
        with fsio.open_read(path) as fh:
            for item in read_source(fh, path, detect_format(path, settings.input_format), policy.schema, min(n, 4096)):
                if isinstance(item, Rejected):
                    continue
                cols = flatten_columns(item)
                batches.append({f: cols[f] for f in fields})
                rows += item.num_rows
                if rows >= n:
                    break
        if rows >= n:
            break
    sample = {f: pa.concat_arrays([b[f] for b in batches]).slice(0, n) for f in fields} if batches else {}
    return sample, min(rows, n)


def _check_inputs(patterns: Sequence[str]) -> None:
    """Every input pattern must match at least one file now (streaming watches use their own check)."""
    from apache_beam.io.filesystems import FileSystems

    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:  # unknown scheme or missing filesystem extras
            raise ConfigError(f"cannot list input {pattern}: {type(exc).__name__}; check the path and that Beam's filesystem extras are installed") from None
        if not matched:
            raise ConfigError(f"input pattern {pattern} matches no file")


def _check_evaluation(settings: RunSettings, policy: CompiledPolicy) -> None:
    """`--evaluate` options are checked before any data moves."""
    if settings.runner_options.get("streaming"):
        raise ConfigError("--evaluate applies to batch runs; evaluate a streaming output's windows with `cloakbeam evaluate`")
    if "parquet_encryption" in policy.sections:
        raise ConfigError("--evaluate reads the released files, which Parquet modular encryption (the policy's parquet_encryption "
                          "section) makes unreadable without the reader's keys; evaluate a release made without it")
    if settings.evaluate_sample < 100:
        raise ConfigError("--evaluate-sample must be at least 100 rows")
    from cloakbeam.pipeline.evaluate import check_label

    check_label(policy, settings.evaluate_label)
    if settings.holdout:
        _check_inputs(settings.holdout)


def _check_output(out_dir: str, inputs: Sequence[str], overwrite: bool, streaming: bool) -> None:
    """Refuse an output that would swallow an input: publishing replaces the output directory as a whole."""
    if not fsio.is_local(out_dir):
        return
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output {out_dir} exists and is not a directory")
    root = os.path.realpath(out_dir) + os.sep
    for pattern in inputs:
        if fsio.is_local(pattern) and os.path.realpath(pattern.split("*", 1)[0] or ".").startswith(root) and not streaming:
            raise ConfigError(f"input {pattern} lies inside the output directory {out_dir}; a run replaces its output directory, so keep inputs elsewhere")


def build_graph(p: Any, run: PreparedRun) -> None:
    """Attach the cloakbeam graph to pipeline `p`: one linear chain with a single end (evidence branches over the
    raw records, such as DP statistics, rejoin it in one Flatten before the final combine)."""
    import apache_beam as beam

    from cloakbeam.transforms.steps import CollectRunStats, ProtectRecords, ReadRecords, WriteTrainingParquet

    s = run.settings
    records = p | "ReadRecords" >> ReadRecords(s.inputs, run.policy.schema, run.out_dir, run.runtime, s.batch_size, s.input_format, run.policy.sections.get("limits"))
    protected = records | "ProtectRecords" >> ProtectRecords(run.policy, run.runtime, run.out_dir)
    kanon = run.policy.sections.get("k_anonymity")
    if kanon is not None:
        protected = protected | "EnforceKAnonymity" >> kanon.batch_transform(run.runtime, spill_dir=_spill_dir(run))
    written = protected | "WriteTrainingParquet" >> WriteTrainingParquet(run.out_dir, run.runtime, run.policy)
    ends = [written] + _scan_branch(protected, run) + _evidence_branches(records, run)
    if len(ends) > 1:  # one final Flatten joins every end: the DaskRunner computes a single leaf (BEAM-NOTES)
        written = tuple(ends) | "JoinEvidence" >> beam.Flatten()
    _ = written | "CollectRunStats" >> CollectRunStats(run.stats_path)


def _spill_dir(run: PreparedRun) -> str | None:
    """Where batch k-anonymity spills protected batches while its plan is searched: the run's private directory
    beside the stats file (removed with it when the run ends; with the staging directory when it fails). Remote
    outputs (gs://, s3://) keep the in-memory path: a spill must be readable by every worker."""
    if not fsio.is_local(run.stats_path):
        return None
    return os.path.join(os.path.dirname(run.stats_path), "kanon-spill")


def _scan_branch(released: Any, run: PreparedRun) -> list[Any]:
    """The uniqueness scan of the released records (quasi-identifier discovery; fails the run after, never silently)
    as a side branch ending in its one report RunStats, joined with the other ends in the final Flatten.

    Not `section.batch_transform` (ScanUniqueness), which flattens its report back into the record stream: a
    Flatten whose inputs come from different stages cannot be fused, so every released batch was buffered by the
    runner between Protect and Write (the whole release in memory). Here Write stays fused with Protect."""
    scan = run.policy.sections.get("uniqueness")
    if scan is None:
        return []
    import apache_beam as beam

    from cloakbeam.transforms.kanon_beam import _MergeSketches, _scan_report, _SketchBatch

    spec = scan.spec
    return [
        released
        | "ScanUniqueness/SketchBatches" >> beam.ParDo(_SketchBatch(spec))
        | "ScanUniqueness/MergeSketches" >> beam.CombineGlobally(_MergeSketches(spec))
        | "ScanUniqueness/Evaluate" >> beam.Map(_scan_report, spec)
    ]


def _evidence_branches(records: Any, run: PreparedRun) -> list[Any]:
    """Branches over the raw records that end in RunStats elements (differential-privacy statistics)."""
    dp = run.policy.sections.get("dp_statistics")
    if dp is None:
        return []
    return [records | "DpStatistics" >> dp.beam_transform(run.runtime)]


def run_pipeline(settings: RunSettings) -> dict[str, Any]:
    """Run one batch job end to end, publish its output and return the written manifest (as a dict)."""
    if settings.runner_options.get("streaming"):
        from cloakbeam.pipeline.streaming import run_streaming

        return run_streaming(settings)
    t0 = time.perf_counter()
    run = prepare(settings)
    run.prepare_seconds = time.perf_counter() - t0
    try:
        manifest = _execute(run, settings)
    except BaseException as exc:
        if run.plan is not None:
            _publish.fail(run.plan, exc)
        raise
    if run.plan is not None:
        _publish.publish(run.plan)
    note_unreadable(manifest)
    return manifest


def runner_failure(runner: str, output: str, exc: BaseException) -> CloakbeamError:
    """One sentence for a run that failed inside the runner with a foreign exception (a worker process killed,
    a database or network error in a step). Only the class is named: a foreign message may quote data."""
    reason = _system_reason(exc)
    what = f"{type(exc).__name__}: {reason}" if reason else f"{type(exc).__name__}: a worker process died or a step raised"
    return CloakbeamError(
        f"the {runner} runner failed ({what}); nothing was published to {output}, "
        "which keeps its previous content; rerun the same command to replace it (details with --verbose)"
    )


def _system_reason(exc: BaseException) -> str | None:
    """The operating system's reason (e.g. 'No space left on device') behind a runner failure, if there is one.

    Beam re-raises a step's OSError as a RuntimeError carrying the original text; the errno is taken from the
    exception chain or from that text and turned back into the system's own wording, so nothing else is quoted."""
    import re

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"\[Errno (\d+)\]", str(exc))
    return os.strerror(int(match.group(1))) if match else None


def note_unreadable(manifest: dict[str, Any]) -> None:
    """One stderr line when damaged inputs hid their record count (listed under 'unreadable'): never silent."""
    if manifest.get("unreadable"):
        import sys

        print(f"cloakbeam: {len(manifest['unreadable'])} damaged input region(s) could not be counted; see 'unreadable' in the manifest", file=sys.stderr)


def _execute(run: PreparedRun, settings: RunSettings) -> dict[str, Any]:
    """Run the graph into `run.out_dir` and write, sign and check the manifest there (not yet published)."""
    import dataclasses

    import apache_beam as beam

    from cloakbeam.core.progress import ProgressListener
    from cloakbeam.runners import make_runner

    started = dt.datetime.now(dt.timezone.utc)
    with ProgressListener(enabled=settings.progress) as progress:
        if fsio.is_local(run.out_dir) and settings.runner in ("direct", "dask"):
            run.runtime = dataclasses.replace(run.runtime, progress_addr=progress.addr)
        runner, options = make_runner(settings.runner, settings.beam_args, settings.runner_options)
        with runner.session() if hasattr(runner, "session") else _nullcontext():
            p = beam.Pipeline(runner=runner.beam_runner if hasattr(runner, "beam_runner") else runner, options=options)
            build_graph(p, run)
            t0 = time.perf_counter()
            try:
                result = p.run()
                result.wait_until_finish()
            except (CloakbeamError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise runner_failure(settings.runner, run.final_dir or run.out_dir, exc) from exc
            graph_seconds = time.perf_counter() - t0
    finished = dt.datetime.now(dt.timezone.utc)
    stats = _load_stats(run.stats_path)
    # Launcher-side stage timers: start-up before the graph, and the graph's whole run (wall clock, once).
    stats.add_time("prepare", run.prepare_seconds)
    stats.add_time("graph", graph_seconds)
    _check_release(run, stats)
    manifest = build_manifest(
        run_id=run.runtime.run_id,
        started=started,
        finished=finished,
        runner=settings.runner,
        policy=run.policy,
        stats=stats,
        key_ref=run.runtime.keys.describe(),
    )
    _attach_key_records(manifest, run)
    if settings.evaluate:
        _attach_evaluation(manifest, run)
    path = write_manifest(run.out_dir, manifest)
    _sign(path, run)
    write_report(run.out_dir, manifest)
    check_reconciled(manifest)
    return manifest


def _attach_evaluation(manifest: dict[str, Any], run: PreparedRun) -> None:
    """Measured risk and utility (`sections.risk`, `sections.utility`) over the committed release."""
    from cloakbeam.keys.service import open_key_service
    from cloakbeam.pipeline.evaluate import EvaluationSettings, evaluate_release

    s = run.settings
    ks = open_key_service(run.runtime.keys)
    try:
        found = evaluate_release(run.policy, manifest, run.out_dir, EvaluationSettings(
            inputs=list(s.inputs), label=s.evaluate_label, holdout=list(s.holdout), input_format=s.input_format,
            sample=s.evaluate_sample, keys=ks, batch_size=s.batch_size))
    finally:
        ks.close()
    manifest.setdefault("sections", {}).update(found)


def _check_release(run: PreparedRun, stats: Any) -> None:
    """Checks on the whole release that only the end of the run can make (the uniqueness scan). A failed check
    withholds the release and fails the run: a staged output is never published (the previous complete output,
    if any, stays); an output written in place (object stores) has its data files removed and gets no manifest."""
    from cloakbeam.transforms.uniqueness import UniquenessRiskError

    scan = run.policy.sections.get("uniqueness")
    if scan is None:
        return
    try:
        scan.check(stats)
    except UniquenessRiskError as exc:
        if run.plan is not None and run.plan.staged:
            raise UniquenessRiskError(f"{exc}. The release was withheld: nothing was published, no manifest written") from None
        removed = _withdraw(run.out_dir, [f.path for f in stats.files if f.kind == "data"])
        raise UniquenessRiskError(f"{exc}. The release was withdrawn: {removed} data file(s) removed, no manifest written") from None


def _withdraw(out_dir: str, paths: Sequence[str]) -> int:
    removed = 0
    for rel in paths:
        path = fsio.join(out_dir, rel)
        try:
            if fsio.is_local(path):
                os.unlink(path)
            else:
                from apache_beam.io.filesystems import FileSystems

                FileSystems.delete([path])
            removed += 1
        except (OSError, Exception):  # noqa: B014 - best effort; the run fails either way
            log.warning("could not remove a data file of a withdrawn release")
    return removed


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _load_stats(path: str):
    from cloakbeam.core.stats import RunStats
    from cloakbeam.errors import CloakbeamError

    try:
        if fsio.is_local(path):
            with open(path, "rb") as fh:
                stats = pickle.load(fh)
        else:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path) as fh:
                stats = pickle.loads(fh.read())
    except FileNotFoundError:
        raise CloakbeamError("the pipeline finished without reporting its counts; the runner may have dropped the final step") from None
    if not isinstance(stats, RunStats):
        raise CloakbeamError(f"run statistics at {path} are not readable")
    if fsio.is_local(path):
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return stats


def _attach_key_records(manifest: dict[str, Any], run: PreparedRun) -> None:
    """Wrapped data keys recorded in the output files' metadata, gathered for the manifest (key layer)."""
    try:
        from cloakbeam.keys.service import collect_wrapped_keys
    except ImportError:
        return
    records = collect_wrapped_keys(run.out_dir, manifest)
    if records:
        manifest["wrapped_keys"] = records


def _sign(path: str, run: PreparedRun) -> None:
    try:
        from cloakbeam.keys.signing import sign_manifest
    except ImportError:
        return
    from cloakbeam.keys.service import open_key_service

    ks = open_key_service(run.runtime.keys)
    try:
        sign_manifest(path, ks)
    finally:
        ks.close()
