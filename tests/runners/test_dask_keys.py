"""Keys across worker processes: the reference pipeline (ssn encrypted, quarantine sealed) on a real
dask.distributed LocalCluster with 2 worker processes; the launcher process never held the data keys, yet the
output verifies, decrypts for an authorized role, and its quarantine opens."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cloakbeam.keys import service as svc
from cloakbeam.keys.signing import verify_output


@pytest.mark.slow
def test_reference_pipeline_on_dask_workers_decrypts_and_verifies(tmp_path):
    from cloakbeam.runners.dask import start_local_cluster
    from cloakbeam.tests.runners_fixtures import make_inputs, run_reference

    cluster = start_local_cluster(2)
    try:
        inputs = make_inputs(tmp_path / "in", rows=600, files=2)
        out, state = tmp_path / "out", tmp_path / "state"
        svc._PROCESS.clear()
        manifest = run_reference(inputs, out, state, "dask", {"dask_address": cluster.scheduler_address}, batch_size=250)
    finally:
        cluster.close()
    assert manifest["reconciled"]
    assert not svc.process_wrapped_keys(svc.KeyRef(path=str(state / "keyring.json")))  # launcher made no DEKs
    assert verify_output(out, __import__('base64').b64decode(__import__('json').loads((state / 'keyring.json').read_text())['signing_public_key'])) == []
    from cloakbeam.tests.keys_fixtures import reveal_quarantine, reveal_tables, with_reveal

    ref = svc.KeyRef(path=str(state / "keyring.json"))
    tables = reveal_tables(out, ref, {"backend": "sqlite", "path": str(state / "vault.sqlite")})  # what the reveal service reads
    ks = with_reveal(svc.open_key_service(ref))
    ssn = pa.concat_tables(tables).column("ssn")
    assert ssn.type == pa.string() and len(ssn) == manifest["counts"]["written"]
    assert all(len(v) == 11 for v in ssn.to_pylist() if v is not None)
    raws = reveal_quarantine(out, ks, "customers")
    assert len(raws) == len([1 for q in (out / "quarantine").rglob("*.jsonl") for line in q.read_text().splitlines() if line.strip()])
