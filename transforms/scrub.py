"""The `scrub` action: find personal data inside free text and replace it through presidio-anonymizer.

Spans come from two sources:
- the content detectors (`transforms/detectors.py`: e-mail, phone, SSN, card, IP), validated, and
- the record's own linked values (`link: [full_name, email, phone, ssn]`): wherever a note repeats the
  record's name, e-mail, phone or SSN it is a span of that field's class, whatever its shape. For a linked
  PERSON_NAME field each name part (3+ letters) is a span too ("Mr. Whitfield").

Overlaps are resolved here (`_outermost`: disjoint spans). `mode: placeholder` (default) replaces a span with
its type (`<EMAIL>`, `<PERSON_NAME>`), spliced directly by `splice_placeholders`, which gives the text presidio's
`AnonymizerEngine` gives for the same spans and `replace` operators (tested against it) without presidio's
per-span objects, and without importing presidio at all (1.5 s per worker). `mode: pseudonym` replaces names,
e-mails and phones with the same keyed surrogates the `pseudonymize` action produces for the same domain: those
spans go through presidio's `AnonymizerEngine` with a custom operator, other types get placeholders.

Cost: free text is per row by nature (presidio takes one string). Per batch, one vectorized regex over the
column selects rows with any detector candidate; linked-value containment is a substring test per row; only
rows with at least one validated span are rewritten. Candidate validation is vectorized across the batch
(one call per detector). `benchmarks/bench_classify_mask.py` measures it.

Counts: `scrub.<field>.<TYPE>` spans replaced, `scrub.<field>.rows_changed`. Nothing is logged; a row that
presidio cannot process raises with the field and row index only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from cloakbeam.transforms.detectors import DETECTORS, TEXT_DETECTORS, any_candidate, as_strings, iter_candidates
from cloakbeam.transforms.pseudonymize import SurrogateGenerator, pseudonym_key
from cloakbeam.transforms.registry import Action, ActionContext, Param, register

_MODES = ("placeholder", "pseudonym")
_PSEUDONYM_KIND = {"PERSON_NAME": "name", "EMAIL": "email", "PHONE": "phone"}
_TEXT_TYPES = {d: DETECTORS[d].data_class for d in DETECTORS}


def _check_link(v: list) -> str | None:
    if not all(isinstance(x, str) and x for x in v):
        return "must be a list of field paths, e.g. [full_name, email]"
    return None


def _check_detectors(v: list) -> str | None:
    bad = [x for x in v if x not in DETECTORS or not DETECTORS[x].in_text]
    if bad:
        return f"names an unknown or non-text detector '{bad[0]}'; use some of {', '.join(d for d in DETECTORS if DETECTORS[d].in_text)}"
    return None


@register
class Scrub(Action):
    """Replace PII spans inside a free-text field; the rest of the text is kept."""

    name = "scrub"
    params = {
        "link": Param(list, default=[], check=_check_link, doc="fields of the same record whose values are PII in this text"),
        "detectors": Param(list, default=list(TEXT_DETECTORS), check=_check_detectors, doc="content detectors to run"),
        "mode": Param(str, default="placeholder", choices=_MODES, doc="placeholder (<EMAIL>) or pseudonym"),
        "name_parts": Param(bool, default=True, doc="also replace each part of a linked name"),
        "locale": Param(str, default="en_US", doc="Faker locale for pseudonym mode"),
    }
    accepts = (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),)

    def configure(self) -> None:
        if self.field.path in self.options["link"]:
            raise self.fail("cannot link the field to itself; list the record's other PII fields")
        self._link_types: dict[str, str] = {}
        for path in self.options["link"]:
            self._link_types[path] = _guess_type(path)
        self._engine: Any = None

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]  # per instance, from the parameters
        return frozenset({"keys"}) if self.options["mode"] == "pseudonym" else frozenset()

    def linked_fields(self) -> list[str]:
        return list(self.options["link"])

    def bind_schema(self, schema: Any) -> None:
        """Use the linked fields' declared classes as span types (called by the classification compiler)."""
        for path in self.options["link"]:
            info = schema.fields.get(path)
            if info is not None and info.declared_class:
                self._link_types[path] = info.declared_class

    def output_type(self) -> pa.DataType | None:
        return pa.string()

    def describe(self) -> dict[str, Any]:
        return {"action": self.name, "mode": self.options["mode"], "link": list(self.options["link"]), "detectors": list(self.options["detectors"])}

    # -- run time -----------------------------------------------------------------------------------
    def _anonymizer(self) -> Any:
        if self._engine is None:
            from presidio_anonymizer import AnonymizerEngine

            self._engine = AnonymizerEngine()
        return self._engine

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engine"] = None  # rebuilt per worker
        return state

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        strings = as_strings(column)
        if strings is None:  # configure() accepts string fields only
            raise TypeError(f"field '{self.field.path}': scrub needs a string column")
        n = len(strings)
        texts = strings.to_pylist()
        dets = tuple(self.options["detectors"])
        rows = any_candidate(strings, dets) if dets else np.zeros(n, dtype=bool)
        linked: dict[str, list[Any]] = {}
        for path in self.options["link"]:
            other = columns.get(path)
            if other is None:
                raise RuntimeError(f"field '{self.field.path}': linked field '{path}' is not in the batch")
            as_text = as_strings(other)
            linked[path] = (as_text if as_text is not None else other.cast(pa.string())).to_pylist()
        spans: dict[int, list[tuple[int, int, str]]] = {}
        # Linked values: case-insensitive occurrences on word boundaries, with str.find (no regex per row).
        lowered = [t.lower() if t is not None else None for t in texts]
        for path, values in linked.items():
            typ = self._link_types[path]
            for i in range(n):
                text, v = texts[i], values[i]
                if text is None or not v:
                    continue
                for needle, span_type in _needles(v, typ, self.options["name_parts"]):
                    for s, e in _occurrences(text, lowered[i] or "", needle):
                        spans.setdefault(i, []).append((s, e, span_type))
        # Detector candidates on the pre-filtered rows, validated per detector in one vectorized call.
        cand_rows = np.flatnonzero(rows)
        for det in dets:
            d = DETECTORS[det]
            where: list[tuple[int, int, int]] = []
            for i in cand_rows.tolist():
                text = texts[i]
                for s, e in iter_candidates(d, text):
                    where.append((int(i), s, e))
            if not where:
                continue
            if d.validate is not None:
                ok = d.validate(pa.array([texts[i][s:e] for i, s, e in where], type=pa.string()))
            else:
                ok = np.ones(len(where), dtype=bool)
            for (i, s, e), good in zip(where, ok):
                if good:
                    spans.setdefault(i, []).append((s, e, _TEXT_TYPES[det]))
        if not spans:
            return strings
        out = list(texts)
        counts: Counter[str] = Counter()
        if self.options["mode"] == "placeholder":
            for i, found in spans.items():
                out[i], types = splice_placeholders(texts[i], _outermost(found))
                counts.update(types)
        else:
            self._presidio_rows(texts, spans, out, counts, ctx)
        for t, c in counts.items():
            ctx.count(f"scrub.{self.field.path}.{t}", c)
        ctx.count(f"scrub.{self.field.path}.rows_changed", len(spans))
        return pa.array(out, type=pa.string())

    def _presidio_rows(self, texts: list[Any], spans: dict[int, list[tuple[int, int, str]]], out: list[Any],
                       counts: Counter[str], ctx: ActionContext) -> None:
        """Pseudonym mode: the rows with spans through presidio's AnonymizerEngine (custom surrogate operators)."""
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        operators = self._operators(ctx, OperatorConfig)
        engine = self._anonymizer()
        for i, found in spans.items():
            # Resolve duplicates, containment and overlaps here (cheap); presidio then replaces disjoint spans.
            results = [RecognizerResult(entity_type=t, start=s, end=e, score=1.0) for s, e, t in _outermost(found)]
            try:
                res = engine.anonymize(text=texts[i], analyzer_results=results, operators=operators)
            except Exception as exc:  # presidio errors quote no text, but keep ours value-free regardless
                raise RuntimeError(f"field '{self.field.path}': scrubbing row {i} of the batch failed ({type(exc).__name__})") from None
            out[i] = res.text
            counts.update(item.entity_type.split(":", 1)[0] for item in res.items)

    def _operators(self, ctx: ActionContext, OperatorConfig: Any) -> dict[str, Any]:
        types = set(_TEXT_TYPES.values()) | set(self._link_types.values()) | {"PII"}
        ops: dict[str, Any] = {"DEFAULT": OperatorConfig("replace", {"new_value": "<PII>"})}
        for t in types:
            ops[t] = OperatorConfig("replace", {"new_value": f"<{t}>"})
            ops[f"{t}:first"] = OperatorConfig("replace", {"new_value": f"<{t}>"})
            ops[f"{t}:last"] = OperatorConfig("replace", {"new_value": f"<{t}>"})
        if self.options["mode"] == "pseudonym":
            for t, kind in _PSEUDONYM_KIND.items():
                ops[t] = OperatorConfig("custom", {"lambda": self._surrogate_fn(ctx, kind)})
            ops["PERSON_NAME:first"] = OperatorConfig("custom", {"lambda": self._surrogate_fn(ctx, "first_name")})
            ops["PERSON_NAME:last"] = OperatorConfig("custom", {"lambda": self._surrogate_fn(ctx, "last_name")})
        return ops

    def _surrogate_fn(self, ctx: ActionContext, kind: str) -> Callable[[str], str]:
        gen = SurrogateGenerator(kind, self.options["locale"])
        key = pseudonym_key(ctx, kind)
        cache: dict[str, str] = {}

        def fn(text: str) -> str:
            if text not in cache:
                cache[text] = gen.one(key, text)
            return cache[text]

        return fn


