"""The `encrypt` action: policy compilation, protect_batch over whole columns, pickles without key bytes."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.errors import PolicyError
from cloakbeam.keys import keyring as kr
from cloakbeam.keys.cells import decrypt_column
from cloakbeam.keys.service import open_key_service
from cloakbeam.tests.keys_fixtures import all_key_bytes, dev_keyring, encrypt_batch, encrypt_policy, with_reveal
from cloakbeam.transforms.protect import protect_batch
from cloakbeam.transforms.registry import ActionContext, get_action


@pytest.fixture()
def runtime(tmp_path):
    return RuntimeConfig(run_id="r1", dataset_id="customers", state_dir=str(tmp_path), keys=dev_keyring(tmp_path))


def test_encrypt_registered_and_requires_keys(customers_schema):
    cls = get_action("encrypt")
    assert cls.requires == frozenset({"keys"})
    pol = encrypt_policy(customers_schema, ssn="encrypt")
    assert pol.requires() == {"keys"}
    f = pol.output_schema().field("ssn")
    assert f.type == pa.binary()
    assert b'"deterministic": false' in f.metadata[b"cloakbeam.action"] and b'"type": "string"' in f.metadata[b"cloakbeam.action"]


@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"action": "encrypt", "deterministic": "yes"}, "must be of type bool"),
        ({"action": "encrypt", "key": "bad name!"}, "must be a key name"),
        ({"action": "encrypt", "nonce": "x"}, "unknown parameter 'nonce'"),
    ],
)
def test_bad_parameters_fail_at_compile(customers_schema, spec, msg):
    with pytest.raises(PolicyError, match=msg):
        encrypt_policy(customers_schema, ssn=spec)


def test_protect_batch_encrypts_and_round_trips(customers_schema, runtime):
    pol = encrypt_policy(customers_schema, ssn="encrypt", email={"action": "encrypt", "deterministic": True}, income="encrypt", date_of_birth="encrypt")
    batch = encrypt_batch(customers_schema, 50)
    ctx = ActionContext(runtime)
    out = protect_batch(batch, pol, ctx)
    assert out.schema.field("ssn").type == pa.binary()
    raw_ssn = batch.column(batch.schema.get_field_index("ssn"))
    assert not any(v.encode() in out.column(out.schema.get_field_index("ssn")).buffers()[2].to_pybytes() for v in raw_ssn.to_pylist()[:5])
    assert ctx.stats["encrypt.ssn.cells"] == 50
    ks = with_reveal(open_key_service(runtime.keys))
    lookup = ks.key_lookup(ks.wrapped_keys_used())
    for col, t in (("ssn", pa.string()), ("email", pa.string()), ("income", pa.float64()), ("date_of_birth", pa.date32())):
        got = decrypt_column(out.column(out.schema.get_field_index(col)), lookup, dataset="customers", column=col, value_type=t)
        want = batch.column(batch.schema.get_field_index(col))
        assert got.equals(want.cast(t)), col
    # Deterministic column: equal inputs give equal cells across runs/workers (fresh context, same keyring).
    out2 = protect_batch(batch, pol, ActionContext(runtime))
    assert out2.column(out2.schema.get_field_index("email")).equals(out.column(out.schema.get_field_index("email")))
    assert not out2.column(out2.schema.get_field_index("ssn")).equals(out.column(out.schema.get_field_index("ssn")))


def test_batch_larger_than_dek_limit_is_split(customers_schema, tmp_path):
    ref = dev_keyring(tmp_path, dek_max_uses="7")
    runtime = RuntimeConfig(run_id="r", dataset_id="customers", state_dir=str(tmp_path), keys=ref)
    pol = encrypt_policy(customers_schema, ssn="encrypt")
    ctx = ActionContext(runtime)
    out = protect_batch(encrypt_batch(customers_schema, 20), pol, ctx)
    col = out.column(out.schema.get_field_index("ssn"))
    ids = {col[i].as_py()[1:9] for i in range(len(col))}
    assert len(ids) == 3  # 7 + 7 + 6 cells


def test_pickled_action_dofn_and_runtime_hold_no_key_bytes(customers_schema, runtime):
    from cloakbeam.transforms.steps import PolicyRef, _ProtectFn

    pol = encrypt_policy(customers_schema, ssn="encrypt")
    fn = _ProtectFn(PolicyRef.of(pol), runtime)
    fn.setup()
    batch = encrypt_batch(customers_schema, 10)
    outs = list(fn.process(batch))  # keys are now open inside the DoFn
    assert any(getattr(o, "extra", {}).get("wrapped_keys") for o in outs)
    ks = fn.ctx.keys
    secrets = all_key_bytes(ks)
    action = pol.actions["ssn"]
    action.apply(batch.column(batch.schema.get_field_index("ssn")), {}, fn.ctx)
    blobs = [pickle.dumps(action), pickle.dumps(runtime), pickle.dumps(PolicyRef.of(pol))]
    fresh = _ProtectFn(PolicyRef.of(pol), runtime)  # what Beam pickles: the DoFn before setup()
    blobs.append(pickle.dumps(fresh))
    from apache_beam.internal import pickler

    blobs.append(pickler.dumps(fresh))
    for blob in blobs:
        for s in secrets:
            assert s not in blob
            assert kr.b64e(s).encode() not in blob and s.hex().encode() not in blob
    with pytest.raises(TypeError):
        pickle.dumps(fn.ctx.keys)


def test_wrapped_keys_reach_the_manifest_when_protect_and_write_run_in_different_processes(customers_schema, runtime, tmp_path):
    import json

    from cloakbeam.core.stats import RunStats
    from cloakbeam.keys import service as svc
    from cloakbeam.tests.keys_fixtures import reveal_tables
    from cloakbeam.transforms.steps import PolicyRef, _ProtectFn, _WriteFn

    pol = encrypt_policy(customers_schema, ssn="encrypt")
    batch = encrypt_batch(customers_schema, 30)
    fn = _ProtectFn(PolicyRef.of(pol), runtime)
    fn.setup()
    outs = list(fn.process(batch))
    protected = [o for o in outs if isinstance(o, pa.RecordBatch)][0]
    stats = [o for o in outs if isinstance(o, RunStats)]
    assert len(list(fn.process(batch))) == 2  # same DEK for the next batch: no new records to send
    svc._PROCESS.clear()  # the writer runs in another worker process with an empty DEK cache
    out = tmp_path / "out"
    w = _WriteFn(str(out), PolicyRef.of(pol), runtime)
    w.setup()
    stats += list(w.process(protected))
    merged = RunStats.merged(stats)
    f = out / merged.files[0].path
    assert not svc.read_parquet_wrapped_keys(str(f))  # this writer never saw the DEK ...
    (out / "manifest.json").write_text(json.dumps({"outputs": [x.to_json() for x in merged.files], "extra": merged.extra}))
    (out / "data").mkdir(exist_ok=True)
    for p in out.glob("*.parquet"):
        p.rename(out / "data" / p.name)
    [table] = reveal_tables(out, runtime.keys)
    want = batch.column(batch.schema.get_field_index("ssn"))
    assert table.column("ssn").combine_chunks().equals(want)  # ... the manifest carried it


def test_no_key_bytes_in_logs(customers_schema, runtime, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    pol = encrypt_policy(customers_schema, ssn="encrypt", email={"action": "encrypt", "deterministic": True})
    ctx = ActionContext(runtime)
    protect_batch(encrypt_batch(customers_schema, 20), pol, ctx)
    ks = with_reveal(ctx.keys)
    ks.rotate()
    for rec in ks.wrapped_keys_used():
        ks.rewrap_record(rec)
    text = caplog.text
    for secret in all_key_bytes(ks):
        assert secret.hex() not in text and kr.b64e(secret) not in text and repr(secret) not in text


def test_decrypt_table_restores_nested_encrypted_leaf(runtime):
    import json

    from cloakbeam.keys.cells import encrypt_column
    from cloakbeam.keys.decrypt import decrypt_table, encrypted_columns

    ks = with_reveal(open_key_service(runtime.keys))
    zips = pa.array(["12345", None, "99999"])
    cells = encrypt_column(zips, ks.data_key("customers", "address.zip"), dataset="customers", column="address.zip")
    meta = {b"cloakbeam.action": json.dumps({"action": "encrypt", "type": "string"}).encode()}
    address_t = pa.struct([pa.field("city", pa.string()), pa.field("zip", pa.binary(), metadata=meta)])
    address = pa.StructArray.from_arrays([pa.array(["A", "B", None]), cells], fields=list(address_t), mask=pa.array([False, False, True]))
    table = pa.table({"address": address}, schema=pa.schema([pa.field("address", address_t)], metadata={b"cloakbeam.dataset": b"customers"}))
    assert list(encrypted_columns(table.schema)) == ["address.zip"]
    out = decrypt_table(table, ks, ks.wrapped_keys_used())
    assert out.column("address").to_pylist() == [{"city": "A", "zip": "12345"}, {"city": "B", "zip": None}, None]
