"""The vault on both backends (real SQLite file, real PostgreSQL server): convergence across processes,
idempotent replays, collision resolution, erasure, TTL, tamper detection, and no plaintext at rest."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cloakbeam.errors import ConfigError, IntegrityError
from cloakbeam.keys.service import open_key_service
from cloakbeam.tests.vault_fixtures import keyring, pg_dsn, pg_dump, pg_ref, service_keys, tokenize_worker  # noqa: F401
from cloakbeam.vault import Domain, TokenFormat, open_vault
from cloakbeam.vault.tokens import Tokenizer, luhn_valid

EMAIL = Domain("email", TokenFormat("opaque"), "lower")
CARD = Domain("card_number", TokenFormat("digits", keep_last=4, luhn=True), "digits")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], str | None]:
    """(name, vault reference, DSN or None) for each backend."""
    if request.param == "sqlite":
        return "sqlite", {"backend": "sqlite", "path": str(tmp_path / "vault.sqlite")}, None
    ref = request.getfixturevalue("pg_ref")
    return "postgres", ref, os.environ["CLOAKBEAM_VAULT_DSN"]


def _open(ref: dict[str, Any], keyring: Any) -> Any:
    """The vault as the reveal service opens it (pipeline keyring + reveal keyring)."""
    return open_vault(ref, service_keys(keyring))


def _emails(lo: int, hi: int) -> list[str]:
    return [f"person.{i:06d}@example.org" for i in range(lo, hi)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["opaque", "short-digits"])
def test_two_processes_converge_with_one_row_per_value(backend: Any, keyring: Any, fmt: str) -> None:
    name, ref, dsn = backend
    if fmt == "opaque":
        domain = {"name": "email", "fmt": {"kind": "opaque"}, "normalize": "lower"}
        a_vals, b_vals = _emails(0, 3000), _emails(1500, 4500)
    else:  # 6 digits, 2 kept: 10^4 tokens for 3000 values -> many collisions resolved concurrently
        domain = {"name": "acct", "fmt": {"kind": "digits", "keep_last": 2}, "normalize": "digits"}
        a_vals, b_vals = [f"{i:06d}" for i in range(0, 2000)], [f"{i:06d}" for i in range(1000, 3000)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=tokenize_worker, args=(keyring.path, ref, dsn, domain, [vals[i : i + 500] for i in range(0, len(vals), 500)], barrier, out))
        for vals in (a_vals, b_vals[::-1])  # opposite orders to maximise interleaving
    ]
    for p in procs:
        p.start()
    import queue
    import time

    results: list[dict[str, str]] = []
    deadline = time.monotonic() + 600
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=2))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a worker died (exit code {dead[0]}): {[r['__error__'] for r in results if '__error__' in r]}"
            assert time.monotonic() < deadline, "workers did not finish in 600 s"
    errors = [r["__error__"] for r in results if "__error__" in r]
    assert not errors, errors[0]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a, b = results
    overlap = set(a) & set(b)
    assert len(overlap) == len(set(a_vals) & set(b_vals))
    assert all(a[v] == b[v] for v in overlap)
    merged = {**a, **b}
    assert len(set(merged.values())) == len(merged), "one token for two values"
    vault = _open(ref, keyring)
    assert vault.count(domain["name"]) == len(merged)
    # Every token reverses to its own value.
    toks = list(merged.values())
    revealed = vault.reveal(domain["name"], toks)
    assert [v for _, v in revealed] == [v for v in merged]


def test_replayed_bundle_after_failure_adds_no_rows(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    bundle = _emails(0, 200)
    vault = _open(ref, keyring)
    first = vault.tokenize(EMAIL, bundle[:120])
    # Simulated failure in the middle of the next bundle's write: the transaction rolls back.
    real = vault.backend.insert_entries
    calls = {"n": 0}

    def boom(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        real(*args, **kwargs)
        raise RuntimeError("worker lost")

    vault.backend.insert_entries = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        vault.tokenize(EMAIL, bundle)
    vault.backend.insert_entries = real  # type: ignore[method-assign]
    assert calls["n"] == 1
    assert vault.count("email") == 120  # the failed write left nothing behind
    vault.close()
    # The retried bundle runs on a fresh worker (empty cache), twice.
    for _ in range(2):
        retry = _open(ref, keyring)
        tokens = retry.tokenize(EMAIL, bundle)
        assert tokens[:120] == first
        assert retry.count("email") == 200
        retry.close()
    again = _open(ref, keyring).tokenize(EMAIL, bundle)
    assert again == tokens


def _colliding_pair(keyring: Any, domain: Domain) -> tuple[str, str]:
    tk = Tokenizer(open_key_service(keyring).prf_key(f"tokenize/{domain.name}"), domain.fmt)
    seen: dict[str, str] = {}
    for i in range(10_000):
        v = f"{i:04d}"
        t = tk.tokens([v])[0]
        if t in seen:
            return seen[t], v
        seen[t] = v
    raise AssertionError("no collision found")


def test_forced_collision_is_resolved_and_both_values_reverse(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    short = Domain("pin", TokenFormat("digits", keep_last=1, luhn=True), "digits")  # 100 tokens per length
    x, y = _colliding_pair(keyring, short)
    vault = _open(ref, keyring)
    tx = vault.tokenize(short, [x])[0]
    ty = vault.tokenize(short, [y])[0]
    assert tx != ty
    for t, v in ((tx, x), (ty, y)):
        assert len(t) == 4 and t[-1] == v[-1] and luhn_valid(t)
    assert vault.reveal("pin", [tx, ty]) == [("ok", x), ("ok", y)]
    # Deterministic thereafter: a fresh worker gets the same tokens, in either order, in one batch.
    other = _open(ref, keyring)
    assert other.tokenize(short, [y, x]) == [ty, tx]
    assert other.count("pin") == 2


def test_collision_inside_one_batch(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    short = Domain("pin2", TokenFormat("digits"), "digits")
    # 90 values into 100 two-digit tokens: heavy collisions, every one resolved. (100 into 100 is not always
    # solvable: a token never equals its own value, so the last free token can be the last value itself.)
    vals = [f"{i:02d}" for i in range(90)]
    vault = _open(ref, keyring)
    toks = vault.tokenize(short, vals)
    assert len(set(toks)) == 90 and all(t != v for t, v in zip(toks, vals))
    assert [v for _, v in vault.reveal("pin2", toks)] == vals


def test_forget_value_and_subject(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    vault = _open(ref, keyring)
    mails = _emails(0, 4)
    toks = vault.tokenize(EMAIL, mails, subjects=["c1", "c1", "c2", None])
    cards = vault.tokenize(CARD, ["4111111111111111"], subjects=["c1"])
    assert vault.forget_subject("c1") == 3
    assert [s for s, _ in vault.reveal("email", toks)] == ["forgotten", "forgotten", "ok", "ok"]
    assert vault.reveal("card_number", cards) == [("forgotten", None)]
    assert vault.forget_value("email", "  PERSON.000003@example.org ") == 1  # normalized like at tokenize time
    assert [s for s, _ in vault.reveal("email", toks)] == ["forgotten", "forgotten", "ok", "forgotten"]
    # The value coming back later gets a new token; the forgotten token stays irreversible.
    fresh = _open(ref, keyring)
    new = fresh.tokenize(EMAIL, [mails[0]])[0]
    assert new != toks[0]
    assert fresh.reveal("email", [toks[0], new]) == [("forgotten", None), ("ok", mails[0])]
    assert fresh.forget_subject("nobody") == 0


def test_expired_token_does_not_detokenize(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    vault = _open(ref, keyring)
    dom = Domain("session", TokenFormat("opaque"), "trim", ttl_seconds=3600)
    tok = vault.tokenize(dom, ["abc"])[0]
    import time

    assert vault.reveal("session", [tok], now=time.time() + 3500) == [("ok", "abc")]
    assert vault.reveal("session", [tok], now=time.time() + 3700) == [("expired", None)]


def test_domain_settings_cannot_change(backend: Any, keyring: Any) -> None:
    _, ref, _ = backend
    vault = _open(ref, keyring)
    vault.tokenize(EMAIL, ["a@b.c"])
    with pytest.raises(ConfigError, match="different format"):
        _open(ref, keyring).tokenize(Domain("email", TokenFormat("opaque", prefix="e_"), "lower"), ["a@b.c"])


def test_tampered_row_is_detected(backend: Any, keyring: Any) -> None:
    name, ref, dsn = backend
    vault = _open(ref, keyring)
    t1, t2 = vault.tokenize(EMAIL, ["one@x.org", "two@x.org"])
    # Move the second ciphertext into the first row: that row now holds another value's ciphertext.
    sql_get = "SELECT ciphertext FROM cloakbeam_vault_entries WHERE token = {p}"
    sql_set = "UPDATE cloakbeam_vault_entries SET ciphertext = {p} WHERE token = {p}"
    if name == "sqlite":
        con = sqlite3.connect(ref["path"], isolation_level=None)
        c2 = con.execute(sql_get.format(p="?"), (t2,)).fetchone()[0]
        con.execute(sql_set.format(p="?"), (c2, t1))
        con.close()
    else:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as con:
            c2 = con.execute(sql_get.format(p="%s"), (t2,)).fetchone()[0]
            con.execute(sql_set.format(p="%s"), (c2, t1))
    with pytest.raises(IntegrityError, match="tampered") as exc:
        _open(ref, keyring).reveal("email", [t1])
    assert "x.org" not in str(exc.value)


def test_wrong_keyring_cannot_read(backend: Any, keyring: Any, tmp_path: Path) -> None:
    from cloakbeam.errors import KeyAccessError
    from cloakbeam.keys.service import KeyRef, ensure_local_keyring

    _, ref, _ = backend
    tok = _open(ref, keyring).tokenize(EMAIL, ["z@x.org"])[0]
    other = tmp_path / "other.json"
    ensure_local_keyring(other)
    with pytest.raises(KeyAccessError):
        _open(ref, KeyRef(path=str(other))).reveal("email", [tok])


def test_no_plaintext_at_rest(backend: Any, keyring: Any, tmp_path: Path) -> None:
    name, ref, dsn = backend
    vault = _open(ref, keyring)
    mails = _emails(0, 300)
    cards = [f"4{i:014d}" for i in range(300)]
    vault.tokenize(EMAIL, mails, subjects=[f"cust-{i}" for i in range(300)])
    vault.tokenize(CARD, [c + "7" for c in cards])
    vault.forget_subject("cust-7")
    if name == "sqlite":
        vault.close()
        blobs = b"".join(p.read_bytes() for p in tmp_path.glob("vault.sqlite*"))
    else:
        blobs = pg_dump(dsn)
    assert len(blobs) > 10_000
    assert b"cloakbeam_vault_entries" in blobs or name == "sqlite"
    for raw in mails + [c + "7" for c in cards] + [f"cust-{i}" for i in range(300)]:
        assert raw.encode() not in blobs, "a raw value is stored in plaintext"
    # Even their most distinctive halves are absent.
    assert b"@example.org" not in blobs


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 999), min_size=1, max_size=80, unique=True), st.integers(0, 2))
def test_short_digit_tokens_are_unique_and_reversible_for_any_value_set(tmp_path_factory: Any, keyring: Any, nums: list[int], split: int) -> None:
    """For every set of 3-digit values (2 free digits + kept last digit: heavy collisions), in any batching,
    tokens are distinct, keep the last digit, and reverse to their own values."""
    ref = {"backend": "sqlite", "path": str(tmp_path_factory.mktemp("prop") / "v.sqlite")}
    dom = Domain("tiny", TokenFormat("digits", keep_last=1), "digits")
    vals = [f"{n:03d}" for n in nums]
    vault = _open(ref, keyring)
    cut = len(vals) * split // 3
    toks = vault.tokenize(dom, vals[:cut]) + vault.tokenize(dom, vals[cut:])
    assert len(set(toks)) == len(vals)
    assert all(t[-1] == v[-1] and t != v for t, v in zip(toks, vals))
    assert [v for _, v in vault.reveal("tiny", toks)] == vals
    assert _open(ref, keyring).tokenize(dom, vals[::-1]) == toks[::-1]


def test_vault_and_reference_rules(tmp_path: Path, keyring: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    vault = _open({"backend": "sqlite", "path": str(tmp_path / "v.sqlite")}, keyring)
    with pytest.raises(TypeError, match="cannot be pickled|pickle"):
        pickle.dumps(vault)
    with pytest.raises(ConfigError, match="must not contain a DSN"):
        _open({"backend": "postgres", "dsn": "postgresql://u:secret@h/db"}, keyring)
    monkeypatch.delenv("CLOAKBEAM_VAULT_DSN", raising=False)
    with pytest.raises(ConfigError, match="CLOAKBEAM_VAULT_DSN, which is not set"):
        _open({"backend": "postgres"}, keyring)
    with pytest.raises(ConfigError, match="needs a 'path'"):
        _open({"backend": "sqlite"}, keyring)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(ConfigError, match="cannot open SQLite vault"):
        _open({"backend": "sqlite", "path": str(tmp_path / "junk.sqlite")}, keyring)
    from cloakbeam.errors import CloakbeamError

    with pytest.raises(CloakbeamError, match="does not exist"):
        vault.reveal("never-used", ["tok_x"])


def test_forget_expired(backend: Any, keyring: Any) -> None:
    import time

    _, ref, _ = backend
    vault = _open(ref, keyring)
    short = Domain("otp", TokenFormat("opaque"), "trim", ttl_seconds=60)
    forever = Domain("email", TokenFormat("opaque"), "lower")
    t_short = vault.tokenize(short, ["a", "b"], subjects=["s1", None])
    t_long = vault.tokenize(forever, ["a@x.org"], subjects=["s1"])  # shares s1's key with "a"
    assert vault.forget_expired(now=time.time() + 30) == 0
    assert vault.forget_expired(domain="email", now=time.time() + 120) == 0
    assert vault.forget_expired(now=time.time() + 120) == 2
    assert [s for s, _ in vault.reveal("otp", t_short)] == ["forgotten", "forgotten"]
    assert vault.reveal("email", t_long) == [("ok", "a@x.org")]  # the shared subject key survived
    assert vault.backend.count_keys() == 1
    assert vault.forget_expired(now=time.time() + 120) == 0


def test_fields_of_one_subject_share_its_key_without_reading_it_back(backend: Any, keyring: Any) -> None:
    """Email and card of a customer use the key the customer's first field made in this process: no second key
    insert, no read-back and unwrap; every token still reveals, and forgetting the subject reaches them all."""
    _, ref, _ = backend
    vault = _open(ref, keyring)
    subjects = [f"c{i}" for i in range(50)]
    calls: dict[str, list[int]] = {"insert_keys": [], "get_keys": []}
    for name in calls:
        real = getattr(vault.backend, name)

        def spy(rows: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name].append(len(rows))
            return _real(rows)

        setattr(vault.backend, name, spy)
    mails = vault.tokenize(EMAIL, _emails(0, 50), subjects=subjects)
    cards = vault.tokenize(CARD, [f"41111111111{i:05d}" for i in range(50)], subjects=subjects)
    assert calls["insert_keys"] == [50]  # the card domain made no key: it reused the 50 subject keys
    assert calls["get_keys"] == []
    assert [s for s, _ in vault.reveal("email", mails)] == ["ok"] * 50
    assert [v for _, v in vault.reveal("card_number", cards)] == [f"41111111111{i:05d}" for i in range(50)]
    assert vault.forget_subject("c7") == 2
    assert vault.reveal("email", [mails[7]]) == [("forgotten", None)] and vault.reveal("card_number", [cards[7]]) == [("forgotten", None)]
    # after a forget the subject's key is made anew (the cache is gone), and the new entry reveals
    again = vault.tokenize(CARD, ["4111111111199999"], subjects=["c7"])
    assert calls["insert_keys"][-1] == 1 and vault.reveal("card_number", again) == [("ok", "4111111111199999")]


def test_a_rolled_back_write_leaves_no_reused_subject_key(backend: Any, keyring: Any) -> None:
    """Keys are reused only once their rows are committed: a write that rolls back after inserting its key rows
    must not leave them in the cache, or the next field would write entries whose key row does not exist."""
    _, ref, _ = backend
    vault = _open(ref, keyring)
    real = vault.backend.insert_entries

    def boom(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise RuntimeError("worker lost")

    vault.backend.insert_entries = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        vault.tokenize(EMAIL, _emails(0, 10), subjects=[f"s{i}" for i in range(10)])
    vault.backend.insert_entries = real  # type: ignore[method-assign]
    cards = vault.tokenize(CARD, [f"41111111111{i:05d}" for i in range(10)], subjects=[f"s{i}" for i in range(10)])
    assert [v for _, v in vault.reveal("card_number", cards)] == [f"41111111111{i:05d}" for i in range(10)]