_SPACES = re.compile(r"^( )+$")


def splice_placeholders(text: str, spans: list[tuple[int, int, str]]) -> tuple[str, list[str]]:
    """`text` with each of the disjoint, start-sorted `spans` replaced by `<TYPE>` (the part of the span type
    before any ':'), and the replaced types in text order. As presidio's AnonymizerEngine does with `replace`
    operators: two spans of the same type separated only by spaces become one span (one placeholder)."""
    merged: list[list[Any]] = []
    for s, e, t in spans:
        if merged and merged[-1][2] == t and _SPACES.match(text[merged[-1][1]:s]):
            merged[-1][1] = e
        else:
            merged.append([s, e, t])
    parts: list[str] = []
    types: list[str] = []
    pos = 0
    for s, e, t in merged:
        base = t.split(":", 1)[0]
        parts.append(text[pos:s])
        parts.append(f"<{base}>")
        types.append(base)
        pos = e
    parts.append(text[pos:])
    return "".join(parts), types


def _needles(value: Any, typ: str, name_parts: bool) -> list[tuple[str, str]]:
    """The strings to look for in the text for one linked value, longest first, with their span type."""
    v = str(value).strip()
    out = [(v, typ)]
    if typ == "PERSON_NAME" and name_parts:
        parts = [p for p in re.split(r"\s+", v) if len(p.strip(".,")) >= 3]
        if len(parts) > 1:
            out += [(parts[0], "PERSON_NAME:first")] + [(p, "PERSON_NAME:last") for p in parts[1:]]
    return out


