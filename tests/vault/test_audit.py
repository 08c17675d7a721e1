"""Audit log: chain verification and every tamper case (removed, edited, reordered, inserted, truncated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloakbeam.errors import IntegrityError
from cloakbeam.vault.audit import GENESIS, AuditLog

KEY = b"k" * 32


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    for i in range(n):
        log.append("detokenize", role="analyst", purpose="support", domain="email", subject=f"tok_{i}", outcome="allowed", count=1)
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def test_intact_chain(tmp_path: Path) -> None:
    log = _log(tmp_path)
    assert log.verify() == 5
    entries = list(log.entries())
    assert entries[0]["prev"] == GENESIS and entries[1]["prev"] == entries[0]["mac"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert AuditLog(tmp_path / "none.jsonl", KEY).verify() == 0


def test_removed_entry(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    log.path.write_text("".join(lines[:2] + lines[3:]))
    with pytest.raises(IntegrityError, match="entry 3"):
        log.verify()


def test_edited_entry(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    e = json.loads(lines[1])
    e["outcome"] = "denied"
    lines[1] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    log.path.write_text("".join(lines))
    with pytest.raises(IntegrityError, match="entry 2 was edited"):
        log.verify()


def test_reordered_entries(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    log.path.write_text("".join(lines))
    with pytest.raises(IntegrityError, match="entry 3"):
        log.verify()


def test_truncated_tail_and_missing_head(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    log.path.write_text("".join(lines[:-1]))
    with pytest.raises(IntegrityError, match="head file records entry 5"):
        log.verify()
    log.path.write_text("".join(lines))
    log.verify()
    log.head_path.unlink()
    with pytest.raises(IntegrityError, match="head file"):
        log.verify()


def test_whole_log_deleted(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        log.verify()


def test_rewritten_chain_without_key_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    forged = AuditLog(tmp_path / "forged.jsonl", b"x" * 32)  # attacker without the audit key
    lines = _lines(log)
    forged.path.write_text("".join(lines))
    with pytest.raises(IntegrityError, match="entry 1 was edited"):
        forged.verify()
    # A keyless (sha256) chain is refused by a keyed verifier (no downgrade).
    plain = AuditLog(tmp_path / "plain.jsonl")
    plain.append("forget", role="r", purpose="p", domain="d", outcome="forgotten")
    assert plain.verify() == 1
    with pytest.raises(IntegrityError, match="uses 'sha256'"):
        AuditLog(plain.path, KEY).verify()


def test_garbage_line(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    with open(log.path, "a") as fh:
        fh.write("not json\n")
    with pytest.raises(IntegrityError, match="entry 3 is not valid JSON"):
        log.verify()


def test_bad_outcome_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "a.jsonl", KEY).append("detokenize", role="r", purpose="p", domain="d", outcome="maybe")


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path / "c.jsonl"), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert AuditLog(tmp_path / "c.jsonl", KEY).verify() == 120


def _append_many(path: str, n: int) -> None:
    log = AuditLog(path, KEY)
    for _ in range(n):
        log.append("decrypt", role="r", purpose="p", domain="d", outcome="allowed")
