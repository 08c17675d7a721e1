"""End to end through run_pipeline and the CLI: signed manifest, verify, decrypt (role-checked), tamper,
rotate -> rewrap -> decrypt, retired-version refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.cli.main import main
from cloakbeam.errors import AccessDenied, IntegrityError
from cloakbeam.keys.decrypt import encrypted_columns
from cloakbeam.keys.service import KeyRef, collect_wrapped_keys, open_key_service
from cloakbeam.keys.signing import verify_output
from cloakbeam.tests.conftest import POLICY, SCHEMA
from cloakbeam.vault.reveal import decrypt_output

ROLES = """
version: 1
roles:
  privacy-officer:
    - {action: decrypt, domains: [ssn], purposes: [dsar]}
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
    manifest = run_pipeline(RunSettings(inputs=[source["path"]], schema=str(SCHEMA), policy=str(POLICY), output=str(out), batch_size=150, progress=False))
    (state / "roles.yaml").write_text(ROLES)
    return {"out": out, "state": state, "manifest": manifest, "ref": KeyRef(path=str(state / "keyring.json"))}


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
    assert collect_wrapped_keys(str(out), run["manifest"])  # wrapped DEKs travel with the output
    assert main(["verify", str(out)]) == 0


def test_cli_decrypt_round_trips_for_authorized_role(run, source, capsys):
    dest = run["out"].parent / "plain"
    rc = main(["decrypt", str(run["out"]), "--out", str(dest), "--role", "privacy-officer", "--purpose", "dsar"])
    assert rc == 0
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
    ks = open_key_service(run["ref"])
    from cloakbeam.vault.roles import RolePolicy

    roles = RolePolicy.from_dict(__import__("yaml").safe_load(ROLES))
    with pytest.raises(AccessDenied, match="role 'analyst' may not decrypt domain 'ssn'"):
        list(decrypt_output(run["out"], ks, role="analyst", purpose="dsar", roles=roles))
    with pytest.raises(AccessDenied):
        list(decrypt_output(run["out"], ks, role="privacy-officer", purpose="marketing", roles=roles))
    rc = main(["decrypt", str(run["out"]), "--out", str(run["out"].parent / "x"), "--role", "analyst", "--purpose", "dsar"])
    assert rc == 1
    audit = [json.loads(x) for x in (run["state"] / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["outcome"] == "denied"


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
    ks = open_key_service(run["ref"])
    from cloakbeam.vault.roles import RolePolicy

    roles = RolePolicy.from_dict(__import__("yaml").safe_load(ROLES))
    with pytest.raises(IntegrityError) as ei:
        list(decrypt_output(run["out"], ks, role="privacy-officer", purpose="dsar", roles=roles))
    msg = str(ei.value)
    assert f.name in msg and "column 'ssn', row 5" in msg
    assert any(f.name in p for p in verify_output(run["out"]))


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
    assert main(["verify", str(out)]) == 1
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
    assert main(["verify", str(out)]) == 1  # the CLI pins to the state dir's keyring by default


def test_rotate_rewrap_decrypt_and_retired_version_refused(run, capsys):
    out, state = run["out"], run["state"]
    before = sorted((out / "data").rglob("*.parquet"))
    cells_before = {f.name: pq.read_table(f).column("ssn").to_pylist() for f in before}
    assert main(["keys", "rotate"]) == 0
    # Retiring v1 before rewrapping would strand this output: decrypt must then fail with a clear message.
    snapshot = (state / "keyring.json").read_bytes()
    assert main(["keys", "retire", "1"]) == 0
    from cloakbeam.keys import service as svc

    svc._PROCESS.clear()
    rc = main(["decrypt", str(out), "--out", str(out.parent / "p0"), "--role", "privacy-officer", "--purpose", "dsar"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "version 1 is retired" in err and "rewrap" in err
    # Undo (restore the keyring backup), rewrap, then retire: decrypt works under v2 only.
    (state / "keyring.json").write_bytes(snapshot)
    os.chmod(state / "keyring.json", 0o600)
    svc._PROCESS.clear()
    assert main(["keys", "rewrap", str(out)]) == 0
    assert verify_output(out) == []  # footers rewritten, manifest hashes updated and re-signed
    after = {f.name: pq.read_table(f).column("ssn").to_pylist() for f in sorted((out / "data").rglob("*.parquet"))}
    assert after == cells_before  # cells untouched
    man = json.loads((out / "manifest.json").read_text())
    assert {r["kek_version"] for r in collect_wrapped_keys(str(out), man)} == {"2"}
    assert main(["keys", "retire", "1"]) == 0
    svc._PROCESS.clear()
    rc = main(["decrypt", str(out), "--out", str(out.parent / "p1"), "--role", "privacy-officer", "--purpose", "dsar"])
    assert rc == 0
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "v1\tretired" in listing and "v2\tactive" in listing


def test_wrong_keyring_gives_clear_message(run, tmp_path, monkeypatch, capsys):
    from cloakbeam.keys import service as svc

    other = tmp_path / "other-state"
    assert main(["keys", "init", "--protect", "dev", "--state-dir", str(other)]) == 0
    (other / "roles.yaml").write_text(ROLES)
    svc._PROCESS.clear()
    rc = main(["decrypt", str(run["out"]), "--out", str(tmp_path / "p"), "--role", "privacy-officer", "--purpose", "dsar", "--state-dir", str(other)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "failed to unwrap" in err and "wrong keyring" in err


def test_cli_opens_quarantine_for_authorized_role_only(run, capsys):
    import base64

    roles = run["state"] / "roles.yaml"
    roles.write_text(ROLES + "  steward:\n    - {action: decrypt, domains: [quarantine], purposes: [data-quality]}\n")
    dest = run["out"].parent / "q"
    assert main(["decrypt", str(run["out"]), "--quarantine", "--out", str(dest), "--role", "privacy-officer", "--purpose", "dsar"]) == 1
    assert main(["decrypt", str(run["out"]), "--quarantine", "--out", str(dest), "--role", "steward", "--purpose", "data-quality"]) == 0
    lines = (dest / "quarantine.jsonl").read_text().splitlines()
    sealed = sum(1 for q in (run["out"] / "quarantine").rglob("*.jsonl") for x in q.read_text().splitlines() if x.strip())
    assert len(lines) == sealed > 0
    first = json.loads(lines[0])
    assert "record_sealed" not in first and base64.b64decode(first["record_base64"])
    assert oct((dest / "quarantine.jsonl").stat().st_mode & 0o777) == "0o600"
