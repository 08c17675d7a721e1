"""One error style everywhere (issue 13): a sentence naming field, file and line, never a value; no traceback
without --verbose; exit 2 for usage/configuration, 1 for runtime failures."""

from __future__ import annotations

import json

import pytest

from cloakbeam.cli.main import main
from cloakbeam.tests.paths import POLICY, SCHEMA


def _one_sentence(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("cloakbeam:")]
    assert "Traceback" not in err, err
    assert lines, err
    return lines[-1]


@pytest.mark.parametrize("log", ["/dev/null", "/dev/zero", "{tmp}"])
def test_an_unusable_audit_log_is_a_sentence(tmp_path, capsys, log):
    """The audit log is the reveal service's (its config's `audit.log`; callers have no `--log` to point it
    elsewhere): one that would swallow entries is refused at start with a sentence and exit 2."""
    import yaml

    log = log.format(tmp=tmp_path)  # a directory
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "state_dir": "state", "keys": {"path": "k.json"}, "reveal_keys": {"path": "r.json"}, "grants": "grants.yaml",
        "audit": {"log": log, "checkpoints": str(tmp_path / "worm" / "cp.jsonl")},
        "auth": {"issuer": "https://issuer.test", "audience": "cloakbeam", "public_key": "unused", "algorithms": ["EdDSA"]},
    }))
    code = main(["audit", "verify", "--service-config", str(cfg)])
    line = _one_sentence(capsys.readouterr().err)
    assert code == 2 and f"'audit.log' {log}" in line and "regular file" in line and "Traceback" not in line


def test_log_flags_are_gone_so_no_caller_can_redirect_the_audit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["decrypt", str(tmp_path), "--out", str(tmp_path / "d"), "--purpose", "p", "--log", "/dev/null"])
    assert exc.value.code == 2 and "unrecognized arguments: --log" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_without_verbose_and_a_traceback_with_it(tmp_path, capsys, monkeypatch):
    import cloakbeam.cli.run as run_cli

    def boom(args):
        raise RuntimeError("value 219-09-9999 leaked into a library message")

    monkeypatch.setattr(run_cli, "cmd_generate", boom)
    code = main(["generate", "--rows", "1", "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    line = _one_sentence(err)
    assert code == 1 and "RuntimeError" in line and "--verbose" in line and "219-09-9999" not in err
    with pytest.raises(RuntimeError):
        main(["--verbose", "generate", "--rows", "1", "--out", str(tmp_path / "x.jsonl")])


def test_an_unwritable_output_is_a_sentence(tmp_path, capsys, reference_inputs):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(blocker / "out")])
    line = _one_sentence(capsys.readouterr().err)
    assert code in (1, 2) and str(blocker) in line


def test_a_hostile_policy_is_a_sentence_with_the_line(tmp_path, capsys, reference_inputs):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY.read_text() + "\nfields:\n  ssn: keep\n")
    code = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(SCHEMA), "--policy", str(pol), "--output", str(tmp_path / "o")])
    line = _one_sentence(capsys.readouterr().err)
    assert code == 2 and "repeats the key 'fields'" in line and "line" in line


def test_a_schema_with_repeated_keys_or_deep_nesting_is_a_sentence(tmp_path, capsys, reference_inputs):
    sch = tmp_path / "s.avsc"
    sch.write_text('{"type": "record", "name": "X", "name": "Y", "fields": []}')
    code = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(sch), "--policy", str(POLICY), "--output", str(tmp_path / "o")])
    assert code == 2 and "repeats the key 'name'" in _one_sentence(capsys.readouterr().err)
    sch.write_text("[" * 100_000 + "]" * 100_000)
    code = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(sch), "--policy", str(POLICY), "--output", str(tmp_path / "o")])
    assert code == 2 and "nested too deeply" in _one_sentence(capsys.readouterr().err)


def test_the_quarantine_entry_names_reason_field_file_and_line_never_the_value(tmp_path, capsys):
    from cloakbeam.schemas.generate import generate

    src = tmp_path / "in.jsonl"
    generate(src, 1, seed=1, fmt="jsonl")
    rec = json.loads(src.read_text())
    rec.update(ssn="219-09-9999", income="lots")
    src.write_text(json.dumps(rec) + "\n")
    assert main(["run", "--dev", "--input", str(src), "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "o")]) == 0
    entries = [json.loads(l) for f in (tmp_path / "o" / "quarantine").iterdir() for l in f.read_text().splitlines()]
    assert [(e["reason"], e["field"], e["source"], e["location"]) for e in entries] == [("wrong_type", "income", str(src), "line 1")]
    assert "219-09-9999" not in json.dumps(entries)
