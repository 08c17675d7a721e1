"""Classification: every field gets a data class, and content that contradicts the policy fails the run.

The policy section `classification` (optional; compiled with defaults when absent):

    classification:
      threshold: 0.0          # fraction of a batch's non-null values a guard detector may hit in a clear field
      on_contradiction: fail  # fail | warn (warn counts `classify.<field>.contradiction` and lets data through)
      guard: [US_SSN, CREDIT_CARD]
      sample_rows: 4096       # rows per batch the statistics detectors look at (0 = all rows)
      fields:
        diagnosis: {on_contradiction: warn}
        notes: {class: FREE_TEXT, threshold: 0.5}
        legacy_email: {allow_clear: true}

Where a class comes from, first match wins: the policy's per-field `class`, the Avro schema annotation
(`cloakbeam.class`), a field-name hint, then the Arrow type. Content detector hit rates are measured on the
data (a strided sample of every batch) and reported in the manifest next to the class; `cloakbeam classify`
uses them to propose classes for schema-less data.

Fail closed, twice:
- compile time: a field declared a direct identifier (name, e-mail, phone, SSN, card, IP) that the policy
  keeps in clear fails the policy unless the section sets `allow_clear: true` for it;
- run time: a field that reaches the output in clear (action `keep`, or class OTHER under a value-preserving
  action) is scanned in full by the guard detectors on every batch; more hits than the threshold raise
  ClassificationError naming the field and the detector, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.core.policy import CompiledPolicy, register_section
from cloakbeam.errors import ClassificationError, PolicyError
from cloakbeam.schemas.avro import InputSchema
from cloakbeam.transforms.detectors import CLASSES, DETECTORS, GUARD_DETECTORS, as_strings, evaluate

SECTION = "classification"
DIRECT_IDENTIFIERS = ("PERSON_NAME", "EMAIL", "PHONE", "US_SSN", "CREDIT_CARD", "IP_ADDRESS")
# Actions that emit the value (or most of it) unchanged: a field of class OTHER under them is guarded too.
_VALUE_PRESERVING = {"keep", "generalize"}
_SECTION_KEYS = {"threshold", "on_contradiction", "guard", "sample_rows", "fields", "phone_sample"}
_FIELD_KEYS = {"class", "threshold", "on_contradiction", "guard", "allow_clear"}
DEFAULT_SAMPLE_ROWS = 4096
DEFAULT_PHONE_SAMPLE = 256  # PHONE validation is per value (phonenumbers); capped per field and batch

# Field-name hints: a regex over the last path component (lower-cased), in priority order.
NAME_HINTS: tuple[tuple[str, str], ...] = (
    (r"(^|_)(ssn|social_security(_number)?|sin)$", "US_SSN"),
    (r"(card|cc|pan)(_?(number|num|no))?$|^credit_?card", "CREDIT_CARD"),
    (r"e_?mail", "EMAIL"),
    (r"phone|mobile|msisdn|(^|_)tel(ephone)?($|_)|(^|_)fax($|_)", "PHONE"),
    (r"(^|_)(dob|birth_?date|date_of_birth|birthday)($|_)|birth", "DATE_OF_BIRTH"),
    (r"(^|_)(zip|zipcode|zip_code|postal_?code|postcode)($|_)", "POSTAL_CODE"),
    (r"(^|_)ip(_?addr(ess)?|v4|v6)?($|_)", "IP_ADDRESS"),
    (r"(^|_)(gender|sex)($|_)", "GENDER"),
    (r"(^|_)((full_|first_|last_|middle_|sur|given_|family_|maiden_)name|name)$", "PERSON_NAME"),
    (r"(^|_)(notes?|comments?|description|remarks?|message|text|body|free_?text)$", "FREE_TEXT"),
    (r"(^|_)(id|uuid|guid|ref|key|account(_?(number|no))?)$|_id$|_ref$", "IDENTIFIER"),
    (r"(^|_)(label|target|churn(ed)?|is_fraud|outcome|y)$", "LABEL"),
)


def name_hint(path: str) -> str | None:
    """The class a field's name suggests, or None."""
    leaf = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", path.rsplit(".", 1)[-1]).lower()  # camelCase -> camel_case
    for pattern, cls in NAME_HINTS:
        if re.search(pattern, leaf):
            return cls
    return None


