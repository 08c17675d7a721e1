"""The `encrypt` action: AES-256-GCM (or AES-256-SIV when `deterministic: true`) per cell, whole columns at once.

    ssn: encrypt                                  # random nonces: equal values give unrelated cells
    customer_id: {action: encrypt, deterministic: true}   # AES-SIV: equal values give equal cells (joinable;
                                                          # this REVEALS which rows share a value)
    notes: {action: encrypt, key: pii-high}       # seal this column's data keys to reveal key 'pii-high'
    ssn: {action: encrypt, subject: customer_id}  # per-subject keys held in the vault: `vault forget --subject`
                                                  # makes the subject's cells unreadable in every output

Random mode seals the column's data keys to the reveal key (keys/sealing.py): the pipeline cannot decrypt its own
output. Deterministic mode derives its key from the pipeline's root (equal values must give equal cells), so the
pipeline keyring CAN decrypt deterministic columns; use it only where a join needs it.

The output column is `binary` in the cell format of `cloakbeam.keys.cells` (version byte, key id, nonce,
ciphertext, tag) with the column path, key id and dataset id bound as associated data. Nulls stay null.
Data keys come from `ctx.keys.data_key(...)` (cached per worker process; see keys/service.py). Imports
nothing from Beam and never puts a value or key byte in an error or counter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from cloakbeam.keys.cells import encrypt_column, encrypt_column_keyed, is_supported_type
from cloakbeam.keys.service import DEFAULT_KEK
from cloakbeam.transforms.registry import Action, ActionContext, Param, register

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_key_name(value: Any) -> str | None:
    return None if _KEY_NAME.match(value) else "must be a key name of letters, digits, '.', '_' or '-' (at most 64)"


@register
class Encrypt(Action):
    """Encrypt each cell; authorized users recover values with `cloakbeam decrypt`."""

    name = "encrypt"
    params = {
        "deterministic": Param(bool, default=False, doc="AES-SIV: equal plaintexts give equal cells (reveals equality)"),
        "key": Param(str, default=DEFAULT_KEK, check=_check_key_name, doc="name of the reveal key this column's data keys are sealed to"),
        "subject": Param(str, doc="input field naming the data subject: per-subject keys in the vault (erasure reaches outputs)"),
    }
    accepts = (is_supported_type,)
    requires = frozenset({"keys"})

    def configure(self) -> None:
        if self.options["subject"] is not None:
            if self.options["deterministic"]:
                raise self.fail("'subject' needs random mode: per-subject keys cannot be deterministic; drop 'deterministic: true'")
            self.requires = frozenset({"keys", "vault"})  # type: ignore[misc]  # per instance: only subject-linked columns need the vault

    def check_schema(self, schema: Any) -> None:
        """The subject field must be a string or integer leaf of the input schema (called by the compiler)."""
        subject = self.options["subject"]
        if subject is None:
            return
        info = schema.fields.get(subject)
        if info is None or info.is_record:
            raise self.fail(f"subject field '{subject}' is not a leaf field of the schema; name the field holding the subject id (e.g. customer_id)")
        t = info.arrow_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            raise self.fail(f"subject field '{subject}' must be a string or integer field, not {t}")

    def output_type(self) -> pa.DataType | None:
        return pa.binary()

    def describe(self) -> dict[str, Any]:
        # The original type lets `cloakbeam decrypt` restore values; mode and key name are not secret.
        out = {"action": self.name, "deterministic": bool(self.options["deterministic"]), "key": self.options["key"], "type": str(self.field.arrow_type), "cell_format": 1}
        if self.options["subject"] is not None:
            out["subject"] = self.options["subject"]  # cells use per-subject keys from the vault
        return out

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        path = self.field.path
        if self.options["subject"] is not None:
            return self._apply_per_subject(column, columns, ctx)
        det = bool(self.options["deterministic"])
        keys = ctx.keys
        limit = getattr(keys, "_max_uses", len(column)) or len(column)
        pieces = []
        # A batch larger than the per-DEK usage limit is split so no data key exceeds it.
        for start in range(0, max(len(column), 1), max(limit, 1)):
            part = column.slice(start, limit)
            uses = len(part) - part.null_count
            dek = keys.data_key(ctx.dataset_id, path, deterministic=det, kek=self.options["key"], uses=max(uses, 1), run=ctx.run_id)
            pieces.append(encrypt_column(part, dek, dataset=ctx.dataset_id, column=path))
        ctx.count(f"encrypt.{path}.cells", len(column) - column.null_count)
        return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)

    def _apply_per_subject(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        """Each row under its subject's vault key; rows without a subject id under the column's sealed DEK."""
        import pyarrow.compute as pc

        path = self.field.path
        subj = columns[self.options["subject"]]
        if isinstance(subj, pa.ChunkedArray):
            subj = subj.combine_chunks()
        if not pa.types.is_string(subj.type):
            subj = pc.cast(subj, pa.string())
        subj = pc.utf8_trim_whitespace(subj)
        enc = pc.dictionary_encode(subj)
        distinct = enc.dictionary.to_pylist()
        keys = list(ctx.vault.subject_column_keys(distinct)) if distinct else []
        idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        empty = [i for i, v in enumerate(distinct) if not v]
        if empty:
            idx[np.isin(idx, empty)] = -1
        no_subject = idx < 0
        if no_subject.any():  # no subject id: the column's sealed run DEK (erasable only with the whole output)
            n = int(no_subject.sum())
            keys.append(ctx.keys.data_key(ctx.dataset_id, path, kek=self.options["key"], uses=n, run=ctx.run_id))
            idx[no_subject] = len(keys) - 1
            ctx.count(f"encrypt.{path}.no_subject", n)
        ctx.count(f"encrypt.{path}.cells", len(column) - column.null_count)
        ctx.count(f"encrypt.{path}.subjects", len(distinct) - len(empty))
        return encrypt_column_keyed(column, idx, keys, dataset=ctx.dataset_id, column=path)
