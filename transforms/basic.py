"""The two actions every policy can use: `keep` (pass the column through) and `drop` (remove it)."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from cloakbeam.transforms.registry import Action, ActionContext, register


@register
class Keep(Action):
    """Pass the column through unchanged. Use only for fields that are not personal data."""

    name = "keep"
    applies_to_records = True

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        return column


@register
class Drop(Action):
    """Remove the column from the output."""

    name = "drop"
    applies_to_records = True

    def output_type(self) -> pa.DataType | None:
        return None

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        raise AssertionError("drop has no output column")  # never called: output_type() is None
