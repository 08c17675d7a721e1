"""The `direct` profile (default): Beam's FnApiRunner, built explicitly, in-process or over worker processes.

The DirectRunner would first try to download the Prism runner (fails offline) and was seen leaving a gRPC port
open, so this profile constructs the FnApiRunner itself, with the pipeline options in its provision info:
that is what makes the options reach multi-process SDK workers (`--runner=FnApiRunner` by name does not).
`--workers N` (N > 1) selects `direct_running_mode=multi_processing` with N worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cloakbeam.errors import ConfigError
from cloakbeam.runners.base import RunnerHandle, reject_unknown

OPTIONS = ("workers",)


class DirectHandle(RunnerHandle):
    name = "direct"


def fn_api_runner(options: Any) -> Any:
    """An FnApiRunner whose workers (threads or processes) receive `options`."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def make(beam_args: Sequence[str], runner_options: Mapping[str, Any] | None) -> tuple[DirectHandle, Any]:
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    opts = reject_unknown("direct", runner_options, OPTIONS)
    options = PipelineOptions(list(beam_args))
    if opts.get("streaming"):
        # The local directory watch (PeriodicImpulse, a splittable DoFn, + user state) runs on the FnApiRunner,
        # which executes it stage by stage: files are picked up as they arrive and windows are committed when
        # the watch ends. The bundle-based DirectRunner cannot expand PeriodicImpulse in streaming mode; it is
        # what runs TestStream (tests), with real watermarks, triggers and late panes.
        if opts.get("workers"):
            raise ConfigError("--workers does not apply to a local streaming run")
        return DirectHandle(fn_api_runner(options), options), options
    if options.view_as(StandardOptions).streaming:
        raise ConfigError("the batch pipeline does not take Beam's --streaming; use `cloakbeam run --streaming` (streaming graph) instead")
    direct = options.view_as(DirectOptions)
    workers = opts.get("workers")
    if workers is not None:
        if int(workers) < 1:
            raise ConfigError("--workers must be at least 1")
        direct.direct_num_workers = int(workers)
        if int(workers) > 1 and direct.direct_running_mode == "in_memory":
            direct.direct_running_mode = "multi_processing"
    return DirectHandle(fn_api_runner(options), options), options
