"""The `dataflow` profile: Google Cloud Dataflow, with cloakbeam installed on the workers.

    cloakbeam run --runner dataflow --config prod.yaml --input gs://... --output gs://... -- \\
        --project=PROJECT --region=REGION --temp_location=gs://BUCKET/tmp \\
        [--setup_file=/path/to/cloakbeam/pyproject.toml | --sdk_container_image=REGION-docker.pkg.dev/.../cloakbeam:TAG]

Worker packaging: either `--setup_file` (Beam builds an sdist of this package and installs it on every worker;
the default when running from a checkout) or `--sdk_container_image` (an image built from runners/Dockerfile,
which is also the Flex Template launcher image; see runners/metadata.json and docs/runners.md).

Running on Dataflow needs `apache-beam[gcp]` (about 800 MB), which is not installed here; what is checked
offline is option validation (Beam's PipelineOptionsValidator plus the checks below) and translation of the
pipeline to its portable proto. Workers reach keys through a KMS provider and the vault through PostgreSQL;
a local SQLite vault or keyring is refused by `check_runner_compatibility`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError
from cloakbeam.runners.base import RunnerHandle, reject_unknown

OPTIONS: tuple[str, ...] = ()
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class DataflowHandle(RunnerHandle):
    name = "dataflow"


def default_setup_file() -> str | None:
    """This package's pyproject.toml when running from a source checkout (editable install), else None."""
    p = PACKAGE_ROOT / "pyproject.toml"
    return str(p) if p.is_file() else None


def validate(options: Any) -> list[str]:
    """Problems with Dataflow launch options, as sentences (Beam's validator first, then cloakbeam's)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, WorkerOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    problems: list[str] = []
    try:
        from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

        problems.extend(PipelineOptionsValidator(options, DataflowRunner()).validate())
    except ImportError:  # pragma: no cover - the module imports without the gcp extras in Beam 2.77
        gco = options.view_as(GoogleCloudOptions)
        for name in ("project", "region", "temp_location"):
            if not getattr(gco, name):
                problems.append(f"Missing required option: {name}.")
    gco = options.view_as(GoogleCloudOptions)
    setup = options.view_as(SetupOptions)
    worker = options.view_as(WorkerOptions)
    if not setup.setup_file and not worker.sdk_container_image:
        problems.append(
            "Dataflow workers need cloakbeam installed: pass --setup_file=/path/to/cloakbeam/pyproject.toml or "
            "--sdk_container_image=IMAGE built from runners/Dockerfile"
        )
    if setup.setup_file:
        if os.path.basename(setup.setup_file) not in ("setup.py", "pyproject.toml"):
            problems.append(f"--setup_file must name a setup.py or pyproject.toml, not {setup.setup_file}")
        elif not os.path.isfile(setup.setup_file):
            problems.append(f"--setup_file {setup.setup_file} does not exist")
    if gco.temp_location and not str(gco.temp_location).startswith("gs://"):
        problems.append("--temp_location must be a gs:// path Dataflow can write")
    return list(dict.fromkeys(problems))


def make(beam_args: Sequence[str], runner_options: Mapping[str, Any] | None) -> tuple[DataflowHandle, Any]:
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions, WorkerOptions

    opts = reject_unknown("dataflow", runner_options, OPTIONS)
    options = PipelineOptions(list(beam_args))
    if opts.get("streaming"):
        options.view_as(StandardOptions).streaming = True
    gco = options.view_as(GoogleCloudOptions)
    if gco.temp_location and not gco.staging_location and str(gco.temp_location).startswith("gs://"):
        gco.staging_location = str(gco.temp_location).rstrip("/") + "/staging"
    setup = options.view_as(SetupOptions)
    if not setup.setup_file and not options.view_as(WorkerOptions).sdk_container_image:
        setup.setup_file = default_setup_file()
    problems = validate(options)
    if problems:
        raise ConfigError("Dataflow options are not valid: " + "; ".join(problems))
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    return DataflowHandle(DataflowRunner(), options), options
