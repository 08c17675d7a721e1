"""Load a YAML policy, validate it against the input schema and compile it into actions.

Policy format (see schemas/customers.policy.yaml and README):

    version: 1
    dataset: customers            # dataset id, bound into encrypted cells and tokens
    fields:
      gender: keep                # shorthand for {action: keep}
      phone: {action: mask, method: phone, keep_last: 2}
      address: drop               # a record path: applies to all of its fields
      address.city: keep          # nested fields by dotted path
    <section>: {...}              # optional sections registered by other modules (classification, k_anonymity, ...)

Default deny: a field the policy does not mention is dropped and listed as such in the manifest. Every error
is a sentence naming the policy file and field; compile time is the only time a policy can fail.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa
import yaml

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import FieldInfo, InputSchema
from cloakbeam.transforms.registry import Action, get_action

POLICY_VERSION = 1
_CORE_KEYS = {"version", "dataset", "description", "fields"}

# Optional top-level sections: name -> compiler(section_value, schema, policy_so_far) -> compiled object.
_SECTIONS: dict[str, Callable[[Any, InputSchema, "CompiledPolicy"], Any]] = {}
SECTION_MODULES = (
    "cloakbeam.transforms.classify",
    "cloakbeam.transforms.kanon",
    "cloakbeam.keys.parquet_encryption",
)


def register_section(name: str, compiler: Callable[[Any, InputSchema, "CompiledPolicy"], Any]) -> None:
    """Let a module own a top-level policy section; its compiler raises PolicyError on bad content."""
    _SECTIONS[name] = compiler


def _load_sections() -> None:
    import importlib

    for mod in SECTION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


@dataclass
class CompiledPolicy:
    """A validated policy: one Action per kept-or-protected leaf path, and the dropped paths."""

    source: str
    dataset: str
    content_hash: str
    schema: InputSchema
    actions: dict[str, Action] = field(default_factory=dict)  # leaf path -> action (includes drops)
    unmentioned: list[str] = field(default_factory=list)  # leaf paths dropped by default deny
    sections: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    #: Checks run on every input batch before protection: fn(columns by leaf path, ctx) -> None; they raise
    #: (fail closed) or count into ctx.stats. Section compilers append to this list.
    checks: list[Callable[[Mapping[str, pa.Array], Any], None]] = field(default_factory=list)

    @property
    def output_actions(self) -> dict[str, Action]:
        """Leaf path -> action, for every leaf that reaches the output."""
        return {p: a for p, a in self.actions.items() if a.output_type() is not None}

    @property
    def dropped(self) -> list[str]:
        """Every leaf path absent from the output: explicit `drop` and default deny."""
        explicit = [p for p, a in self.actions.items() if a.output_type() is None]
        return sorted(explicit + self.unmentioned)

    def requires(self) -> set[str]:
        need: set[str] = set()
        for a in self.actions.values():
            need |= set(a.requires)
        return need

    def output_schema(self, classes: Mapping[str, str] | None = None) -> pa.Schema:
        """Arrow schema of the training output; each leaf carries its action and class as field metadata."""
        classes = classes or {}
        return pa.schema(
            _prune_fields(list(self.schema.arrow), "", self.output_actions, classes),
            metadata={b"cloakbeam.policy_sha256": self.content_hash.encode(), b"cloakbeam.dataset": self.dataset.encode()},
        )


def _prune_fields(fields: list[pa.Field], prefix: str, actions: Mapping[str, Action], classes: Mapping[str, str]) -> list[pa.Field]:
    out = []
    for f in fields:
        path = prefix + f.name
        if pa.types.is_struct(f.type):
            children = _prune_fields(list(f.type), path + ".", actions, classes)
            if children:
                out.append(pa.field(f.name, pa.struct(children), nullable=f.nullable))
            continue
        action = actions.get(path)
        if action is None:
            continue
        out_type = action.output_type()
        meta = {
            b"cloakbeam.action": json.dumps(action.describe(), sort_keys=True, default=str).encode(),
            b"cloakbeam.class": (classes.get(path) or action.field.declared_class or "OTHER").encode(),
        }
        nullable = f.nullable or out_type != f.type or action.name != "keep"
        out.append(pa.field(f.name, out_type, nullable=nullable, metadata=meta))
    return out


def load_policy(path: str | Path, schema: InputSchema) -> CompiledPolicy:
    """Read and compile a policy file against `schema`; raise PolicyError naming the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {p}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"policy file {p} is not valid YAML{where}") from None
    return compile_policy(raw, schema, source=str(p), text=text)


