"""The `encrypt` action: AES-256-GCM (or AES-256-SIV when `deterministic: true`) per cell, whole columns at once.

    ssn: encrypt                                  # random nonces: equal values give unrelated cells
    customer_id: {action: encrypt, deterministic: true}   # AES-SIV: equal values give equal cells (joinable;
                                                          # this REVEALS which rows share a value)
    notes: {action: encrypt, key: pii-high}       # wrap this column's data keys under KEK 'pii-high'

The output column is `binary` in the cell format of `cloakbeam.keys.cells` (version byte, key id, nonce,
ciphertext, tag) with the column path, key id and dataset id bound as associated data. Nulls stay null.
Data keys come from `ctx.keys.data_key(...)` (cached per worker process; see keys/service.py). Imports
nothing from Beam and never puts a value or key byte in an error or counter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from cloakbeam.keys.cells import encrypt_column, is_supported_type
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
        "key": Param(str, default=DEFAULT_KEK, check=_check_key_name, doc="name of the KEK that wraps this column's data keys"),
    }
    accepts = (is_supported_type,)
    requires = frozenset({"keys"})

    def output_type(self) -> pa.DataType | None:
        return pa.binary()

    def describe(self) -> dict[str, Any]:
        # The original type lets `cloakbeam decrypt` restore values; mode and key name are not secret.
        return {"action": self.name, "deterministic": bool(self.options["deterministic"]), "key": self.options["key"], "type": str(self.field.arrow_type), "cell_format": 1}

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        path = self.field.path
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
