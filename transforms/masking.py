"""The `mask` action: irreversible, format-aware masking of whole Arrow columns with `pyarrow.compute`.

Methods (policy `method:`):
- `redact`: every value becomes null, or the constant `value`.
- `partial`: keep `keep_first` / `keep_last` characters, replace the rest with `char`; a value too short to
  keep anything hidden is masked entirely.
- `email`: keep the domain: `****@example.com`.
- `phone`: keep the last `keep_last` digits (default 2) of the number (an extension is dropped).
- `ip`: truncate to a network: /`v4_prefix` (default 24) for IPv4, /`v6_prefix` (default 48) for IPv6.
- `date_shift`: move dates/timestamps by a per-subject offset in [-max_days, max_days] (never 0), the same for
  every row of one subject on every worker and run: an HMAC of the `subject` field's value under
  `ctx.keys.prf_key("mask/date_shift/<domain>")`.

Values that do not parse for the method (an e-mail without `@`, an IP that is no address) become null and are
counted as `mask.<field>.unparsed`; they are never passed through. Nothing here logs or raises with a value.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.transforms.keyed import digest_words, keyed_digests
from cloakbeam.transforms.registry import Action, ActionContext, Param, register

_METHODS = ("redact", "partial", "email", "phone", "ip", "date_shift")
_STRING_METHODS = {"partial", "email", "phone", "ip"}
_METHOD_PARAMS = {
    "redact": {"value"},
    "partial": {"keep_first", "keep_last", "char"},
    "email": {"char"},
    "phone": {"keep_last", "char"},
    "ip": {"v4_prefix", "v6_prefix"},
    "date_shift": {"subject", "max_days", "domain"},
}


def _non_negative(v: int) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _one_char(v: str) -> str | None:
    return None if len(v) == 1 else "must be exactly one character"


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_date(t) or pa.types.is_timestamp(t)


def _prefix_mask(bits: int) -> np.ndarray:
    """16 bytes with the first `bits` bits set (an IPv6 netmask)."""
    return np.packbits(np.arange(128) < bits)


def _as_string(column: pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


@register
class Mask(Action):
    """Mask a column in place; the output keeps the column (string methods return strings)."""

    name = "mask"
    params = {
        "method": Param(str, required=True, choices=_METHODS, doc="how to mask"),
        "value": Param((str, int, float), doc="redact: constant instead of null"),
        "keep_first": Param(int, check=_non_negative, doc="partial: characters kept at the start"),
        "keep_last": Param(int, check=_non_negative, doc="partial: characters kept at the end; phone: digits kept"),
        "char": Param(str, default="*", check=_one_char, doc="mask character"),
        "v4_prefix": Param(int, default=24, check=lambda v: None if 0 <= v <= 32 else "must be between 0 and 32"),
        "v6_prefix": Param(int, default=48, check=lambda v: None if 0 <= v <= 128 else "must be between 0 and 128"),
        "subject": Param(str, doc="date_shift: field whose value selects the offset (e.g. customer_id)"),
        "max_days": Param(int, default=30, check=lambda v: None if 1 <= v <= 3650 else "must be between 1 and 3650"),
        "domain": Param(str, default="default", doc="date_shift: offsets are shared by fields with the same domain"),
    }

    def configure(self) -> None:
        method = self.options["method"]
        given = {k for k, spec in self.params.items() if k != "method" and self.options[k] is not None and self.options[k] != spec.default}
        stray = sorted(given - _METHOD_PARAMS[method])
        if stray:
            raise self.fail(f"parameter '{stray[0]}' does not apply to method '{method}'; remove it")
        t = self.field.arrow_type
        if method in _STRING_METHODS and not _is_string(t):
            raise self.fail(f"method '{method}' needs a string field, not {t}; use method 'redact' or another action")
        if method == "date_shift":
            if not _is_temporal(t):
                raise self.fail(f"method 'date_shift' needs a date or timestamp field, not {t}")
            if not self.options["subject"]:
                raise self.fail("method 'date_shift' needs 'subject: <field>' naming whose offset to use")
        if method == "redact" and self.options["value"] is not None:
            try:
                pa.scalar(self.options["value"]).cast(t)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise self.fail(f"constant 'value' cannot be stored in a {t} field; give a value of that type") from None
        if method == "partial" and self.options["keep_first"] is None and self.options["keep_last"] is None:
            self.options["keep_last"] = 4
        if method == "phone" and self.options["keep_last"] is None:
            self.options["keep_last"] = 2
        if method == "phone" and self.options["keep_last"] > 4:
            raise self.fail("method 'phone' keeps at most 4 digits; lower 'keep_last'")

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]  # per instance, from the parameters
        return frozenset({"keys"}) if self.options["method"] == "date_shift" else frozenset()

    def linked_fields(self) -> list[str]:
        """Other input fields this action reads (checked against the schema when the policy compiles)."""
        return [self.options["subject"]] if self.options["method"] == "date_shift" else []

    def output_type(self) -> pa.DataType | None:
        if self.options["method"] in _STRING_METHODS:
            return pa.string()
        return self.field.arrow_type

    def describe(self) -> dict[str, Any]:
        keep = _METHOD_PARAMS[self.options["method"]] | {"method"}
        return {"action": self.name, **{k: v for k, v in self.options.items() if k in keep and v is not None}}

    # -- run time -----------------------------------------------------------------------------------
    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        method = self.options["method"]
        out = getattr(self, "_" + method)(column, columns, ctx)
        unparsed = out.null_count - column.null_count
        if method != "redact" and unparsed > 0:
            ctx.count(f"mask.{self.field.path}.unparsed", unparsed)
        return out

    def _redact(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        value = self.options["value"]
        if value is None:
            return pa.nulls(len(column), type=self.field.arrow_type)
        # A constant for every row, null rows included: the output must not reveal which values were missing.
        return pa.repeat(pa.scalar(value).cast(self.field.arrow_type), len(column))

    def _partial(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        s = _as_string(column)
        first, last, char = self.options["keep_first"] or 0, self.options["keep_last"] or 0, self.options["char"]
        n = pc.utf8_length(s)
        empty = pa.repeat(pa.scalar("", pa.string()), len(s))
        prefix = pc.utf8_slice_codeunits(s, 0, first) if first else empty
        suffix = pc.utf8_slice_codeunits(s, -last) if last else empty
        mid = pc.max_element_wise(pc.subtract(n, first + last), 0)
        chars = pa.repeat(pa.scalar(char, pa.string()), len(s))
        joined = pc.binary_join_element_wise(prefix, pc.binary_repeat(chars, mid), suffix, "")
        # Too short to keep anything hidden: mask every character.
        short = pc.less_equal(n, first + last)
        return pc.if_else(short, pc.binary_repeat(chars, n), joined)

    def _email(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        s = pc.utf8_trim_whitespace(_as_string(column))
        dom = pc.struct_field(pc.extract_regex(s, r"^[^@\s]+@(?P<d>[A-Za-z0-9.-]+\.[A-Za-z]{2,})$"), "d")
        return pc.binary_join_element_wise(self.options["char"] * 4 + "@", pc.utf8_lower(dom), "")

    def _phone(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        s = _as_string(column)
        main = pc.replace_substring_regex(s, r"(?i)\s*(x|ext\.?)\s*[0-9]+\s*$", "")
        digits = pc.replace_substring_regex(main, r"[^0-9]", "")
        n = pc.utf8_length(digits)
        keep = self.options["keep_last"]
        tail = pc.utf8_slice_codeunits(digits, -keep) if keep else pc.utf8_slice_codeunits(digits, 0, 0)
        chars = pa.repeat(pa.scalar(self.options["char"], pa.string()), len(s))
        masked = pc.binary_join_element_wise(pc.binary_repeat(chars, pc.max_element_wise(pc.subtract(n, keep), 0)), tail, "")
        # Fewer than 7 digits is not a phone number: null rather than a partial leak.
        return pc.if_else(pc.greater_equal(n, 7), masked, pa.scalar(None, pa.string()))

    def _ip(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        s = pc.utf8_trim_whitespace(_as_string(column))
        v4 = pc.extract_regex(s, r"^(?P<a>[0-9]{1,3})\.(?P<b>[0-9]{1,3})\.(?P<c>[0-9]{1,3})\.(?P<d>[0-9]{1,3})$")
        is_v4 = pc.fill_null(pc.is_valid(v4), False).to_numpy(zero_copy_only=False)
        octets = [
            pc.cast(pc.fill_null(pc.struct_field(v4, k), "0"), pa.int64()).to_numpy(zero_copy_only=False) for k in "abcd"
        ]
        in_range = np.logical_and.reduce([o <= 255 for o in octets])
        number = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
        bits = self.options["v4_prefix"]
        net = number & ((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF)
        parts = [pa.array(((net >> sh) & 0xFF).astype(np.int64)).cast(pa.string()) for sh in (24, 16, 8, 0)]
        v4_out = pc.binary_join_element_wise(*parts, ".")
        ok4 = is_v4 & in_range
        out = pc.if_else(pa.array(ok4), v4_out, pa.scalar(None, pa.string()))
        # IPv6: compressed forms (`::`, embedded IPv4) need a real parser, so the C socket functions parse and
        # print the rows that are not IPv4 and contain ':' (per value, but only on that subset); the prefix mask
        # itself is applied to a numpy byte matrix.
        v6_rows = np.flatnonzero(~is_v4 & pc.fill_null(pc.match_substring(s, ":"), False).to_numpy(zero_copy_only=False))
        if len(v6_rows):
            vals = s.take(pa.array(v6_rows)).to_pylist()
            packed = bytearray(16 * len(vals))
            ok6 = np.zeros(len(vals), dtype=bool)
            for j, v in enumerate(vals):
                try:
                    packed[16 * j : 16 * j + 16] = socket.inet_pton(socket.AF_INET6, v)
                    ok6[j] = True
                except (OSError, ValueError):
                    pass
            mat = np.frombuffer(bytes(packed), dtype=np.uint8).reshape(-1, 16) & _prefix_mask(self.options["v6_prefix"])
            flat = mat.tobytes()
            res = [socket.inet_ntop(socket.AF_INET6, flat[16 * j : 16 * j + 16]) if ok6[j] else None for j in range(len(vals))]
            mask = np.zeros(len(s), dtype=bool)
            mask[v6_rows] = True
            out = pc.replace_with_mask(out, pa.array(mask), pa.array(res, type=pa.string()))
        return out

    def _date_shift(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        subject = columns.get(self.options["subject"])
        if subject is None:  # the compiler checks the path; this is a wiring error, never a data error
            raise RuntimeError(f"field '{self.field.path}': subject field '{self.options['subject']}' is not in the batch")
        key = ctx.keys.prf_key(f"mask/date_shift/{self.options['domain']}")
        digests, row = keyed_digests(key, subject, how="exact")
        n_days = self.options["max_days"]
        if len(digests):
            r = (digest_words(digests)[:, 0] % np.uint32(2 * n_days)).astype(np.int64)
            per_subject = np.where(r < n_days, r - n_days, r - n_days + 1)  # [-N, -1] ∪ [1, N]; never 0
            offsets = per_subject[np.maximum(row, 0)]
        else:
            offsets = np.zeros(len(row), dtype=np.int64)
        # No subject means no consistent offset: the date is withheld rather than left unshifted.
        valid = (row >= 0) & pc.is_valid(column).to_numpy(zero_copy_only=False)
        t = column.type
        if pa.types.is_date32(t):
            base, scale = pc.cast(column, pa.int32()), 1
        elif pa.types.is_date64(t):
            base, scale = pc.cast(column, pa.int64()), 86_400_000
        else:
            per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
            base, scale = pc.cast(column, pa.int64()), 86_400 * per_second
        values = pc.fill_null(base, 0).to_numpy(zero_copy_only=False).astype(np.int64) + offsets * scale
        storage = pa.array(values, mask=~valid, type=pa.int32() if pa.types.is_date32(t) else pa.int64())
        return storage.cast(t)
