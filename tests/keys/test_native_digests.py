"""The native keyed-digest and token kernels: Wycheproof and RFC 4231 HMAC-SHA256 vectors, byte parity
with the Python reference definitions (keyed digests, tokens of every format, blind index), threads."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.keys import native
from cloakbeam.transforms.keyed import keyed_digests, keyed_digests_reference
from cloakbeam.vault.tokens import TokenFormat, Tokenizer, luhn_valid

VECTORS = Path(__file__).parents[1] / "vectors" / "wycheproof"
KEY = bytes(range(32))


@contextlib.contextmanager
def threads(n: int):
    prev = native.get_threads()
    native.set_threads(n)
    try:
        yield
    finally:
        native.set_threads(prev)


def test_wycheproof_hmac_sha256_native():
    doc = json.loads((VECTORS / "hmac_sha256_test.json").read_text())
    n = 0
    for group in doc["testGroups"]:
        for t in group["tests"]:
            key, msg, tag = (bytes.fromhex(t[k]) for k in ("key", "msg", "tag"))
            got = native.hmac_sha256(key, pa.array([msg], pa.binary()))[0].tobytes()[: len(tag)]
            assert (got == tag) == (t["result"] == "valid"), t["tcId"]
            n += 1
    assert n >= 150


def test_rfc4231_hmac_sha256_vectors_native():
    import cryptography_vectors

    text = (Path(cryptography_vectors.__file__).parent / "HMAC" / "rfc-4231-sha256.txt").read_text()
    cases, cur = [], {}
    for line in text.splitlines():
        if "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            cur[k] = v
            if k == "MD":
                cases.append(cur)
                cur = {}
    assert len(cases) >= 5
    for c in cases:
        key, msg = bytes.fromhex(c["Key"]), bytes.fromhex(c["Msg"])
        got = native.hmac_sha256(key, pa.array([msg], pa.binary()))[0].tobytes()
        assert got[: len(c["MD"]) // 2].hex() == c["MD"]


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=30), prefix=st.binary(max_size=70), key=st.binary(min_size=1, max_size=100))
def test_property_hmac_matches_hmac_module(values, prefix, key):
    out = native.hmac_sha256(key, pa.array(values, pa.string()), prefix=prefix)
    for v, d in zip(values, out):
        expected = b"\0" * 32 if v is None else hmac.new(key, prefix + v.encode(), hashlib.sha256).digest()
        assert d.tobytes() == expected


def test_hmac_over_types_slices_chunks_and_counters():
    base = pa.array([f"v{i}" if i % 5 else None for i in range(100)])
    for arr in (base.slice(7, 60), pa.chunked_array([base.slice(0, 30), base.slice(30)]), base.cast(pa.large_string()), base.cast(pa.binary())):
        vals = arr.to_pylist()
        out = native.hmac_sha256(KEY, arr)
        for v, d in zip(vals, out):
            assert d.tobytes() == (b"\0" * 32 if v is None else hmac.new(KEY, v if isinstance(v, bytes) else v.encode(), hashlib.sha256).digest())
    fsb = native.hmac_sha256_array(KEY, base)
    assert fsb.type == pa.binary(32) and fsb.null_count == base.null_count
    counters = np.arange(10, dtype=np.uint32) * 7
    vals = [f"x{i}" for i in range(10)]
    out = native.hmac_sha256(KEY, pa.array(vals), counters=counters)
    for v, c, d in zip(vals, counters.tolist(), out):
        assert d.tobytes() == hmac.new(KEY, c.to_bytes(4, "big") + v.encode(), hashlib.sha256).digest()
    ints = pa.array([1, 2, None], pa.int64())
    assert native.hmac_sha256(KEY, ints)[1].tobytes() == hmac.new(KEY, (2).to_bytes(8, "little"), hashlib.sha256).digest()


@pytest.mark.parametrize("how", ["text", "email", "digits", "exact"])
def test_keyed_digests_byte_identical_to_reference(how):
    col = pa.array(["  Ana  Díaz ", "ana díaz", None, "B@Example.org", "+1 (555) 010-2000", "", "ß", "Ana Díaz"] * 3)
    d, idx = keyed_digests(KEY, col, how)
    r, ridx = keyed_digests_reference(KEY, col, how)
    assert d.shape == r.shape and (d == r).all() and (idx == ridx).all()
    e, eidx = keyed_digests(KEY, pa.array([None, None], pa.string()), how)
    assert e.shape == (0, 32) and (eidx == -1).all()


FORMATS = [
    TokenFormat(),
    TokenFormat("opaque", prefix="c_"),
    TokenFormat("opaque", prefix=""),
    TokenFormat("digits"),
    TokenFormat("digits", keep_last=4),
    TokenFormat("digits", keep_last=4, luhn=True),
    TokenFormat("digits", luhn=True),
    TokenFormat("digits", keep_last=8, luhn=True),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.kind}-{f.prefix}-{f.keep_last}-{f.luhn}")
def test_tokens_byte_identical_to_reference(fmt):
    rng = np.random.default_rng(1)
    if fmt.kind == "digits":
        values = ["".join(map(str, rng.integers(0, 10, size=n))) for n in rng.integers(fmt.min_length(), 30, size=400)]
        values += ["0" * fmt.min_length(), "9" * 80]  # 80 digits: more than a 256-bit MAC has
    else:
        values = [f"user{i}@example.org" for i in range(400)] + ["", "ü", "x" * 300]
    tk = Tokenizer(KEY, fmt)
    counters = rng.integers(0, 50, size=len(values)).tolist()
    assert tk.tokens(values) == tk.reference_tokens(values)
    assert tk.tokens(values, counters) == tk.reference_tokens(values, counters)
    if fmt.luhn:
        assert all(luhn_valid(t) for t in tk.tokens(values))


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.text(alphabet="0123456789", min_size=1, max_size=25), max_size=20),
    keep=st.integers(min_value=0, max_value=8),
    luhn=st.booleans(),
    counter=st.integers(min_value=0, max_value=10_000),
)
def test_property_digit_tokens_match_reference(values, keep, luhn, counter):
    """Values the format accepts (the tokenize action quarantines the others before tokenizing)."""
    tk = Tokenizer(KEY, TokenFormat("digits", keep_last=keep, luhn=luhn))
    valid = [v for v in values if tk.fmt.valid_input(v)]
    assert tk.tokens(valid, [counter] * len(valid)) == tk.reference_tokens(valid, [counter] * len(valid))


def test_short_digit_formats_never_equal_their_value():
    # A 1-free-digit format collides with its own value for 1 in 10 values: the counter moves on.
    tk = Tokenizer(KEY, TokenFormat("digits", keep_last=1))
    values = [f"{i:02d}" for i in range(100)]
    toks = tk.tokens(values)
    assert toks == tk.reference_tokens(values) and all(t != v for t, v in zip(toks, values))


def test_non_ascii_digits_fall_back_to_the_reference():
    tk = Tokenizer(KEY, TokenFormat("digits"))
    assert tk.tokens(["١٢٣٤"]) == tk.reference_tokens(["١٢٣٤"])


def test_thread_count_does_not_change_digests_or_tokens():
    n = 3 * native.PARALLEL_MIN_CELLS + 5
    values = pa.array([f"subject-{i}" for i in range(n)])
    digits = pa.array([f"{i:016d}" for i in range(n)])
    res = []
    for t in (1, 2, 4):
        with threads(t):
            res.append(
                (
                    native.hmac_sha256(KEY, values).tobytes(),
                    Tokenizer(KEY, TokenFormat()).tokens_array(values),
                    Tokenizer(KEY, TokenFormat("digits", keep_last=4, luhn=True)).tokens_array(digits),
                )
            )
    for r in res[1:]:
        assert r[0] == res[0][0] and r[1].equals(res[0][1]) and r[2].equals(res[0][2])


def test_vault_blind_index_and_subject_ids_match_their_definitions(tmp_path):
    """Blind index = HMAC(vault/<domain>/index, value); subject key id = HMAC(vault/subject, subject):
    the values stored in existing vaults, now from one native call per batch."""
    from cloakbeam.keys.service import KeyRef, ensure_local_keyring, open_key_service
    from cloakbeam.vault import open_vault

    ensure_local_keyring(tmp_path / "keyring.json")
    ks = open_key_service(KeyRef(provider="local", path=str(tmp_path / "keyring.json")))
    vault = open_vault({"backend": "sqlite", "path": str(tmp_path / "v.sqlite")}, ks)
    values = ["a@example.org", "", "ü", "x" * 200]
    expected = [hmac.new(ks.prf_key("vault/email/index"), v.encode(), hashlib.sha256).digest() for v in values]
    assert vault.blind_index("email", values) == expected
    assert vault.subject_ref("cust-1") == hmac.new(ks.prf_key("vault/subject"), b"cust-1", hashlib.sha256).hexdigest()


def test_tokenizer_holds_key_but_never_shows_it():
    tk = Tokenizer(KEY, TokenFormat())
    assert KEY.hex() not in repr(tk) and repr(KEY) not in repr(tk)
    with pytest.raises(TypeError):
        __import__("pickle").dumps(tk)


def test_counters_must_align():
    with pytest.raises(ValueError):
        native.hmac_sha256(KEY, pa.array(["a", "b"]), counters=[1])
    assert native.hmac_list(KEY, []) == []
    assert native.hmac_list(KEY, ["a"]) == [hmac.new(KEY, b"a", hashlib.sha256).digest()]
