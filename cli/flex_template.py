"""Dataflow Flex Template entry point: template parameters in, `run_pipeline` on the dataflow profile out.

The launcher image (runners/Dockerfile) runs this file with the template parameters from runners/metadata.json
as `--name=value` arguments, followed by Dataflow's own pipeline options (project, region, temp_location,
sdk_container_image, ...), which are passed through to Beam unchanged. Parameters never carry secrets: keys
come from a KMS provider and the vault DSN from an environment variable, both named in the `config` file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Template parameter name -> (required, help). Kept in step with runners/metadata.json by tests.
PARAMETERS = {
    "input": (True, "input files (gs:// glob)"),
    "schema": (True, "Avro schema (.avsc), gs:// or a path inside the image"),
    "policy": (True, "policy YAML, gs:// or a path inside the image"),
    "output": (True, "output directory (gs://)"),
    "config": (True, "config YAML naming the KMS key provider and the PostgreSQL vault (dsn_env)"),
    "batch_size": (False, "rows per RecordBatch (default 65536)"),
    "input_format": (False, "jsonl, csv, avro or parquet (default: from the file extension)"),
}


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="cloakbeam-flex-template")
    for name, (required, doc) in PARAMETERS.items():
        parser.add_argument(f"--{name}", required=required, help=doc, type=int if name == "batch_size" else str)
    return parser.parse_known_args(list(argv))


def settings_from(argv: Sequence[str]):
    """RunSettings for the template's parameters; unknown arguments are Beam/Dataflow options."""
    from cloakbeam.pipeline.graph import RunSettings

    args, beam_args = parse(argv)
    return RunSettings(
        inputs=[args.input],
        schema=args.schema,
        policy=args.policy,
        output=args.output,
        runner="dataflow",
        batch_size=args.batch_size or 65_536,
        input_format=args.input_format,
        beam_args=beam_args,
        config=args.config,
        progress=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from cloakbeam.pipeline.graph import run_pipeline

    run_pipeline(settings_from(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
