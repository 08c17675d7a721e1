"""End to end through run_pipeline and the CLI: signed manifest, pinned verify, decrypt through the reveal logic
(--dev, grants from the state dir, audited), tamper, KEK rotation independent of sealed data keys, rewrap needing
the reveal keyring, wrong keyring."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.cli.main import main
from cloakbeam.errors import IntegrityError
from cloakbeam.keys.decrypt import encrypted_columns
from cloakbeam.keys.service import KeyRef, collect_wrapped_keys, open_key_service
from cloakbeam.keys.signing import verify_output
from cloakbeam.tests.conftest import POLICY, SCHEMA
from cloakbeam.tests.keys_fixtures import reveal_tables

ROLES = """
version: 1
roles:
  privacy-officer:
    - {action: decrypt, domains: [ssn], purposes: [dsar]}
    - {action: decrypt, domains: [ssn], purposes: [marketing], valid_until: 2020-01-01T00:00:00Z}
  analyst:
    - {action: detokenize, domains: ["*"], purposes: ["*"]}
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from cloakbeam.schemas.generate import generate

    d = tmp_path_factory.mktemp("src")
    return generate(d / "customers.jsonl", 400, seed=11, fmt="jsonl", dirty=0.02)


@pytest.fixture()
def run(tmp_path, source, monkeypatch):
    """One pipeline run of the reference policy (ssn: encrypt) into tmp_path/out with its own state dir."""
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline

    state = tmp_path / "state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state))
    out = tmp_path / "out"
    manifest = run_pipeline(RunSettings(dev=True, inputs=[source["path"]], schema=str(SCHEMA), policy=str(POLICY), output=str(out), batch_size=150, progress=False))
    (state / "roles.yaml").write_text(ROLES)
    pub = json.loads((state / "keyring.json").read_text())["signing_public_key"]
    return {"out": out, "state": state, "manifest": manifest, "ref": KeyRef(path=str(state / "keyring.json")), "pub": pub,
            "vault": {"backend": "sqlite", "path": str(state / "vault.sqlite")}}


def _decrypt(run, dest, role="privacy-officer", purpose="dsar", *extra):
    return main(["decrypt", str(run["out"]), "--out", str(dest), "--dev", "--role", role, "--purpose", purpose, "--public-key", run["pub"], *extra])


def _source_ssns(source) -> dict[str, str]:
    out = {}
    for line in Path(source["path"]).read_bytes().splitlines():
        try:
            rec = json.loads(line)
            out[rec["customer_id"]] = rec["ssn"]
        except Exception:
            continue
    return out


def test_run_output_is_encrypted_signed_and_verifies(run):
    out = run["out"]
    assert (out / "manifest.json.sig").exists()
    assert verify_output(out) == []
    files = sorted((out / "data").rglob("*.parquet"))
    assert files
    schema = pq.read_schema(files[0])
    assert schema.field("ssn").type == pa.binary() and "ssn" in encrypted_columns(schema)
    assert collect_wrapped_keys(str(out), run["manifest"])  # sealed DEKs (quarantine) travel with the output
    assert main(["verify", str(out), "--public-key", run["pub"]]) == 0


def test_cli_decrypt_round_trips_for_authorized_role(run, source, capsys):
    dest = run["out"].parent / "plain"
    assert _decrypt(run, dest) == 0
    files = sorted(dest.rglob("*.parquet"))
    assert files and oct(dest.stat().st_mode & 0o777) == "0o700"
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.field("ssn").type == pa.string()
    # every decrypted ssn is one of the source ssns (customer_id is dropped by the policy, so compare sets)
    from cloakbeam.schemas.generate import _pools, generate_table

    want = set(generate_table(400, seed=11, start=0, pools=_pools(11)).column("ssn").to_pylist())
    got = set(table.column("ssn").to_pylist())
    assert got and got <= want
    audit = [json.loads(x) for x in (run["state"] / "audit.jsonl").read_text().splitlines()]
    assert {e["outcome"] for e in audit} == {"allowed"} and all(e["domain"] == "ssn" for e in audit)


def test_decrypt_denied_for_other_role_or_purpose(run):
    assert _decrypt(run, run["out"].parent / "x", "analyst") == 1
    assert _decrypt(run, run["out"].parent / "y", "privacy-officer", "marketing") == 1
    assert not (run["out"].parent / "x").exists()
    audit = [json.loads(x) for x in (run["state"] / "audit.jsonl").read_text().splitlines()]
    assert [e["outcome"] for e in audit] == ["denied", "denied"] and audit[0]["role"] == "analyst"


def _flip_cell(f: Path, row: int) -> None:
    t = pq.read_table(f)
    i = t.schema.get_field_index("ssn")
    cells = t.column("ssn").to_pylist()
    b = bytearray(cells[row])
    b[-3] ^= 0x40
    cells[row] = bytes(b)
    t = t.set_column(i, t.schema.field(i), pa.array(cells, pa.binary()))
    pq.write_table(t, f)


def test_tampered_cell_names_file_column_and_row(run):
    f = sorted((run["out"] / "data").rglob("*.parquet"))[0]
    _flip_cell(f, 5)
    with pytest.raises(IntegrityError) as ei:
        reveal_tables(run["out"], run["ref"], run["vault"])
    assert "column 'ssn', row 5" in str(ei.value)
    assert any(f.name in p for p in verify_output(run["out"]))
    assert _decrypt(run, run["out"].parent / "t") == 1  # the CLI refuses before decrypting: verification fails