def compile_policy(raw: Any, schema: InputSchema, source: str = "<inline>", text: str | None = None) -> CompiledPolicy:
    if not isinstance(raw, dict):
        raise PolicyError(f"policy {source} must be a YAML mapping with a 'fields' section")
    _load_sections()
    try:
        return _compile(raw, schema, source, text)
    except PolicyError as exc:
        msg = str(exc)
        if source not in msg:
            raise PolicyError(f"policy {source}: {msg}") from None
        raise


def _compile(raw: dict[str, Any], schema: InputSchema, source: str, text: str | None) -> CompiledPolicy:
    unknown = sorted(set(raw) - _CORE_KEYS - set(_SECTIONS))
    if unknown:
        known = ", ".join(sorted(_CORE_KEYS | set(_SECTIONS)))
        raise PolicyError(f"unknown top-level key '{unknown[0]}'; allowed keys: {known}")
    version = raw.get("version", POLICY_VERSION)
    if version != POLICY_VERSION:
        raise PolicyError(f"policy version {version!r} is not supported; use 'version: {POLICY_VERSION}'")
    dataset = raw.get("dataset", "default")
    if not isinstance(dataset, str) or not dataset or not dataset.replace("-", "").replace("_", "").isalnum():
        raise PolicyError("'dataset' must be a non-empty name of letters, digits, '-' or '_'")
    fields = raw.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise PolicyError("the policy needs a 'fields' mapping from field path to action")

    canonical = json.dumps(raw, sort_keys=True, default=str)
    policy = CompiledPolicy(
        source=source,
        dataset=dataset,
        content_hash=hashlib.sha256((text if text is not None else canonical).encode()).hexdigest(),
        schema=schema,
        raw=raw,
    )
    leaf_actions: dict[str, Action] = {}
    record_rules: dict[str, tuple[str, dict[str, Any]]] = {}
    for path, spec in fields.items():
        if not isinstance(path, str) or path not in schema.fields:
            near = _closest(str(path), schema.fields)
            hint = f" (did you mean '{near}'?)" if near else ""
            raise PolicyError(f"field '{path}' is not in schema {schema.source}{hint}; remove it or fix its name")
        name, params = _split_spec(path, spec)
        info = schema.fields[path]
        cls = get_action(name) if name else None
        if cls is None:
            raise PolicyError(f"field '{path}' has no action; write e.g. '{path}: keep' or '{path}: {{action: drop}}'")
        if info.is_record:
            if not cls.applies_to_records:
                raise PolicyError(
                    f"field '{path}' is a record; action '{name}' applies to leaf fields only; name its fields by dotted path"
                )
            record_rules[path] = (name, params)
            continue
        leaf_actions[path] = cls(info, params)

    # Expand record-level keep/drop to leaves that are not named themselves; the innermost rule wins.
    for leaf in schema.leaf_paths:
        if leaf in leaf_actions:
            continue
        parents = [p for p in record_rules if leaf.startswith(p + ".")]
        if parents:
            name, params = record_rules[max(parents, key=len)]
            leaf_actions[leaf] = get_action(name)(schema.fields[leaf], params)
    # Keep the schema's field order.
    policy.actions = {p: leaf_actions[p] for p in schema.leaf_paths if p in leaf_actions}
    policy.unmentioned = [p for p in schema.leaf_paths if p not in leaf_actions]

    # Every section compiler runs, with None when its section is absent, so a section can enforce defaults
    # (classification fails closed even when the policy says nothing about it). A compiler may return None.
    for name, compiler in _SECTIONS.items():
        compiled = compiler(raw.get(name), schema, policy)
        if compiled is not None:
            policy.sections[name] = compiled
    return policy


def _split_spec(path: str, spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("action", None)
        if not isinstance(name, str):
            raise PolicyError(f"field '{path}' needs an 'action' key naming what to do with it")
        return name, params
    raise PolicyError(f"field '{path}' must map to an action name or a mapping with an 'action' key")


def _closest(name: str, candidates: Mapping[str, FieldInfo]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return match[0] if match else None