def _outermost(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping spans covering every found span: contained spans are dropped and partial overlaps are
    merged into their union (typed as the longer part), so no fragment of a value survives between two spans.
    On equal starts the longer span wins; on identical spans the first listed (linked values) wins."""
    order = sorted(range(len(found)), key=lambda k: (found[k][0], -found[k][1], k))
    out: list[list] = []
    for k in order:
        s, e, t = found[k]
        if out and s < out[-1][1]:
            last = out[-1]
            if e > last[1]:
                if e - s > last[1] - last[0]:
                    last[2] = t
                last[1] = e
            continue
        out.append([s, e, t])
    return [(s, e, t) for s, e, t in out]


def _occurrences(text: str, lowered: str, needle: str) -> list[tuple[int, int]]:
    """(start, end) of each case-insensitive occurrence of `needle` in `text` not inside a longer word."""
    low = needle.lower()
    if not low:
        return []
    if len(lowered) != len(text) or len(low) != len(needle):  # lower() changed lengths (rare Unicode): use re
        rx = re.compile(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", re.IGNORECASE)
        return [(m.start(), m.end()) for m in rx.finditer(text)]
    out = []
    pos = lowered.find(low)
    while pos >= 0:
        end = pos + len(low)
        before = text[pos - 1] if pos > 0 else " "
        after = text[end] if end < len(text) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            out.append((pos, end))
        pos = lowered.find(low, pos + 1)
    return out


def _guess_type(path: str) -> str:
    from cloakbeam.transforms.classify import name_hint

    return name_hint(path) or "PII"
