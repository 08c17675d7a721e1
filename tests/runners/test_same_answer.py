"""Same answer everywhere: the reference pipeline on the in-process FnApiRunner, the FnApiRunner with two SDK
worker processes, and a real dask.distributed LocalCluster (two worker processes over TCP on loopback) gives
the same files, the same values in them (encrypted columns compared after decryption) and the same counts."""

from __future__ import annotations

import pytest

from cloakbeam.tests.runners_fixtures import comparable_manifest, make_inputs, read_output, run_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("same-answer")
    state = base / "state"
    inputs = make_inputs(base / "in")
    out = {}
    for label, runner, opts in (
        ("direct", "direct", {}),
        ("direct-multiprocess", "direct", {"workers": 2}),
        ("dask", "dask", {"workers": 2}),
    ):
        manifest = run_reference(inputs, base / label, state, runner, opts)
        out[label] = (manifest, read_output(base / label, state))
    return out


def test_every_run_reconciles_and_wrote_something(runs):
    for label, (manifest, tables) in runs.items():
        assert manifest["reconciled"], label
        assert manifest["counts"]["input"] == 3000, label
        assert 0 < manifest["counts"]["quarantined"] < 3000, label
        assert sum(t.num_rows for t in tables.values()) == manifest["counts"]["written"], label
        assert len(tables) > 2, label  # several batches, so several files


def test_runner_recorded_in_manifest(runs):
    assert runs["direct"][0]["runner"] == "direct"
    assert runs["dask"][0]["runner"] == "dask"


@pytest.mark.parametrize("other", ["direct-multiprocess", "dask"])
def test_manifest_counts_identical(runs, other):
    assert comparable_manifest(runs[other][0]) == comparable_manifest(runs["direct"][0])


@pytest.mark.parametrize("other", ["direct-multiprocess", "dask"])
def test_output_identical_value_for_value(runs, other):
    ref = runs["direct"][1]
    got = runs[other][1]
    assert sorted(got) == sorted(ref)  # same files: names derive from the batch's identity, not the worker
    for path, table in ref.items():
        assert got[path].schema == table.schema, path
        assert got[path].equals(table), f"{path} differs between direct and {other}"


def test_encrypted_columns_were_decrypted_or_compared_by_nullness(runs):
    """Guard that the comparison above covers encrypted columns: none is compared as raw ciphertext (which
    differs on every run, so equality would have failed) -- each is plaintext again, or reduced to nullness."""
    import pyarrow as pa

    manifest, tables = runs["direct"]
    encrypted = [p for p, f in manifest["fields"].items() if f["action"]["action"] == "encrypt" and "." not in p]
    for t in tables.values():
        for name in encrypted:
            if name in t.column_names:
                assert not pa.types.is_binary(t.schema.field(name).type), name


def test_parquet_modular_encryption_same_answer_on_dask(tmp_path):
    """The reference policy plus Parquet modular encryption of two columns: the files written by Dask workers
    decrypt to the same values as the in-process run's (skipped when the key layer has no such section)."""
    import yaml

    pytest.importorskip("cloakbeam.keys.parquet_encryption")
    from cloakbeam.tests import runners_fixtures as rf

    doc = yaml.safe_load(rf.POLICY.read_text())
    doc["parquet_encryption"] = {"columns": {"default": ["income", "diagnosis"]}}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    inputs = make_inputs(tmp_path / "in", rows=400, files=2)
    state = tmp_path / "state"
    outs = {}
    for runner in ("direct", "dask"):
        from cloakbeam.pipeline.graph import RunSettings, run_pipeline

        m = run_pipeline(RunSettings(dev=True, inputs=inputs, schema=str(rf.SCHEMA), policy=str(policy), output=str(tmp_path / runner), runner=runner,
                                     batch_size=200, state_dir=str(state), overwrite=True, progress=False))
        outs[runner] = (m, read_output(tmp_path / runner, state))
    import pyarrow.parquet as pq

    some = next((tmp_path / "dask" / "data").rglob("*.parquet"))
    with pytest.raises(Exception):
        pq.read_table(some)  # really encrypted: unreadable without the keys
    assert comparable_manifest(outs["dask"][0]) == comparable_manifest(outs["direct"][0])
    ref, got = outs["direct"][1], outs["dask"][1]
    assert sorted(got) == sorted(ref)
    for path in ref:
        assert got[path].equals(ref[path]), path


def test_dp_statistics_and_splits_computed_on_every_runner(runs):
    """The DP branch (per-batch partials, PipelineDP's noise) runs on Dask too (its branch is joined by the graph's final Flatten): every
    runner reports every statistic with fresh noise, the same spent budget and the same split counts."""
    values = {}
    for label, (manifest, _) in runs.items():
        dp = manifest["sections"]["dp_statistics"]
        assert dp["computed"] and dp["spent"]["epsilon"] == 3.0, label
        values[label] = [r["value"] for st in dp["statistics"] for r in st["results"].values()]
        assert manifest["sections"]["splits"]["reconciled"], label
    assert values["dask"] != values["direct"]  # noise is drawn per run, not fixed
