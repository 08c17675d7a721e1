"""The `flink` profile: Beam's portable runner submitting to a Flink job server.

    cloakbeam run --runner flink ... -- --job_endpoint=flink-jobserver:8099 \\
        --environment_type=EXTERNAL --environment_config=localhost:50000 [--parallelism=8] [--streaming]

The Flink job server (`apache/beam_flink1.20_job_server`, or the FlinkRunner's jar) translates the portable
pipeline for a Flink cluster; Python DoFns run in SDK harnesses that must have cloakbeam installed: a container
built from runners/Dockerfile (`--environment_type=DOCKER --environment_config=IMAGE`) or a worker-pool sidecar
(`--environment_type=EXTERNAL --environment_config=HOST:50000`). See docs/runners.md.

`--job_endpoint=embed --environment_type=LOOPBACK` runs the same Job API submission path in this process, which
is how this profile is checked offline. Workers on a Flink cluster cannot reach the launcher's local SQLite vault
or keyring: that combination is refused by `check_runner_compatibility`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cloakbeam.errors import ConfigError
from cloakbeam.runners.base import RunnerHandle, reject_unknown

OPTIONS: tuple[str, ...] = ()
ENVIRONMENT_TYPES = ("DOCKER", "PROCESS", "EXTERNAL", "LOOPBACK")
LOCAL_ENDPOINTS = ("embed",)


class FlinkHandle(RunnerHandle):
    name = "flink"


def validate(options: Any) -> list[str]:
    """Problems with Flink launch options, as sentences saying what to fix (empty when fine)."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PortableOptions

    port = options.view_as(PortableOptions)
    flink = options.view_as(FlinkRunnerOptions)
    problems = []
    if not port.job_endpoint:
        problems.append("--runner flink needs the Flink job server's address: pass -- --job_endpoint=HOST:8099 (see docs/runners.md)")
    env = (port.environment_type or "DOCKER").upper()
    if env not in ENVIRONMENT_TYPES and not env.startswith("BEAM:ENV:"):
        problems.append(f"--environment_type {port.environment_type} is not one of {', '.join(ENVIRONMENT_TYPES)}")
    if env == "DOCKER" and not port.environment_config:
        problems.append("--environment_type=DOCKER needs --environment_config=IMAGE naming an SDK image with cloakbeam installed (build runners/Dockerfile); Beam's stock image lacks cloakbeam")
    if env == "EXTERNAL" and not port.environment_config:
        problems.append("--environment_type=EXTERNAL needs --environment_config=HOST:PORT of a Beam worker pool running cloakbeam")
    if env == "LOOPBACK" and port.job_endpoint and port.job_endpoint not in LOCAL_ENDPOINTS and not str(port.job_endpoint).startswith(("localhost:", "127.0.0.1:")):
        problems.append("--environment_type=LOOPBACK runs workers in the launcher; use it only with --job_endpoint=embed or a job server on this machine")
    if flink.parallelism is not None and flink.parallelism != -1 and flink.parallelism < 1:
        problems.append("--parallelism must be at least 1")
    return problems


def make(beam_args: Sequence[str], runner_options: Mapping[str, Any] | None) -> tuple[FlinkHandle, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.portability.portable_runner import PortableRunner

    opts = reject_unknown("flink", runner_options, OPTIONS)
    options = PipelineOptions(list(beam_args))
    if opts.get("streaming"):
        options.view_as(StandardOptions).streaming = True
    problems = validate(options)
    if problems:
        raise ConfigError("; ".join(problems))
    return FlinkHandle(PortableRunner(), options), options
