"""Token formats: known-answer vectors and properties that must hold for every input."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.vault.tokens import TokenFormat, Tokenizer, luhn_valid, normalize

KEY = bytes(range(32))


def test_opaque_known_answer() -> None:
    mac = hmac.new(KEY, (0).to_bytes(4, "big") + b"alice@example.org", hashlib.sha256).digest()
    expected = "tok_" + base64.b32encode(mac[:16]).decode().rstrip("=").lower()
    assert Tokenizer(KEY, TokenFormat()).tokens(["alice@example.org"]) == [expected]
    assert len(expected) == 4 + 26


def test_counter_changes_the_token_and_is_deterministic() -> None:
    tk = Tokenizer(KEY, TokenFormat("digits", keep_last=4, luhn=True))
    v = "4111111111111111"
    assert tk.token_at(v, 0) == tk.token_at(v, 0)
    assert tk.token_at(v, 0) != tk.token_at(v, 1)
    assert Tokenizer(bytes(32), tk.fmt).token_at(v, 0) != tk.token_at(v, 0)  # keyed


def test_luhn_reference_numbers() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=6, max_size=19), st.integers(0, 4), st.booleans(), st.integers(0, 5))
def test_digits_tokens_keep_shape(value: str, keep: int, luhn: bool, counter: int) -> None:
    fmt = TokenFormat("digits", keep_last=keep, luhn=luhn)
    tok = Tokenizer(KEY, fmt).token_at(value, counter)
    assert len(tok) == len(value) and tok.isdigit()
    if keep:
        assert tok[-keep:] == value[-keep:]
    if luhn:
        assert luhn_valid(tok)
    assert tok != value


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_opaque_tokens_are_prefix_and_base32(value: str) -> None:
    tok = Tokenizer(KEY, TokenFormat("opaque", prefix="c_")).tokens([value])[0]
    assert tok.startswith("c_") and len(tok) == 28
    assert set(tok[2:]) <= set("abcdefghijklmnopqrstuvwxyz234567")


def test_normalizers() -> None:
    assert normalize([" A@B.c "], "lower") == ["a@b.c"]
    assert normalize([" A "], "trim") == ["A"]
    assert normalize([" A "], "none") == [" A "]
    assert normalize(["4111-1111 1111-1111"], "digits") == ["4111111111111111"]
    with pytest.raises(ValueError):
        normalize(["x"], "upper")


def test_min_length_and_space() -> None:
    fmt = TokenFormat("digits", keep_last=4, luhn=True)
    assert fmt.min_length() == 6
    assert not fmt.valid_input("12345") and fmt.valid_input("123456")
    assert fmt.space(16) == 10**11
    assert TokenFormat().valid_input("")


def test_tokenizer_refuses_pickling() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Tokenizer(KEY, TokenFormat()))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=20), st.integers(0, 3))
def test_vectorized_base32_matches_reference_encoder(values: list[str], counter: int) -> None:
    fmt = TokenFormat("opaque", prefix="p_")
    tk = Tokenizer(KEY, fmt)
    expected = []
    for v in values:
        mac = hmac.new(KEY, counter.to_bytes(4, "big") + v.encode(), hashlib.sha256).digest()
        expected.append(fmt.render(mac, v))
    assert tk.tokens(values, [counter] * len(values)) == expected
    assert tk.tokens([]) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="0123456789", min_size=6, max_size=19), min_size=1, max_size=30), st.integers(0, 4), st.booleans())
def test_vectorized_digits_match_reference_renderer(values: list[str], keep: int, luhn: bool) -> None:
    fmt = TokenFormat("digits", keep_last=keep, luhn=luhn)
    tk = Tokenizer(KEY, fmt)
    expected = []
    for v in values:
        c = 0
        while True:
            tok = fmt.render(hmac.new(KEY, c.to_bytes(4, "big") + v.encode(), hashlib.sha256).digest(), v)
            if tok != v:
                break
            c += 1
        expected.append(tok)
    assert tk.tokens(values) == expected
