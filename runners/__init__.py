"""Runner profiles (direct, dask, flink, dataflow) and their launchers.

`make_runner(name, beam_args, runner_options)` returns (handle, PipelineOptions); the handle carries the Beam
runner as `.beam_runner` and a `.session()` context manager for what lives around one run (a local Dask cluster,
the client to close). One module per profile: runners/direct.py, dask.py, flink.py, dataflow.py.

`check_runner_compatibility` refuses, at construction, combinations a runner would get wrong: an unknown runner,
options that do not apply to it, streaming on the DaskRunner, and remote runners (flink, dataflow) with a local
SQLite vault or a local keyring, which their workers cannot reach. No profile ever falls back to another runner.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from cloakbeam.errors import ConfigError
from cloakbeam.runners.base import LOCAL_RUNNERS, REMOTE_RUNNERS, RunnerHandle, check_remote_state, reject_unknown

RUNNERS = ("direct", "dask", "flink", "dataflow")
STREAMING_RUNNERS = ("direct", "flink", "dataflow")

__all__ = ["LOCAL_RUNNERS", "REMOTE_RUNNERS", "RUNNERS", "STREAMING_RUNNERS", "RunnerHandle", "make_runner", "check_runner_compatibility", "profile"]


def profile(name: str) -> Any:
    """The profile module for runner `name` (has `make(beam_args, runner_options)` and `OPTIONS`)."""
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner '{name}'; available runners: {', '.join(RUNNERS)}")
    return importlib.import_module(f"cloakbeam.runners.{name}")


def make_runner(name: str, beam_args: Sequence[str], runner_options: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Build the runner handle and PipelineOptions for profile `name`; raises ConfigError, never falls back."""
    return profile(name).make(list(beam_args or []), dict(runner_options or {}))


def check_runner_compatibility(name: str, runtime: Any, runner_options: Mapping[str, Any] | None = None, output: str | None = None) -> None:
    """Refuse at construction what runner `name` cannot do correctly with this runtime configuration
    (and, when given, this output location)."""
    mod = profile(name)
    opts = dict(runner_options or {})
    streaming = bool(opts.get("streaming"))
    if streaming and name not in STREAMING_RUNNERS:
        raise ConfigError(f"--runner {name} cannot run the streaming pipeline (it ignores windowing); use one of {', '.join(STREAMING_RUNNERS)}")
    reject_unknown(name, opts, tuple(getattr(mod, "OPTIONS", ())))
    if name in REMOTE_RUNNERS:
        check_remote_state(name, runtime)
        if output is not None:
            from cloakbeam.core import fsio

            if fsio.is_local(output):
                raise ConfigError(f"--runner {name} workers cannot write to the local directory {output}; give --output as gs:// or s3://")