# -- profiling and inference (shared with `cloakbeam classify`) -----------------------------------------------

@dataclass
class Profile:
    """Value statistics of one column sample: counts only, never values."""

    rows: int = 0
    nonnull: int = 0
    hits: dict[str, int] = field(default_factory=dict)  # detector -> values that ARE such a value
    contains: dict[str, int] = field(default_factory=dict)  # detector -> values that contain one
    examined: dict[str, int] = field(default_factory=dict)  # detector -> values validated (when capped)
    distinct: int = 0
    mean_length: float = 0.0
    multiword: int = 0  # values with 3+ spaces (free-text shape)
    name_shape: int = 0  # values shaped like "First Last"
    numeric_strings: int = 0
    bool_strings: int = 0
    timestamp_strings: int = 0

    def rate(self, det: str, contains: bool = False) -> float:
        base = self.examined.get(det, self.nonnull)
        n = (self.contains if contains else self.hits).get(det, 0)
        return n / base if base else 0.0


_NAME_SHAPE = r"^[A-Z][a-z'\-]+( [A-Z]\.?)?( [A-Z][a-zA-Z'\-]+){1,2}$"
_NUMERIC = r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"
_BOOL = r"^(?i)(true|false|yes|no|t|f|0|1)$"
_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}"


def profile_column(column: pa.Array, detectors: tuple[str, ...] | None = None, phone_sample: int | None = DEFAULT_PHONE_SAMPLE) -> Profile:
    """Run the content detectors and shape statistics over one column (typically a sample)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    prof = profile_column_counts(column, phone_sample, detectors)
    if prof.nonnull and not pa.types.is_nested(column.type):
        prof.distinct = len(pc.unique(column.drop_null()))
    strings = as_strings(column)
    if strings is None or prof.nonnull == 0:
        return prof
    valid = strings.drop_null()
    prof.mean_length = float(pc.mean(pc.utf8_length(valid)).as_py() or 0.0)
    count = lambda pat: int(pc.sum(pc.match_substring_regex(valid, pat)).as_py() or 0)  # noqa: E731
    prof.multiword = count(r"\S+\s+\S+\s+\S+\s+\S+")
    prof.name_shape = count(_NAME_SHAPE)
    prof.numeric_strings = count(_NUMERIC)
    prof.bool_strings = count(_BOOL)
    prof.timestamp_strings = count(_TIMESTAMP)
    return prof


@dataclass(frozen=True)
class Inference:
    """A proposed class, how sure, where it came from, and the evidence (counts and rates, no values)."""

    cls: str
    confidence: float
    source: str
    evidence: str


# Detector -> class, in the order ties are broken.
_DETECTOR_PRIORITY = ("US_SSN", "CREDIT_CARD", "EMAIL", "IP_ADDRESS", "PHONE", "DATE", "POSTAL_CODE", "GENDER")


def _evidence(prof: Profile | None) -> str:
    if prof is None or not prof.nonnull:
        return "no values"
    parts = []
    for det in _DETECTOR_PRIORITY:
        r, rc = prof.rate(det), prof.rate(det, contains=True)
        if r >= 0.01:
            parts.append(f"{det} {r:.0%}")
        elif rc >= 0.01:
            parts.append(f"{det} in {rc:.0%}")
    parts.append(f"{prof.nonnull} values, {prof.distinct} distinct")
    return "; ".join(parts)


def infer_class(path: str, arrow_type: pa.DataType, declared: str | None = None, override: str | None = None, profile: Profile | None = None) -> Inference:
    """Decide a field's class: policy override, schema annotation, content detectors, name hint, type, shape."""
    ev = _evidence(profile)
    if override:
        return Inference(override, 1.0, "policy", ev)
    if declared:
        return Inference(declared, 1.0, "schema annotation", ev)
    hint = name_hint(path)
    t = arrow_type
    if pa.types.is_boolean(t):
        return Inference("LABEL", 0.6, "type", ev)
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        if hint == "DATE_OF_BIRTH":
            return Inference("DATE_OF_BIRTH", 0.8, "name hint", ev)
        return Inference("OTHER", 0.5, "type", ev)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        if hint in ("IDENTIFIER", "POSTAL_CODE", "LABEL", "PHONE", "CREDIT_CARD", "US_SSN"):
            return Inference(hint, 0.6, "name hint", ev)
        return Inference("NUMERIC", 0.7, "type", ev)
    if profile is None or profile.nonnull == 0:
        return Inference(hint, 0.5, "name hint", ev) if hint else Inference("OTHER", 0.3, "default", ev)
    # Content detectors: the value IS an e-mail / SSN / ... in most rows.
    best = max(_DETECTOR_PRIORITY, key=lambda d: (profile.rate(d), -_DETECTOR_PRIORITY.index(d)))
    rate = profile.rate(best)
    if rate >= 0.8:
        det_cls, source = DETECTORS[best].data_class, "detector"
        if best == "DATE":  # a date is a birth date only when the name says so
            det_cls, source = ("DATE_OF_BIRTH", "detector + name hint") if hint == "DATE_OF_BIRTH" else ("OTHER", "detector")
        elif best == "POSTAL_CODE" and hint not in ("POSTAL_CODE", None):
            det_cls, source = hint, "detector + name hint"  # five-digit numbers are zips only when nothing says otherwise
        return Inference(det_cls, round(rate, 3), source, ev)
    if hint:
        return Inference(hint, 0.6, "name hint", ev)
    n = profile.nonnull
    if profile.numeric_strings >= 0.95 * n:
        return Inference("NUMERIC", 0.6, "content shape", ev)
    if profile.bool_strings >= 0.99 * n and profile.distinct <= 2:
        return Inference("LABEL", 0.5, "content shape", ev)
    if profile.timestamp_strings >= 0.9 * n:
        return Inference("OTHER", 0.5, "content shape (timestamps)", ev)
    if profile.mean_length >= 25 and profile.multiword >= 0.5 * n:
        return Inference("FREE_TEXT", 0.7, "content shape", ev)
    if profile.name_shape >= 0.9 * n and profile.distinct >= 0.5 * n:
        return Inference("PERSON_NAME", 0.6, "content shape", ev)
    if n >= 20 and profile.distinct >= 0.95 * n:
        return Inference("IDENTIFIER", 0.6, "content shape (unique values)", ev)
    return Inference("OTHER", 0.5, "default", ev)