@pytest.mark.parametrize("target", ["data", "manifest", "quarantine", "signature"])
def test_verify_names_what_changed_after_any_byte_flip(run, target, capsys):
    out = run["out"]
    if target == "data":
        f = sorted((out / "data").rglob("*.parquet"))[0]
    elif target == "quarantine":
        qs = sorted((out / "quarantine").rglob("*"))
        qs = [q for q in qs if q.is_file()]
        assert qs, "the dirty input should have produced quarantine entries"
        f = qs[0]
    elif target == "signature":
        f = out / "manifest.json.sig"
    else:
        f = out / "manifest.json"
    data = bytearray(f.read_bytes())
    positions = sorted({0, len(data) - 1, *range(0, len(data), max(1, len(data) // 40))})
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        f.write_bytes(bytes(flipped))
        problems = verify_output(out)
        named = "manifest.json" if target == "signature" else f.name  # a bad signature file condemns the manifest
        assert problems and any(named in p for p in problems), (pos, problems)
    f.write_bytes(bytes(data))
    assert verify_output(out) == []
    f.write_bytes(bytes(data[:-1]))
    assert main(["verify", str(out), "--public-key", run["pub"]]) == 1
    assert ("manifest.json" if target == "signature" else f.name) in capsys.readouterr().err


def test_verify_detects_extra_file_and_foreign_signer(run, tmp_path):
    out = run["out"]
    shutil.copy(sorted((out / "data").rglob("*.parquet"))[0], out / "data" / "part-extra.parquet")
    assert any("part-extra.parquet" in p and "not listed" in p for p in verify_output(out))
    os.unlink(out / "data" / "part-extra.parquet")
    # Re-signed by someone else's key: verify pinned to the keyring refuses it.
    from cloakbeam.keys.signing import sign_manifest
    from cloakbeam.tests.keys_fixtures import open_dev

    sign_manifest(out / "manifest.json", open_dev(tmp_path / "mallory"))
    assert verify_output(out) == []  # unpinned: valid signature by *a* key
    pinned = open_key_service(run["ref"]).signing_public_key()
    from cloakbeam.keys.signing import public_key_bytes

    assert any("not by the expected key" in p for p in verify_output(out, public_key_bytes(pinned)))
    assert main(["verify", str(out)]) == 2  # the CLI refuses to check a signature against no pinned key
    assert main(["verify", str(out), "--public-key", str(run["state"] / "keyring.json")]) == 1


def test_kek_rotation_does_not_touch_sealed_keys_and_rewrap_needs_the_reveal_keyring(run, capsys):
    out, state = run["out"], run["state"]
    before = {f.name: pq.read_table(f).column("ssn").to_pylist() for f in sorted((out / "data").rglob("*.parquet"))}
    assert main(["keys", "rotate"]) == 0  # re-wraps the root under v2
    assert main(["keys", "retire", "1"]) == 0
    from cloakbeam.keys import service as svc

    svc._PROCESS.clear()
    # sealed data keys never depended on the pipeline KEK: the output still decrypts
    assert _decrypt(run, out.parent / "p0") == 0
    # rewrap of sealed keys is a reveal-keyring operation: refused with the pipeline keyring alone
    capsys.readouterr()
    assert main(["keys", "rewrap", str(out)]) == 1
    assert "only the reveal service holds" in capsys.readouterr().err
    reveal = str(state / "reveal-keyring.json")
    assert main(["keys", "rewrap", str(out), "--reveal-keyring", reveal]) == 0
    assert "rewrapped 0 of" in capsys.readouterr().out  # already sealed to the newest reveal key version
    assert verify_output(out) == []
    after = {f.name: pq.read_table(f).column("ssn").to_pylist() for f in sorted((out / "data").rglob("*.parquet"))}
    assert after == before  # cells untouched
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "v1\tretired" in listing and "v2\tactive" in listing


def test_wrong_keyring_gives_clear_message(run, tmp_path, monkeypatch, capsys):
    from cloakbeam.keys import service as svc

    other = tmp_path / "other-state"
    assert main(["keys", "init", "--protect", "dev", "--state-dir", str(other)]) == 0
    (other / "roles.yaml").write_text(ROLES)
    svc._PROCESS.clear()
    capsys.readouterr()
    rc = main(["decrypt", str(run["out"]), "--out", str(tmp_path / "p"), "--dev", "--role", "privacy-officer", "--purpose", "dsar",
               "--state-dir", str(other), "--public-key", run["pub"]])
    assert rc == 1
    err = capsys.readouterr().err
    assert "wrong vault" in err  # neither a wrong keyring nor a wrong vault looks like an erased subject


def test_cli_opens_quarantine_for_authorized_role_only(run, capsys):
    import base64

    roles = run["state"] / "roles.yaml"
    roles.write_text(ROLES + "  steward:\n    - {action: decrypt, domains: [quarantine], purposes: [data-quality]}\n")
    dest = run["out"].parent / "q"
    assert _decrypt(run, dest, "privacy-officer", "dsar", "--quarantine") == 1
    assert _decrypt(run, dest, "steward", "data-quality", "--quarantine") == 0
    lines = (dest / "quarantine.jsonl").read_text().splitlines()
    sealed = sum(1 for q in (run["out"] / "quarantine").rglob("*.jsonl") for x in q.read_text().splitlines() if x.strip())
    assert len(lines) == sealed > 0
    first = json.loads(lines[0])
    assert "record_sealed" not in first and base64.b64decode(first["record_base64"])
    assert oct((dest / "quarantine.jsonl").stat().st_mode & 0o777) == "0o600"
