"""Static checks of a built Beam pipeline against what a runner executes correctly.

Beam's DaskRunner accepts pipelines it then runs wrongly, without an error: it computes only the last leaf of
the graph, hands every tagged output to every consumer, drops what `finish_bundle` emits, ignores windowing and
state, and cannot run `Read()`-based sources or batched DoFns. `dask_shape_problems(pipeline)` lists every such
construct in a pipeline as sentences, so the runner can refuse the pipeline before any data moves.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.pipeline import PipelineVisitor
from apache_beam.transforms.window import GlobalWindows

# Beam-internal DoFns that override finish_bundle but emit nothing from it (checked against Beam 2.77 source).
_FINISH_BUNDLE_SAFE = {
    "apache_beam.transforms.combiners._CombineGloballyDoFn",
}


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _overrides(fn: Any, method: str) -> bool:
    mine = getattr(type(fn), method, None)
    base = getattr(beam.DoFn, method, None)
    return mine is not None and mine is not base


def _has_restriction_provider(fn: Any) -> bool:
    try:
        from apache_beam.runners.common import DoFnSignature

        return DoFnSignature(fn).is_splittable_dofn()
    except Exception:  # pragma: no cover - signature inspection failed; other checks still apply
        return False


class _ShapeVisitor(PipelineVisitor):
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.produced: list[Any] = []
        self.consumed: set[int] = set()
        self.leaves_in_order: list[Any] = []
        self.stack: list[Any] = []

    def enter_composite_transform(self, node: Any) -> None:
        t = node.transform
        if isinstance(t, beam.io.Read):
            self.problems.append(f"step '{node.full_label}' is a Read()-based source, which the DaskRunner cannot run; read files with fileio.MatchAll + ReadMatches + a ParDo")
        self.stack.append(node)

    def leave_composite_transform(self, node: Any) -> None:
        if self.stack and self.stack[-1] is node:
            self.stack.pop()

    def _inside_replaced(self) -> bool:
        # The DaskRunner replaces Create and Reshuffle as a whole; what they expand to never runs there.
        return any(isinstance(n.transform, (beam.Create, beam.Reshuffle)) for n in self.stack)

    def visit_transform(self, node: Any) -> None:
        t = node.transform
        label = node.full_label
        self.leaves_in_order.append(node)
        for pc in node.inputs:
            self.consumed.add(id(pc))
        for si in node.side_inputs:
            self.consumed.add(id(si.pvalue))
        outputs = [o for o in node.outputs.values() if isinstance(o, beam.pvalue.PCollection)]
        self.produced.extend((label, o) for o in outputs)
        if self._inside_replaced():
            return
        if isinstance(t, beam.io.Read):
            self.problems.append(f"step '{label}' is a Read()-based source, which the DaskRunner cannot run; read files with fileio.MatchAll + ReadMatches + a ParDo")
        if isinstance(t, beam.Impulse):
            self.problems.append(f"step '{label}' starts from an Impulse, which the DaskRunner does not translate; start from beam.Create")
        if isinstance(t, beam.ParDo):
            fn = t.fn
            if len(outputs) > 1:
                self.problems.append(f"step '{label}' has tagged outputs, which the DaskRunner delivers to every consumer; emit (tag, value) pairs and Filter instead")
            if _overrides(fn, "finish_bundle") and _qualname(fn) not in _FINISH_BUNDLE_SAFE:
                self.problems.append(f"step '{label}' ({type(fn).__name__}) overrides finish_bundle, whose outputs the DaskRunner drops; emit from process() instead")
            if _has_restriction_provider(fn):
                self.problems.append(f"step '{label}' is a splittable DoFn, which the DaskRunner does not support")
            if _overrides(fn, "process_batch"):
                self.problems.append(f"step '{label}' is a batched DoFn, which the DaskRunner cannot run")
            try:
                from apache_beam.transforms import userstate

                if userstate.is_stateful_dofn(fn):
                    self.problems.append(f"step '{label}' uses state or timers, which the DaskRunner does not support")
            except Exception:  # pragma: no cover - Beam internals moved
                pass
        for _, o in [(label, o) for o in outputs]:
            if not o.is_bounded:
                self.problems.append(f"step '{label}' produces an unbounded collection; the DaskRunner runs bounded batch jobs only")
            wfn = getattr(o.windowing, "windowfn", None) if hasattr(o, "windowing") else None
            if wfn is not None and not isinstance(wfn, GlobalWindows):
                self.problems.append(f"step '{label}' windows its output ({type(wfn).__name__}); the DaskRunner ignores windowing")


def dask_shape_problems(pipeline: Any) -> list[str]:
    """Every construct in `pipeline` that the DaskRunner would execute wrongly, as sentences (empty when fine)."""
    v = _ShapeVisitor()
    pipeline.visit(v)
    problems = list(dict.fromkeys(v.problems))
    ends = [(label, o) for label, o in v.produced if id(o) not in v.consumed]
    if len(ends) > 1:
        names = ", ".join(sorted({label for label, _ in ends}))
        problems.append(f"the graph has {len(ends)} ends ({names}); the DaskRunner computes only the last one, so join every end into one final step")
    elif len(ends) == 1 and v.leaves_in_order:
        last = v.leaves_in_order[-1]
        if ends[0][1] not in list(last.outputs.values()):
            problems.append(f"the graph's end '{ends[0][0]}' is not its last step '{last.full_label}'; the DaskRunner computes only the last step")
    return problems
