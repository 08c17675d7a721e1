"""Convergent token formats: a keyed PRF (HMAC-SHA256) over the normalized value, rendered as a token.

The same (domain key, normalized value, counter) always gives the same token, on every worker, run and retry,
without reading the vault. `counter` is 0 for almost every value; the vault raises it, deterministically, only
when a short format collides with a token that already belongs to another value.

Formats:
- `opaque`: `<prefix><base32 of 128 PRF bits>` (26 lower-case base32 characters after the prefix).
- `digits`: as many digits as the normalized value has; optionally keeps the last `keep_last` digits; with
  `luhn` the whole token passes the Luhn check (for card numbers). A token never equals its own value.

Tokens are computed by the native kernel (`cloakbeam.keys.native.render_tokens`: HMAC and rendering in one
pass over an Arrow array); `Tokenizer.reference_tokens` is the Python definition the tests hold it to, and
serves the inputs the kernel leaves to it. Nothing here stores, logs or raises with a value in the message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.keys import native

NORMALIZERS = ("none", "trim", "lower", "digits")
_B32 = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz234567", dtype=np.uint8)
_NP_DOUBLE = np.array([0, 2, 4, 6, 8, 1, 3, 5, 7, 9], dtype=np.int64)
_NP_UNDOUBLE = np.argsort(_NP_DOUBLE)  # digit whose doubled Luhn contribution is the index

# Luhn: the digit that, doubled, contributes d' to the sum (doubling table and its inverse).
_DOUBLE = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]


def normalize(values: Sequence[str] | pa.Array, how: str) -> list[str]:
    """Normalize values before the PRF: none | trim (strip whitespace) | lower (trim + lower-case) | digits
    (ASCII digits only). Vectorized with Arrow compute; the tokenize action and forget/lookup by value both
    call this, so a value is always normalized the same way."""
    return normalize_array(values, how).to_pylist()


def normalize_array(values: Sequence[str] | pa.Array, how: str) -> pa.Array:
    """`normalize` as an Arrow array (for callers that stay columnar)."""
    if how not in NORMALIZERS:
        raise ValueError(f"unknown normalization '{how}'")
    arr = values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())
    if how in ("trim", "lower"):
        arr = pc.utf8_trim_whitespace(arr)
    if how == "lower":
        arr = pc.utf8_lower(arr)
    if how == "digits":
        arr = pc.replace_substring_regex(arr, pattern="[^0-9]", replacement="")
    return arr


def luhn_valid(digits: str) -> bool:
    """True when the digit string passes the Luhn (mod 10) check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLE[d] if i % 2 else d
    return total % 10 == 0


def _luhn_fix(digits: list[int], pos: int) -> None:
    """Set digits[pos] so that the whole list passes the Luhn check (a solution always exists)."""
    n = len(digits)
    total = 0
    for i, d in enumerate(digits):
        if i == pos:
            continue
        total += _DOUBLE[d] if (n - 1 - i) % 2 else d
    need = (-total) % 10
    doubled = (n - 1 - pos) % 2 == 1
    digits[pos] = _DOUBLE.index(need) if doubled else need


@dataclass(frozen=True)
class TokenFormat:
    """How a PRF output becomes a token. Immutable and picklable (no key inside)."""

    kind: str = "opaque"  # opaque | digits
    prefix: str = "tok_"
    keep_last: int = 0
    luhn: bool = False

    def min_length(self) -> int:
        """Shortest normalized value this format can tokenize (digits formats need free digits)."""
        if self.kind == "opaque":
            return 1
        return self.keep_last + (2 if self.luhn else 1)

    def valid_input(self, value: str) -> bool:
        if self.kind == "opaque":
            return True
        return len(value) >= self.min_length() and value.isdigit()

    def valid_mask(self, values: pa.Array) -> np.ndarray:
        """`valid_input` of every (normalized, non-null) value at once, as a boolean numpy array.
        For digit formats: at least `min_length()` ASCII digits and nothing else."""
        if self.kind == "opaque":
            return np.ones(len(values), dtype=bool)
        ok = pc.and_(pc.greater_equal(pc.utf8_length(values), self.min_length()), pc.match_substring_regex(values, "^[0-9]+$"))
        return pc.fill_null(ok, False).to_numpy(zero_copy_only=False)

    def space(self, length: int) -> int:
        """Number of distinct tokens for a value of `length` characters (collision probability scale)."""
        if self.kind == "opaque":
            return 2**128
        free = length - self.keep_last - (1 if self.luhn else 0)
        return 10 ** max(free, 0)

    def render(self, mac: bytes, value: str) -> str:
        if self.kind == "opaque":
            return self.prefix + base64.b32encode(mac[:16]).decode().rstrip("=").lower()
        n = len(value)
        free = n - self.keep_last
        num = int.from_bytes(mac, "big")
        head = [int(c) for c in str(num % 10**free).zfill(free)]
        digits = head + [ord(c) - 48 for c in value[free:]]
        if self.luhn:
            _luhn_fix(digits, free - 1)
        return "".join(map(str, digits))


