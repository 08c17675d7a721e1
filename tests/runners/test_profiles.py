"""Runner profiles: construction-time refusals, option handling, and the offline checks of flink and dataflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import apache_beam as beam
import pytest

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.errors import ConfigError
from cloakbeam.keys.service import KeyRef
from cloakbeam.runners import RUNNERS, check_runner_compatibility, make_runner
from cloakbeam.tests.runners_fixtures import POLICY, REPO, SCHEMA, make_inputs

RUNNERS_DIR = REPO / "runners"


def _runtime(vault=None, keys=None) -> RuntimeConfig:
    return RuntimeConfig(
        run_id="r1",
        dataset_id="customers",
        state_dir="/tmp/state",
        keys=keys or KeyRef(provider="local", path="/tmp/state/keyring.json"),
        vault=vault if vault is not None else {"backend": "sqlite", "path": "/tmp/state/vault.sqlite"},
    )


REMOTE_OK = dict(vault={"backend": "postgres", "dsn_env": "CLOAKBEAM_VAULT_DSN"}, keys=KeyRef(provider="aws-kms", params=(("key_id", "alias/cloakbeam"),)))


# ------------------------------------------------------------------------------------------ refusals
def test_every_profile_is_listed():
    assert RUNNERS == ("direct", "dask", "flink", "dataflow")
    for name in RUNNERS:
        assert (RUNNERS_DIR / f"{name}.py").is_file()


def test_unknown_runner_refused():
    with pytest.raises(ConfigError, match="unknown runner 'spark'.*direct, dask, flink, dataflow"):
        check_runner_compatibility("spark", _runtime())
    with pytest.raises(ConfigError, match="unknown runner"):
        make_runner("spark", [])


@pytest.mark.parametrize("name", ["flink", "dataflow"])
def test_remote_runner_refuses_local_sqlite_vault(name):
    with pytest.raises(ConfigError, match=f"--runner {name}.*local SQLite vault.*PostgreSQL"):
        check_runner_compatibility(name, _runtime())


@pytest.mark.parametrize("name", ["flink", "dataflow"])
def test_remote_runner_refuses_local_keyring(name):
    with pytest.raises(ConfigError, match=f"--runner {name}.*local keyring.*KMS"):
        check_runner_compatibility(name, _runtime(vault=REMOTE_OK["vault"]))


@pytest.mark.parametrize("name", ["flink", "dataflow"])
def test_remote_runner_accepts_postgres_and_kms(name):
    check_runner_compatibility(name, _runtime(**REMOTE_OK))
    check_runner_compatibility(name, _runtime(**REMOTE_OK), {"streaming": True})


@pytest.mark.parametrize("name", ["flink", "dataflow"])
def test_remote_runner_refuses_local_output(name):
    with pytest.raises(ConfigError, match=f"--runner {name} workers cannot write to the local directory"):
        check_runner_compatibility(name, _runtime(**REMOTE_OK), output="/tmp/out")
    check_runner_compatibility(name, _runtime(**REMOTE_OK), output="gs://bucket/out")


@pytest.mark.parametrize("name", ["direct", "dask"])
def test_local_runners_accept_local_state(name):
    check_runner_compatibility(name, _runtime())


@pytest.mark.parametrize("name", ["flink", "dataflow"])
def test_cli_refuses_remote_runner_with_default_local_state(name, tmp_path, capsys):
    from cloakbeam.cli.main import main

    inputs = make_inputs(tmp_path / "in", rows=20, files=1, dirty=0.0)
    code = main(["run", "--dev", "--runner", name, "--input", inputs[0], "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "local SQLite vault" in err and f"--runner {name}" in err
    assert not (tmp_path / "out" / "data").exists()


def test_dask_refuses_streaming():
    with pytest.raises(ConfigError, match="--runner dask cannot run the streaming pipeline"):
        check_runner_compatibility("dask", _runtime(), {"streaming": True})
    with pytest.raises(ConfigError, match="batch jobs only"):
        make_runner("dask", ["--streaming"])


def test_option_for_another_runner_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="--dask-address does not apply to --runner direct"):
        check_runner_compatibility("direct", _runtime(), {"dask_address": "tcp://127.0.0.1:8786"})
    with pytest.raises(ConfigError, match="--workers does not apply to --runner flink"):
        make_runner("flink", ["--job_endpoint=embed"], {"workers": 2})


def test_cli_dask_address_with_direct_runner_exits_2(tmp_path, capsys):
    from cloakbeam.cli.main import main

    inputs = make_inputs(tmp_path / "in", rows=20, files=1, dirty=0.0)
    code = main(["run", "--dev", "--input", inputs[0], "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "out"), "--dask-address", "tcp://127.0.0.1:1"])
    assert code == 2
    assert "--dask-address does not apply" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ direct
def test_direct_multiprocess_options_reach_workers():
    handle, options = make_runner("direct", ["--job_name=same-answer"], {"workers": 2})
    from apache_beam.options.pipeline_options import DirectOptions

    d = options.view_as(DirectOptions)
    assert d.direct_num_workers == 2 and d.direct_running_mode == "multi_processing"
    provided = handle.beam_runner._provision_info.provision_info.pipeline_options
    assert provided["beam:option:job_name:v1"] == "same-answer"
    assert int(provided["beam:option:direct_num_workers:v1"]) == 2


def test_direct_refuses_bad_workers():
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        make_runner("direct", [], {"workers": 0})


# ------------------------------------------------------------------------------------------ dask options
def test_dask_options_local_cluster_defaults():
    from apache_beam.runners.dask.dask_runner import DaskOptions

    handle, options = make_runner("dask", [], {"workers": 3})
    assert handle.address is None and handle.workers == 3
    assert options.view_as(DaskOptions).npartitions == 6


def test_dask_options_existing_scheduler():
    handle, options = make_runner("dask", ["--dask_npartitions=5"], {"dask_address": "tcp://10.0.0.5:8786"})
    from apache_beam.runners.dask.dask_runner import DaskOptions

    assert handle.address == "tcp://10.0.0.5:8786"
    assert options.view_as(DaskOptions).npartitions == 5


@pytest.mark.parametrize(
    "args,opts,message",
    [
        (["--dask_client_address=tcp://a:1"], {"dask_address": "tcp://b:2"}, "different schedulers"),
        ([], {"dask_address": "tcp://b:2", "workers": 4}, "--workers sizes a local cluster"),
        ([], {"workers": -1}, "--workers must be at least 1"),
        ([], {"dask_address": "  "}, "--dask-address is empty"),
    ],
)
def test_dask_bad_options(args, opts, message):
    with pytest.raises(ConfigError, match=message):
        make_runner("dask", args, opts)


# ------------------------------------------------------------------------------------------ flink
@pytest.mark.parametrize(
    "args,message",
    [
        ([], "needs the Flink job server's address"),
        (["--job_endpoint=flink:8099"], "DOCKER needs --environment_config"),
        (["--job_endpoint=flink:8099", "--environment_type=EXTERNAL"], "EXTERNAL needs --environment_config"),
        (["--job_endpoint=flink:8099", "--environment_type=LOOPBACK"], "LOOPBACK runs workers in the launcher"),
        (["--job_endpoint=flink:8099", "--environment_type=CLOUD"], "not one of DOCKER"),
    ],
)
def test_flink_bad_options(args, message):
    with pytest.raises(ConfigError, match=message):
        make_runner("flink", args)


def test_flink_good_options():
    handle, options = make_runner("flink", ["--job_endpoint=flink-jobserver:8099", "--environment_type=EXTERNAL", "--environment_config=localhost:50000", "--parallelism=4"], {"streaming": True})
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.portability.portable_runner import PortableRunner

    assert isinstance(handle.beam_runner, PortableRunner)
    assert options.view_as(StandardOptions).streaming


def _prepared(tmp_path: Path, rows: int = 600):
    from cloakbeam.pipeline.graph import RunSettings, prepare

    inputs = make_inputs(tmp_path / "in", rows=rows, files=1, dirty=0.02)
    return prepare(RunSettings(dev=True, inputs=inputs, schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), batch_size=200, state_dir=str(tmp_path / "state"), progress=False))


@pytest.mark.slow
def test_flink_profile_runs_reference_graph_through_job_api_embedded(tmp_path):
    """The portable submission path (Job API, artifact staging, SDK harness over gRPC) offline: embed + LOOPBACK."""
    from cloakbeam.pipeline.graph import _load_stats, build_graph

    run = _prepared(tmp_path)
    handle, options = make_runner("flink", ["--job_endpoint=embed", "--environment_type=LOOPBACK"])
    with handle.session():
        p = beam.Pipeline(runner=handle.beam_runner, options=options)
        build_graph(p, run)
        p.run().wait_until_finish()
    stats = _load_stats(run.stats_path)
    assert stats.counts["input"] == 600
    assert stats.counts["written"] + stats.counts["quarantined"] + stats.counts["suppressed"] == 600
    assert sum(f.rows for f in stats.files if f.kind == "data") == stats.counts["written"]


# ------------------------------------------------------------------------------------------ dataflow
DF_OK = ["--project=my-project-123", "--region=europe-west1", "--temp_location=gs://my-bucket/tmp"]


def test_dataflow_good_options_default_to_setup_file():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions

    handle, options = make_runner("dataflow", DF_OK)
    assert options.view_as(SetupOptions).setup_file == str(REPO / "pyproject.toml")
    assert options.view_as(GoogleCloudOptions).staging_location == "gs://my-bucket/tmp/staging"
    assert type(handle.beam_runner).__name__ == "DataflowRunner"


def test_dataflow_container_image_instead_of_setup_file():
    from apache_beam.options.pipeline_options import SetupOptions

    _, options = make_runner("dataflow", DF_OK + ["--sdk_container_image=europe-docker.pkg.dev/p/r/cloakbeam:1"])
    assert options.view_as(SetupOptions).setup_file is None


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "Missing required option: project"),
        (["--project=my-project-123", "--temp_location=gs://my-bucket/tmp"], "Missing required option: region"),
        (["--project=my-project-123", "--region=europe-west1", "--temp_location=/tmp/x"], "temp_location"),
        (DF_OK + ["--setup_file=/nonexistent/pyproject.toml"], "does not exist"),
        (DF_OK + ["--setup_file=/etc/hostname"], "must name a setup.py or pyproject.toml"),
    ],
)
def test_dataflow_bad_options(args, message):
    with pytest.raises(ConfigError, match=message):
        make_runner("dataflow", args)


def test_reference_graph_translates_to_portable_proto(tmp_path):
    """What Dataflow and the Flink job server receive: the pipeline proto, which must build and round-trip."""
    from apache_beam.pipeline import Pipeline

    from cloakbeam.pipeline.graph import build_graph

    run = _prepared(tmp_path, rows=20)
    handle, options = make_runner("dataflow", DF_OK)
    p = beam.Pipeline(runner=handle.beam_runner, options=options)
    build_graph(p, run)
    proto = p.to_runner_api()
    labels = {t.unique_name for t in proto.components.transforms.values()}
    for step in ("ReadRecords", "ProtectRecords", "WriteTrainingParquet", "CollectRunStats"):
        assert step in labels
    back = Pipeline.from_runner_api(proto, handle.beam_runner, options)
    assert back.to_runner_api().components.transforms.keys() == proto.components.transforms.keys()


# ------------------------------------------------------------------------------------------ flex template
def test_flex_template_metadata_is_valid_and_matches_the_entry_point():
    from cloakbeam.cli import flex_template

    meta = json.loads((RUNNERS_DIR / "metadata.json").read_text())
    assert meta["name"] and meta["description"]
    names = []
    for param in meta["parameters"]:
        assert {"name", "label", "helpText"} <= set(param), param
        assert re.fullmatch(r"[a-z][a-z0-9_]*", param["name"])
        for rx in param.get("regexes", []):
            re.compile(rx)
        required, _ = flex_template.PARAMETERS[param["name"]]
        assert param.get("isOptional", False) == (not required), param["name"]
        names.append(param["name"])
    assert names == list(flex_template.PARAMETERS)


def test_flex_template_passes_dataflow_options_through():
    from cloakbeam.cli.flex_template import settings_from

    s = settings_from(["--input=gs://b/raw/*.jsonl", "--schema=/template/s.avsc", "--policy=/template/p.yaml", "--output=gs://b/out", "--config=/template/prod.yaml", "--batch_size=1000", *DF_OK])
    assert s.runner == "dataflow" and s.inputs == ["gs://b/raw/*.jsonl"] and s.batch_size == 1000
    assert list(s.beam_args) == DF_OK
    with pytest.raises(SystemExit):
        settings_from(["--input=gs://b/raw/*.jsonl"])


def test_dockerfile_installs_cloakbeam_and_points_at_the_entry_point():
    text = (RUNNERS_DIR / "Dockerfile").read_text()
    assert "apache/beam_python3.11_sdk:2.77.0" in text  # the SDK matches the pinned apache-beam==2.77
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE" in text and "cli/flex_template.py" in text
    assert re.search(r"pip install .*cloakbeam-src", text)
