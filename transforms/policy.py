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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloakbeam.core.policy import CORE_KEYS, POLICY_VERSION, CompiledPolicy, policy_files, registered_sections
from cloakbeam.core.safeyaml import read_yaml_file
from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import FieldInfo, InputSchema
from cloakbeam.transforms.registry import Action, get_action

__all__ = ["CompiledPolicy", "compile_policy", "load_policy", "SECTION_MODULES"]

#: Modules that own a policy section (they call `cloakbeam.core.policy.register_section` when imported).
SECTION_MODULES = (
    "cloakbeam.transforms.ingest",  # limits
    "cloakbeam.transforms.classify",
    "cloakbeam.transforms.kanon",
    "cloakbeam.transforms.uniqueness",  # after kanon: it reads the declared quasi-identifiers
    "cloakbeam.transforms.split",
    "cloakbeam.transforms.dp",
    "cloakbeam.keys.parquet_encryption",
)


def _load_sections() -> None:
    import importlib

    for mod in SECTION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def load_policy(path: str | Path, schema: InputSchema) -> CompiledPolicy:
    """Read and compile a policy file against `schema`; raise PolicyError naming the file and the field."""
    p = Path(path)
    # Strict YAML: no aliases or anchors, no repeated key, bounded size and depth (cloakbeam.core.safeyaml).
    text, raw = read_yaml_file(p, what="policy file", error=PolicyError)
    return compile_policy(raw, schema, source=str(p), text=text)


def compile_policy(raw: Any, schema: InputSchema, source: str = "<inline>", text: str | None = None,
                   attachments: Mapping[str, str] | None = None) -> CompiledPolicy:
    """Compile a parsed policy. Files it names (hierarchy tables) are read relative to `source`'s directory,
    unless `attachments` (path as written -> text, from the launcher's compile) already holds them."""
    if not isinstance(raw, dict):
        raise PolicyError(f"policy {source} must be a YAML mapping with a 'fields' section")
    _load_sections()
    base = None if source.startswith("<") else (str(Path(source).parent) if "://" not in source else source.rsplit("/", 1)[0])
    files = dict(attachments or {})
    try:
        with policy_files(base, files):
            policy = _compile(raw, schema, source, text)
        policy.attachments = files
        return policy
    except PolicyError as exc:
        msg = str(exc)
        if source not in msg:
            raise PolicyError(f"policy {source}: {msg}") from None
        raise


def _compile(raw: dict[str, Any], schema: InputSchema, source: str, text: str | None) -> CompiledPolicy:
    sections = registered_sections()
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise PolicyError(f"every top-level key must be a name; found a {type(odd[0]).__name__} key")
    unknown = sorted(set(raw) - CORE_KEYS - set(sections))
    if unknown:
        known = ", ".join(sorted(CORE_KEYS | set(sections)))
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

    # The hash is of the policy's text, as reviewed; only a policy built in code (no text) hashes its canonical
    # JSON form. Never expand the document when text is at hand.
    digest_of = text if text is not None else json.dumps(raw, sort_keys=True, default=str)
    policy = CompiledPolicy(
        source=source,
        dataset=dataset,
        content_hash=hashlib.sha256(digest_of.encode()).hexdigest(),
        schema=schema,
        raw=raw,
        text=text,
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
    for action in policy.actions.values():  # cross-field checks (e.g. a `subject:` field must exist)
        check = getattr(action, "check_schema", None)
        if check is not None:
            check(schema)

    # Every section compiler runs, with None when its section is absent, so a section can enforce defaults
    # (classification fails closed even when the policy says nothing about it). A compiler may return None.
    for name, compiler in sections.items():
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