# -- the policy section --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldRule:
    threshold: float
    on_contradiction: str
    guard: tuple[str, ...]
    allow_clear: bool = False
    cls: str | None = None


@dataclass
class ClassificationSection:
    """Compiled `classification` section: per-field classes, guards, and the per-batch check."""

    schema: InputSchema
    rules: dict[str, FieldRule]
    guarded: dict[str, FieldRule]  # leaf path -> rule, for fields that reach the output in clear
    string_fields: list[str]
    sample_rows: int
    phone_sample: int
    classes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    # -- what the manifest and Parquet metadata read --------------------------------------------------------
    def field_classes(self) -> dict[str, str]:
        return dict(self.classes)

    def class_sources(self) -> dict[str, str]:
        return dict(self.sources)

    def report(self, run_stats: Any) -> dict[str, Any]:
        """Per field: class, its source, and detector hit rates measured during the run (counts and rates only)."""
        counters = getattr(run_stats, "fields", {}) or {}
        out: dict[str, Any] = {}
        contradictions: list[str] = []
        mismatches: list[str] = []
        for path in self.schema.leaf_paths:
            prefix = f"classify.{path}."
            rows = int(counters.get(prefix + "rows", 0))
            entry: dict[str, Any] = {"class": self.classes[path], "source": self.sources[path], "rows_examined": rows}
            hits = {}
            for det in DETECTORS:
                n = int(counters.get(prefix + det, 0))
                base = int(counters.get(prefix + det + ".examined", rows))
                c = int(counters.get(prefix + det + ".contains", 0))
                if n or c:
                    hits[det] = {"values": n, "rate": round(n / base, 4) if base else 0.0}
                    if c:
                        hits[det]["contained_in"] = c
            if hits:
                entry["detectors"] = hits
                best = max(hits, key=lambda d: (hits[d]["rate"], d))
                if hits[best]["rate"] >= 0.8 and rows >= 20:
                    detected = DETECTORS[best].data_class
                    entry["detected_class"] = detected
                    if detected != self.classes[path] and not (best == "DATE" and self.classes[path] == "DATE_OF_BIRTH"):
                        mismatches.append(path)
            if prefix + "guard.rows" in counters:
                entry["guard"] = {
                    "rows": int(counters[prefix + "guard.rows"]),
                    **{d: int(counters.get(prefix + "guard." + d, 0)) for d in self.guarded[path].guard},
                }
            warned = int(counters.get(prefix + "contradiction", 0))
            if warned:
                entry["contradicting_batches"] = warned
                contradictions.append(path)
            out[path] = entry
        return {
            "fields": out,
            "guarded_fields": sorted(self.guarded),
            "contradictions": contradictions,  # fields whose guard fired under on_contradiction: warn
            "class_mismatches": mismatches,  # fields whose values mostly look like another class than assigned
        }

    # -- the per-batch check --------------------------------------------------------------------------------
    def check(self, columns: Mapping[str, pa.Array], ctx: Any) -> None:
        """Count detector hits per field (sampled) and enforce guards (full scan); raise ClassificationError."""
        for path in self.string_fields:
            col = columns.get(path)
            if col is None:
                continue
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            sample = col
            if self.sample_rows and len(col) > self.sample_rows:
                step = -(-len(col) // self.sample_rows)
                sample = col.take(pa.array(np.arange(0, len(col), step)))
            prof = profile_column_counts(sample, self.phone_sample)
            ctx.count(f"classify.{path}.rows", prof.nonnull)
            for det, n in prof.hits.items():
                ctx.count(f"classify.{path}.{det}", n)
            for det, n in prof.contains.items():
                if n > prof.hits.get(det, 0):
                    ctx.count(f"classify.{path}.{det}.contains", n)
            for det, n in prof.examined.items():
                ctx.count(f"classify.{path}.{det}.examined", n)
        for path, rule in self.guarded.items():
            col = columns.get(path)
            if col is None or as_strings(col) is None:
                continue
            nonnull = len(col) - col.null_count
            ctx.count(f"classify.{path}.guard.rows", nonnull)
            for det in rule.guard:
                hits = evaluate(det, col).contains_hits
                ctx.count(f"classify.{path}.guard.{det}", hits)
                if hits and nonnull and hits / nonnull > rule.threshold:
                    if rule.on_contradiction == "warn":
                        ctx.count(f"classify.{path}.contradiction", 1)
                        continue
                    raise ClassificationError(
                        f"field '{path}' reaches the output in clear (class {self.classes[path]}) but {hits} of "
                        f"{nonnull} values in a batch contain a {det} (detector {det}, threshold {rule.threshold:.2%}); "
                        f"protect the field in the policy, or set classification.fields.{path}.on_contradiction: warn"
                    )


def profile_column_counts(column: pa.Array, phone_sample: int | None, detectors: tuple[str, ...] | None = None) -> Profile:
    """Detector counts only (the run-time statistics; shape statistics are for `cloakbeam classify`)."""
    prof = Profile(rows=len(column), nonnull=len(column) - column.null_count)
    strings = as_strings(column)
    if strings is None or prof.nonnull == 0:
        return prof
    for name in detectors or tuple(DETECTORS):
        ev = evaluate(name, strings, max_validate=phone_sample)
        prof.hits[name] = ev.full_hits
        prof.contains[name] = ev.contains_hits
        if DETECTORS[name].per_value:  # capped detectors always report their own denominator
            prof.examined[name] = ev.examined
    return prof


def _fraction(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise PolicyError(f"{where} must be a fraction between 0 (no hits tolerated) and 1 (exclusive)")
    return float(v)


def _guard_list(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise PolicyError(f"{where} must be a list of detector names such as [US_SSN, CREDIT_CARD]")
    bad = [x for x in v if x not in DETECTORS]
    if bad:
        raise PolicyError(f"{where}: unknown detector '{bad[0]}'; detectors: {', '.join(DETECTORS)}")
    return tuple(v)


def _on_contradiction(where: str, v: Any) -> str:
    if v not in ("fail", "warn"):
        raise PolicyError(f"{where} must be 'fail' or 'warn'")
    return v


def compile_section(raw: Any, schema: InputSchema, policy: CompiledPolicy) -> ClassificationSection:
    """Compile the section (None = defaults), check linked fields, and register the per-batch check."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise PolicyError("'classification' must be a mapping (threshold, on_contradiction, guard, sample_rows, fields)")
    unknown = sorted(set(raw) - _SECTION_KEYS)
    if unknown:
        raise PolicyError(f"classification: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(_SECTION_KEYS))}")
    threshold = _fraction("classification.threshold", raw.get("threshold", 0.0))
    on_contra = _on_contradiction("classification.on_contradiction", raw.get("on_contradiction", "fail"))
    guard = _guard_list("classification.guard", raw.get("guard", list(GUARD_DETECTORS)))
    sample_rows = raw.get("sample_rows", DEFAULT_SAMPLE_ROWS)
    phone_sample = raw.get("phone_sample", DEFAULT_PHONE_SAMPLE)
    for key, v in (("sample_rows", sample_rows), ("phone_sample", phone_sample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PolicyError(f"classification.{key} must be a whole number of rows, 0 or more")
    per_field = raw.get("fields", {}) or {}
    if not isinstance(per_field, dict):
        raise PolicyError("classification.fields must map field paths to settings")

    rules: dict[str, FieldRule] = {}
    for path, spec in per_field.items():
        if path not in schema.fields or schema.fields[path].is_record:
            raise PolicyError(f"classification.fields: '{path}' is not a leaf field of schema {schema.source}")
        if not isinstance(spec, dict):
            raise PolicyError(f"classification.fields.{path} must be a mapping such as {{on_contradiction: warn}}")
        bad = sorted(set(spec) - _FIELD_KEYS)
        if bad:
            raise PolicyError(f"classification.fields.{path}: unknown key '{bad[0]}'; allowed keys: {', '.join(sorted(_FIELD_KEYS))}")
        cls = spec.get("class")
        if cls is not None and cls not in CLASSES:
            raise PolicyError(f"classification.fields.{path}.class '{cls}' is not a class; use one of {', '.join(CLASSES)}")
        allow = spec.get("allow_clear", False)
        if not isinstance(allow, bool):
            raise PolicyError(f"classification.fields.{path}.allow_clear must be true or false")
        rules[path] = FieldRule(
            threshold=_fraction(f"classification.fields.{path}.threshold", spec.get("threshold", threshold)),
            on_contradiction=_on_contradiction(f"classification.fields.{path}.on_contradiction", spec.get("on_contradiction", on_contra)),
            guard=_guard_list(f"classification.fields.{path}.guard", spec.get("guard", list(guard))),
            allow_clear=allow,
            cls=cls,
        )
    default_rule = FieldRule(threshold, on_contra, guard)

    for path, info in schema.fields.items():
        if info.declared_class is not None and info.declared_class not in CLASSES:
            raise PolicyError(f"schema {schema.source}: field '{path}' declares unknown class '{info.declared_class}'; use one of {', '.join(CLASSES)}")

    section = ClassificationSection(schema, rules, {}, [], sample_rows, phone_sample)
    for path in schema.leaf_paths:
        info = schema.fields[path]
        rule = rules.get(path, default_rule)
        inf = infer_class(path, info.arrow_type, info.declared_class, rule.cls, None)
        section.classes[path] = inf.cls
        section.sources[path] = inf.source
        if as_strings(pa.array([], type=info.arrow_type)) is not None:
            section.string_fields.append(path)
        action = policy.actions.get(path)
        if action is None or action.output_type() is None:
            continue
        if action.name == "keep" and inf.cls in DIRECT_IDENTIFIERS and not rule.allow_clear:
            raise PolicyError(
                f"field '{path}' is classified {inf.cls} ({inf.source}) but the policy keeps it in clear; protect it "
                f"(pseudonymize, mask, tokenize, encrypt or drop) or set classification.fields.{path}.allow_clear: true"
            )
        if action.name == "keep" or (inf.cls == "OTHER" and action.name in _VALUE_PRESERVING):
            if pa.types.is_string(info.arrow_type) or pa.types.is_large_string(info.arrow_type):
                section.guarded[path] = rule

    # Actions that read other fields (scrub `link`, date_shift `subject`) must name real leaf fields.
    for path, action in policy.actions.items():
        bind = getattr(action, "bind_schema", None)
        if callable(bind):
            bind(schema)
        linked = getattr(action, "linked_fields", None)
        for other in linked() if callable(linked) else []:
            if other not in schema.fields or schema.fields[other].is_record:
                raise PolicyError(f"field '{path}' (action '{action.name}') refers to '{other}', which is not a leaf field of schema {schema.source}")

    policy.checks.append(section.check)
    return section


register_section(SECTION, compile_section)
