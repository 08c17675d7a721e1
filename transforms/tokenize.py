"""`tokenize`: replace each value with a convergent token and keep token -> value (encrypted) in the vault.

    customer_id: {action: tokenize, format: opaque}                       # tok_<26 base32 chars>
    email:       {action: tokenize, normalize: lower}
    card_number: {action: tokenize, format: digits, keep_last: 4, luhn: true}
    phone:       {action: tokenize, subject: customer_id, ttl_days: 365}   # shredded with the customer

Parameters: `format` opaque|digits; `domain` (token space and key; default the field path; fields that share a
domain share tokens, so joins keep working); `prefix` (opaque only); `keep_last` and `luhn` (digits only);
`normalize` none|trim|lower|digits (default trim, digits for the digits format) - the vault stores and
detokenization returns the normalized value; `ttl_days` (tokens stop detokenizing after this); `subject`
(path of an input field naming the data subject, may be the field itself; entries of one subject share a data key so
`cloakbeam vault forget --subject` shreds them together); `salt: subject` (opaque format, needs `subject`): each
subject's tokens are salted with a random per-subject salt kept in the vault, so after `vault forget --subject`
nobody (not even a keyring holder who guesses the value) can recompute the token and link old rows to the value;
the price is that equal values of different subjects get different tokens (no joins across subjects).

The action works on whole columns: it dictionary-encodes the column, tokenizes each distinct value once
(the vault caches confirmed tokens per worker), and `take`s the tokens back into place. Nulls stay null.
It never logs a value or puts one in an error; a value that cannot be tokenized (digits format, too few
digits) fails the batch with the field name and row index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.errors import ConfigError
from cloakbeam.transforms.registry import Action, ActionContext, Param, register
from cloakbeam.vault.store import Domain
from cloakbeam.vault.tokens import NORMALIZERS, TokenFormat, normalize_array


def _domain_name(v: Any) -> str | None:
    if not v or not all(c.isalnum() or c in "._-" for c in v):
        return "must be a name of letters, digits, '.', '_' or '-'"
    return None


def _prefix(v: Any) -> str | None:
    if len(v) > 16 or not all(c.isalnum() or c in "_-:" for c in v):
        return "must be at most 16 letters, digits, '_', '-' or ':'"
    return None


def _keep_last(v: Any) -> str | None:
    return None if 0 <= v <= 8 else "must be between 0 and 8"


def _ttl(v: Any) -> str | None:
    return None if v > 0 else "must be a positive number of days"


def _is_text_or_int(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


@register
class Tokenize(Action):
    """Convergent, vault-backed tokenization (reversible only through `cloakbeam vault detokenize`)."""

    name = "tokenize"
    accepts = (_is_text_or_int,)
    requires = frozenset({"vault", "keys"})
    params = {
        "format": Param(str, default="opaque", choices=("opaque", "digits"), doc="token shape"),
        "domain": Param(str, check=_domain_name, doc="token domain (default: the field path)"),
        "prefix": Param(str, check=_prefix, doc="opaque tokens start with this (default 'tok_')"),
        "keep_last": Param(int, check=_keep_last, doc="digits format: keep this many trailing digits"),
        "luhn": Param(bool, doc="digits format: token passes the Luhn check"),
        "normalize": Param(str, choices=NORMALIZERS, doc="normalization before tokenizing"),
        "ttl_days": Param((int, float), check=_ttl, doc="tokens stop detokenizing after this many days"),
        "subject": Param(str, doc="linked field naming the data subject (erasure unit)"),
        "salt": Param(str, choices=("subject",), doc="salt tokens per subject (erasure of linkage; no joins across subjects)"),
    }

    def configure(self) -> None:
        o = self.options
        kind = o["format"]
        if kind == "opaque":
            for p in ("keep_last", "luhn"):
                if o[p] is not None:
                    raise self.fail(f"parameter '{p}' applies to 'format: digits' only")
        else:
            if o["prefix"] is not None:
                raise self.fail("parameter 'prefix' applies to 'format: opaque' only")
            if o["normalize"] not in (None, "digits"):
                raise self.fail("'format: digits' tokenizes digits only; leave 'normalize' out or set it to digits")
        o["domain"] = o["domain"] or self.field.path
        o["normalize"] = o["normalize"] or ("digits" if kind == "digits" else "trim")
        fmt = TokenFormat(
            kind=kind, prefix=o["prefix"] or "tok_", keep_last=o["keep_last"] or 0, luhn=bool(o["luhn"])
        )
        ttl = max(1, round(o["ttl_days"] * 86400)) if o["ttl_days"] else None
        if o["salt"] is not None:
            if kind != "opaque":
                raise self.fail("'salt: subject' works with 'format: opaque' only (a salted digits token would change length)")
            if o["subject"] is None:
                raise self.fail("'salt: subject' needs 'subject: FIELD' naming the data subject")
        self.domain = Domain(o["domain"], fmt, o["normalize"], ttl, salted=o["salt"] is not None)

    def check_schema(self, schema: Any) -> None:
        """The subject field must be a leaf of the input schema (called by the policy compiler)."""
        subject = self.options["subject"]
        if subject is not None and (subject not in schema.fields or schema.fields[subject].is_record):
            raise self.fail(f"subject field '{subject}' is not a leaf field of the schema; name the field holding the subject id")

    def output_type(self) -> pa.DataType:
        return pa.string()

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        path = self.field.path
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_integer(column.type):
            column = pc.cast(column, pa.string())
        if len(column) == 0 or column.null_count == len(column):
            return pa.nulls(len(column), pa.string())
        if self.domain.salted:
            column = self._salted(column, columns, ctx)
        enc = pc.dictionary_encode(column)
        indices = enc.indices
        norm = normalize_array(enc.dictionary, self.domain.normalize)
        fmt = self.domain.fmt
        # Distinct normalized values (two raw spellings may normalize to one value), in order of first
        # appearance, with Arrow kernels: no Python object per dictionary entry.
        ok = np.flatnonzero(fmt.valid_mask(norm))
        accepted = pc.dictionary_encode(norm.take(pa.array(ok, pa.int64())))
        dict_to_slot = np.full(len(norm), -1, dtype=np.int64)
        dict_to_slot[ok] = accepted.indices.to_numpy(zero_copy_only=False)
        invalid = dict_to_slot < 0
        if invalid.any():
            # Values the format cannot tokenize (too few digits) leave the output and go to the quarantine.
            row_invalid = pc.fill_null(pc.take(pa.array(invalid), indices), False).to_numpy(zero_copy_only=False)
            ctx.reject_rows(row_invalid, "invalid_value", path)
            ctx.count(f"tokenize.{path}.invalid", int(row_invalid.sum()))
        distinct = accepted.dictionary.to_pylist()  # the vault's API (cache, rows) is per value
        subjects = self._subjects(indices, dict_to_slot, len(distinct), columns) if self.options["subject"] else None
        tokens = pa.array(ctx.vault.tokenize(self.domain, distinct, subjects), pa.string())
        dict_tokens = tokens.take(pa.array(dict_to_slot, mask=invalid))
        ctx.count(f"tokenize.{path}.values", len(column) - column.null_count)
        ctx.count(f"tokenize.{path}.distinct", len(distinct))
        return pc.take(dict_tokens, indices)

    def _salted(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        """salt(subject) hex || separator || normalized value, per row; rows without a subject are rejected."""
        from cloakbeam.vault.store import SALT_SEPARATOR

        enc = pc.dictionary_encode(column)
        norm = pc.take(normalize_array(enc.dictionary, self.domain.normalize), enc.indices)
        subj = self._subject_column(columns)
        senc = pc.dictionary_encode(pc.utf8_trim_whitespace(subj))
        names = senc.dictionary.to_pylist()
        salts = ctx.vault.subject_salts(names) if names else []
        salt_hex = pa.array([s.hex() if n else None for s, n in zip(salts, names)], pa.string())
        salted = pc.binary_join_element_wise(pc.take(salt_hex, senc.indices), norm, SALT_SEPARATOR)
        missing = pc.and_(pc.is_valid(column), pc.is_null(salted)).to_numpy(zero_copy_only=False)
        if missing.any():
            ctx.reject_rows(missing, "missing_subject", self.field.path)
        return salted

    def _subject_column(self, columns: Mapping[str, pa.Array]) -> pa.Array:
        name = self.options["subject"]
        if name not in columns:
            raise ConfigError(f"field '{self.field.path}' (action 'tokenize'): subject field '{name}' is not in the input")
        subj = columns[name]
        if isinstance(subj, pa.ChunkedArray):
            subj = subj.combine_chunks()
        if not (pa.types.is_string(subj.type) or pa.types.is_large_string(subj.type)):
            subj = pc.cast(subj, pa.string())
        return subj

    def _subjects(self, indices: pa.Array, dict_to_slot: np.ndarray, n: int, columns: Mapping[str, pa.Array]) -> list[str | None]:
        """Subject id of each distinct value: the subject field at the value's first row in this batch."""
        subj = self._subject_column(columns)
        idx = indices.to_numpy(zero_copy_only=False)
        valid = ~np.asarray(indices.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.nonzero(valid)[0]
        rows = rows[dict_to_slot[idx[rows].astype(np.int64)] >= 0]  # rejected values have no slot
        slots = dict_to_slot[idx[rows].astype(np.int64)]
        uniq, first = np.unique(slots, return_index=True)
        out: list[str | None] = [None] * n
        picked = subj.take(pa.array(rows[first])).to_pylist()
        for s, v in zip(uniq.tolist(), picked):
            out[s] = v.strip() if isinstance(v, str) and v.strip() else None
        return out