def _render_digits(fmt: TokenFormat, macs: Sequence[bytes], values: Sequence[str]) -> list[str]:
    """`fmt.render` for many digit tokens at once: the Luhn digit is solved with numpy per token length.
    Same output as `render` (tested); the per-value part is one big-int modulo and one string concat."""
    keep = fmt.keep_last
    heads = []
    for mac, v in zip(macs, values):
        free = len(v) - keep
        heads.append(str(int.from_bytes(mac, "big") % 10**free).zfill(free) + v[free:])
    if not fmt.luhn:
        return heads
    out = list(heads)
    by_len: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        by_len.setdefault(len(h), []).append(i)
    for length, idx in by_len.items():
        arr = (np.frombuffer("".join(heads[i] for i in idx).encode(), dtype=np.uint8).reshape(len(idx), length) - 48).astype(np.int64)
        pos = length - keep - 1
        doubled = (length - 1 - np.arange(length)) % 2 == 1
        contrib = np.where(doubled, _NP_DOUBLE[arr], arr)
        contrib[:, pos] = 0
        need = (-contrib.sum(axis=1)) % 10
        arr[:, pos] = _NP_UNDOUBLE[need] if doubled[pos] else need
        text = (arr + 48).astype(np.uint8).tobytes().decode("ascii")
        for k, i in enumerate(idx):
            out[i] = text[k * length : (k + 1) * length]
    return out


class Tokenizer:
    """Token computation for one domain: holds the domain's PRF key (not picklable)."""

    def __init__(self, key: bytes, fmt: TokenFormat) -> None:
        self.fmt = fmt
        self._key = key
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __reduce__(self):  # noqa: D105
        raise TypeError("Tokenizer holds key material and cannot be pickled")

    def __repr__(self) -> str:
        return f"Tokenizer(fmt={self.fmt!r})"

    def tokens(self, values: Sequence[str] | pa.Array, counters: Sequence[int] | None = None) -> list[str]:
        """Tokens of already-normalized values (a list of str, aligned with `counters`)."""
        if not len(values):
            return []
        return self.tokens_array(values, counters).to_pylist()

    def tokens_array(self, values: Sequence[str] | pa.Array, counters: Sequence[int] | None = None) -> pa.StringArray:
        """Tokens as a string array, from the native kernel (HMAC and rendering in one pass over the
        values). Inputs only the reference defines (digit formats given non-digits or too few digits,
        nulls) go through `reference_tokens`; both give the same bytes (tested)."""
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(list(values), pa.string())
        if len(arr) == 0:
            return pa.array([], pa.string())
        fmt = self.fmt
        try:
            return native.render_tokens(
                self._key, arr, digits=fmt.kind == "digits", prefix=fmt.prefix.encode(), keep_last=fmt.keep_last, luhn=fmt.luhn, counters=counters
            )
        except native.TokensRefused:
            return pa.array(self.reference_tokens(arr.to_pylist(), counters), pa.string())

    def reference_tokens(self, values: Sequence[str], counters: Sequence[int] | None = None) -> list[str]:
        """The reference definition of the token formats: per value HMAC with a precomputed key state."""
        base = self._mac
        fmt = self.fmt
        if fmt.kind == "opaque":
            return self._opaque(values, counters)
        cs = list(counters) if counters is not None else [0] * len(values)
        out: list[str] = [""] * len(values)
        todo = list(range(len(values)))
        while todo:
            macs = []
            for i in todo:
                m = base.copy()
                m.update(cs[i].to_bytes(4, "big"))
                m.update(values[i].encode())
                macs.append(m.digest())
            nxt = []
            for i, tok in zip(todo, _render_digits(fmt, macs, [values[i] for i in todo])):
                if tok == values[i]:  # a token never equals its own value (possible for very short formats)
                    cs[i] += 1
                    nxt.append(i)
                else:
                    out[i] = tok
            todo = nxt
        return out

    def _opaque(self, values: Sequence[str], counters: Sequence[int] | None) -> list[str]:
        """Opaque tokens: per-value HMAC, then base32 of all 128-bit MACs at once with numpy (RFC 4648
        alphabet, lower case, unpadded: 26 characters, the last one carrying 3 bits + 2 zero bits)."""
        base = self._mac
        macs = []
        for i, v in enumerate(values):
            m = base.copy()
            m.update((counters[i] if counters is not None else 0).to_bytes(4, "big"))
            m.update(v.encode())
            macs.append(m.digest()[:16])
        n = len(macs)
        if n == 0:
            return []
        bits = np.unpackbits(np.frombuffer(b"".join(macs), dtype=np.uint8).reshape(n, 16), axis=1)
        bits = np.concatenate([bits, np.zeros((n, 2), dtype=np.uint8)], axis=1).reshape(n, 26, 5)
        idx = bits @ np.array([16, 8, 4, 2, 1], dtype=np.uint8)
        text = _B32[idx].tobytes().decode("ascii")
        prefix = self.fmt.prefix
        return [prefix + text[26 * i : 26 * i + 26] for i in range(n)]

    def token_at(self, value: str, counter: int) -> str:
        """The token of `value` at `counter`, skipping counters whose token would equal the value."""
        return self.tokens([value], [counter])[0]
