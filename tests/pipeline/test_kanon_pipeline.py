"""k-anonymity inside the whole pipeline: Read -> Protect -> EnforceKAnonymity with assert_that, `run_pipeline`
with the reference policy (Parquet output checked for k and l, manifest report), and the CLI failing clearly
when the target cannot be met."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.core.stats import RunStats
from cloakbeam.keys.service import KeyRef, ensure_local_keyring
from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.schemas.avro import load_schema
from cloakbeam.tests.paths import POLICY, SCHEMA
from cloakbeam.transforms.policy import load_policy
from cloakbeam.transforms.steps import ProtectRecords, ReadRecords

QIS = ["date_of_birth", "zip", "gender"]


def _check_classes(rows: list[dict], k: int, l: int) -> None:
    classes: dict[tuple, list] = defaultdict(list)
    for r in rows:
        classes[tuple(r[q] for q in QIS)].append(r["diagnosis"])
    for sens in classes.values():
        assert len(sens) >= k and len(set(sens)) >= l


def _reference_runtime(tmp_path):
    """(schema, compiled reference policy, runtime with a dev keyring and a SQLite vault under tmp_path)."""
    schema = load_schema(SCHEMA)
    policy = load_policy(POLICY, schema)
    ring = tmp_path / "ring.json"
    ensure_local_keyring(ring)
    runtime = RuntimeConfig(run_id="r", dataset_id=policy.dataset, state_dir=str(tmp_path), keys=KeyRef("local", str(ring)),
                            vault={"backend": "sqlite", "path": str(tmp_path / "vault.sqlite")})
    return schema, policy, runtime


def test_read_protect_enforce_with_assert_that(tmp_path, reference_inputs):
    schema, policy, runtime = _reference_runtime(tmp_path)

    def check(elements):
        rows = [r for e in elements if not isinstance(e, RunStats) for r in e.select(QIS + ["diagnosis"]).to_pylist()]
        stats = RunStats.merged([e for e in elements if isinstance(e, RunStats)])
        _check_classes(rows, 10, 2)
        c = stats.counts
        assert c["input"] == 3000
        assert len(rows) + c["quarantined"] + c["suppressed"] == c["input"]
        rep = stats.extra["k_anonymity"]
        assert rep["records_suppressed"] == c["suppressed"] <= 0.02 * rep["records_in"]
        assert rep["records_in"] == c["input"] - c["quarantined"]

    with TestPipeline() as p:
        out = (p | ReadRecords([reference_inputs["jsonl"]["path"]], schema, str(tmp_path / "out"), runtime, 700)
                 | ProtectRecords(policy, runtime)
                 | "EnforceKAnonymity" >> policy.sections["k_anonymity"].batch_transform(runtime))
        assert_that(out, check)


def test_spilling_gives_the_same_levels_and_suppresses_the_same_records(tmp_path, reference_inputs):
    """Bounded memory (protected batches wait for the plan in encrypted spill files) changes nothing released:
    same levels, same suppressed count, the same records (deterministic columns), against the in-memory path."""
    import json

    schema, policy, runtime = _reference_runtime(tmp_path)
    spill = tmp_path / "spill"
    cols = ["customer_id"] + QIS + ["diagnosis"]

    def run(name, spill_dir):
        def save(elements):
            rows = sorted(json.dumps(r, sort_keys=True, default=str) for e in elements if not isinstance(e, RunStats)
                          for r in e.select(cols).to_pylist())
            stats = RunStats.merged([e for e in elements if isinstance(e, RunStats)])
            rep = stats.extra["k_anonymity"]
            (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows, "levels": rep["levels"],
                                                               "suppressed": stats.counts["suppressed"],
                                                               "spill_seconds": stats.timers.get("k_anonymity.spill", 0)}))

        with TestPipeline() as p:
            out = (p | ReadRecords([reference_inputs["jsonl"]["path"]], schema, str(tmp_path / name), runtime, 700)
                     | ProtectRecords(policy, runtime)
                     | "EnforceKAnonymity" >> policy.sections["k_anonymity"].batch_transform(runtime, spill_dir=spill_dir))
            assert_that(out, save)
        return json.loads((tmp_path / f"{name}.json").read_text())

    held, spilled = run("held", None), run("spilled", str(spill))
    assert held["rows"] and spilled["rows"] == held["rows"]
    assert spilled["levels"] == held["levels"] and spilled["suppressed"] == held["suppressed"] > 0
    assert held["spill_seconds"] == 0 < spilled["spill_seconds"]
    files = sorted(os.listdir(spill))
    assert len(files) == -(-3000 // 700) and all(f.endswith(".spill") for f in files)  # one file per protected batch
    raw = b"".join((spill / f).read_bytes() for f in files)
    sample = pa.concat_tables([pq.read_table(reference_inputs["parquet"]["path"])]).column("zip").to_pylist()[:50]
    assert not any(z.encode() in raw for z in sample if z)  # full-detail quasi-identifiers are not on disk in the clear
    assert oct(os.stat(spill).st_mode & 0o777) == oct(0o700)


def test_run_pipeline_reference_policy_output_is_k_anonymous(tmp_path, reference_inputs):
    manifest = run_pipeline(RunSettings(dev=True, inputs=[reference_inputs["parquet"]["path"]], schema=str(SCHEMA), policy=str(POLICY),
                                        output=str(tmp_path / "out"), batch_size=500, progress=False))
    c = manifest["counts"]
    assert c["input"] == c["written"] + c["quarantined"] + c["suppressed"] and manifest["reconciled"] is True
    sec = manifest["sections"]["k_anonymity"]
    rep = sec["batch"]
    assert rep["records_suppressed"] == c["suppressed"] and rep["k_achieved"] >= 10 and rep["l_achieved"] >= 2
    for key in ("levels", "class_size_histogram", "prosecutor_risk", "journalist_risk", "marketer_risk", "information_loss"):
        assert key in rep
    assert "k=" in sec["summary"]
    assert manifest["stages"]["k_anonymity.spill"] > 0  # the batches waited in spill files ...
    assert not os.path.exists(tmp_path / "out" / ".cloakbeam-run")  # ... which went with the run's private directory
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(tmp_path, "out", "data", "**", "*.parquet"), recursive=True))])
    assert table.num_rows == c["written"]
    for q in QIS:
        assert table.schema.field(q).type == pa.string()
    _check_classes(table.select(QIS + ["diagnosis"]).to_pylist(), 10, 2)


def test_cli_run_fails_naming_the_unreachable_target(tmp_path, reference_inputs, capsys):
    from cloakbeam.cli.main import main

    raw = yaml.safe_load(open(POLICY))
    raw["k_anonymity"]["k"] = 100_000
    raw["k_anonymity"]["sensitive"]["l"] = 2
    pol = tmp_path / "strict.yaml"
    pol.write_text(yaml.safe_dump(raw))
    rc = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(SCHEMA), "--policy", str(pol),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "k-anonymity target k=100000 cannot be met" in err


@pytest.mark.slow
def test_dask_runner_chooses_the_same_levels_and_suppresses_the_same_records(tmp_path, reference_inputs):
    """The chain (CombineGlobally + AsSingleton side input + Flatten) on the DaskRunner: same plan, same counts."""
    manifests = {}
    for runner in ("direct", "dask"):
        manifests[runner] = run_pipeline(RunSettings(
            dev=True,
            inputs=[reference_inputs["jsonl"]["path"]], schema=str(SCHEMA), policy=str(POLICY),
            output=str(tmp_path / runner), state_dir=str(tmp_path / "state"), runner=runner, batch_size=700, progress=False))
    a, b = (manifests[r]["sections"]["k_anonymity"]["batch"] for r in ("direct", "dask"))
    for key in ("levels", "records_suppressed", "records_released", "k_achieved", "l_achieved", "class_size_histogram"):
        assert a[key] == b[key]
    assert manifests["direct"]["counts"] == manifests["dask"]["counts"]
    # The uniqueness scan (a CombineGlobally branch joined by Flatten) gives the same figures on both runners.
    ua, ub = (manifests[r]["sections"]["uniqueness"] for r in ("direct", "dask"))
    assert ua["scanned"] and ua["records"] == manifests["direct"]["counts"]["written"]
    for key in ("records", "riskiest", "failing", "combinations_measured", "passed"):
        assert ua[key] == ub[key]
