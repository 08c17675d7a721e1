"""Apply a compiled policy to one RecordBatch: the plain function every Beam step and runner shares.

`protect_batch` flattens the batch to leaf columns (dotted paths), runs the policy's checks (classification),
applies one action per kept leaf, drops everything else (default deny) and rebuilds nested records. It imports
nothing from Beam and never logs or raises with a value in the message.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from cloakbeam.core.policy import CompiledPolicy
from cloakbeam.transforms.registry import ActionContext


def flatten_columns(batch: pa.RecordBatch | pa.Table) -> dict[str, pa.Array]:
    """Leaf path -> column; a null parent record makes its children null (Arrow's `StructArray.flatten`)."""
    out: dict[str, pa.Array] = {}

    def walk(prefix: str, arr: pa.Array) -> None:
        if pa.types.is_struct(arr.type):
            for i, child in enumerate(arr.flatten()):
                walk(f"{prefix}.{arr.type.field(i).name}", child)
        else:
            out[prefix] = arr

    for name, col in zip(batch.schema.names, batch.columns):
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        walk(name, col)
    return out


def _record_validity(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    """Record path -> its own null mask (True where the record itself is null), for rebuilding structs."""
    masks: dict[str, pa.Array] = {}

    def walk(prefix: str, arr: pa.Array, parent_null: pa.Array | None) -> None:
        if not pa.types.is_struct(arr.type):
            return
        import pyarrow.compute as pc

        own = pc.is_null(arr)
        mask = own if parent_null is None else pc.or_(own, parent_null)
        masks[prefix] = mask
        for i, child in enumerate(arr.flatten()):
            walk(f"{prefix}.{arr.type.field(i).name}", child, mask)

    for name, col in zip(batch.schema.names, batch.columns):
        walk(name, col, None)
    return masks


def assemble(columns: Mapping[str, pa.Array], schema: pa.Schema, record_nulls: Mapping[str, pa.Array], num_rows: int) -> pa.RecordBatch:
    """Rebuild a RecordBatch of `schema` from leaf columns keyed by dotted path."""

    def build(prefix: str, f: pa.Field) -> pa.Array:
        path = prefix + f.name
        if pa.types.is_struct(f.type):
            children = [build(path + ".", c) for c in f.type]
            mask = record_nulls.get(path)
            return pa.StructArray.from_arrays(children, fields=list(f.type), mask=mask)
        arr = columns[path]
        if arr.type != f.type:
            arr = arr.cast(f.type)
        return arr

    arrays = [build("", f) for f in schema]
    if not arrays:
        return pa.RecordBatch.from_pydict({}, schema=schema) if num_rows == 0 else pa.RecordBatch.from_arrays([], schema=schema)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def protect_batch(batch: pa.RecordBatch, policy: CompiledPolicy, ctx: ActionContext, output_schema: pa.Schema | None = None) -> pa.RecordBatch:
    """Return the protected batch: only policy-kept fields, each transformed by its action.

    Rows an action rejected (`ctx.reject_rows`) are left out; `rejected_rows(ctx)` then lists them as
    (row index in `batch`, reason, field) so the caller can quarantine them.
    """
    protected, _ = protect_batch_with_rejects(batch, policy, ctx, output_schema)
    return protected


def protect_batch_with_rejects(
    batch: pa.RecordBatch, policy: CompiledPolicy, ctx: ActionContext, output_schema: pa.Schema | None = None
) -> tuple[pa.RecordBatch, list[tuple[int, str, str]]]:
    """Like `protect_batch`, also returning the rejected rows as (row index, reason, field), first reason wins."""
    from time import perf_counter

    import numpy as np

    ctx.rejections = []
    timers = getattr(ctx, "timers", None)
    columns = flatten_columns(batch)
    t0 = perf_counter()
    for check in policy.checks:
        check(columns, ctx)
    t1 = perf_counter()
    if timers is not None and policy.checks:
        timers["classify"] += t1 - t0
    out: dict[str, pa.Array] = {}
    for path, action in policy.output_actions.items():
        out[path] = action.apply(columns[path], columns, ctx)
        if timers is not None:
            t2 = perf_counter()
            timers[getattr(action, "name", None) or type(action).__name__] += t2 - t1
            t1 = t2
    schema = output_schema if output_schema is not None else policy.output_schema()
    protected = assemble(out, schema, _record_validity(batch), batch.num_rows)
    if not ctx.rejections:
        return protected, []
    first: dict[int, tuple[str, str]] = {}
    bad = np.zeros(batch.num_rows, dtype=bool)
    for mask, reason, field in ctx.rejections:
        for row in np.flatnonzero(mask & ~bad):
            first[int(row)] = (reason, field)
        bad |= mask
    ctx.rejections = []
    rejected = [(row, *first[row]) for row in sorted(first)]
    return protected.filter(pa.array(~bad)), rejected
