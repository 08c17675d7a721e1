"""The compiled policy model and the registry of optional policy sections.

This is the low, shared half of the policy: every layer that reads a compiled policy (keys, transforms,
pipeline) imports `CompiledPolicy` from here, and every module that owns a top-level policy section
(`classification`, `k_anonymity`, `parquet_encryption`, ...) registers its compiler here with
`register_section`. The compiler that reads YAML and binds fields to actions is `cloakbeam.transforms.policy`.

Nothing here reads data; a policy never holds a record value.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cloakbeam.schemas.avro import InputSchema

if TYPE_CHECKING:  # the action base class lives in transforms; the model only reads its interface
    from cloakbeam.transforms.registry import Action

POLICY_VERSION = 1
CORE_KEYS = frozenset({"version", "dataset", "description", "fields"})

#: Optional top-level sections: name -> compiler(section_value, schema, policy_so_far) -> compiled object.
SectionCompiler = Callable[[Any, InputSchema, "CompiledPolicy"], Any]
_SECTIONS: dict[str, SectionCompiler] = {}


def register_section(name: str, compiler: SectionCompiler) -> None:
    """Let a module own a top-level policy section; its compiler raises PolicyError on bad content."""
    _SECTIONS[name] = compiler


def registered_sections() -> dict[str, SectionCompiler]:
    """The section compilers registered so far, in registration order."""
    return dict(_SECTIONS)


#: Files a policy names (hierarchy tables): (directory of the policy file, attachments) while one compiles.
_FILES: contextvars.ContextVar[tuple[str | None, dict[str, str]] | None] = contextvars.ContextVar("cloakbeam_policy_files", default=None)


@contextlib.contextmanager
def policy_files(base_dir: str | None, attachments: dict[str, str]) -> Iterator[dict[str, str]]:
    """While compiling: resolve files a policy names against `base_dir`, and record their text in `attachments`
    (path as written in the policy -> text). A worker compiles with the launcher's attachments, so it never
    needs the files themselves."""
    token = _FILES.set((base_dir, attachments))
    try:
        yield attachments
    finally:
        _FILES.reset(token)


def read_policy_file(path: str, what: str) -> str:
    """The text of a file the policy names (relative to the policy file); PolicyError with a sentence if unreadable.

    The text is attached to the compiled policy, so workers see exactly what the launcher validated."""
    from cloakbeam.errors import PolicyError

    ctx = _FILES.get()
    base, attachments = ctx if ctx is not None else (None, {})
    if path in attachments:
        return attachments[path]
    full = path if os.path.isabs(path) or "://" in path or base is None else os.path.join(base, path)
    try:
        if "://" in full:
            from cloakbeam.core import fsio

            with fsio.open_read(full) as fh:
                text = fh.read().decode("utf-8")
        else:
            with open(full, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable UTF-8 text"
        raise PolicyError(f"{what}: cannot read file {path} (relative to the policy file): {reason}") from None
    attachments[path] = text
    return text


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
    #: The policy file's text as read (what `content_hash` is the SHA-256 of); None for a policy built in code.
    text: str | None = None
    #: Checks run on every input batch before protection: fn(columns by leaf path, ctx) -> None; they raise
    #: (fail closed) or count into ctx.stats. Section compilers append to this list.
    checks: list[Callable[[Mapping[str, pa.Array], Any], None]] = field(default_factory=list)
    #: Files the policy names (hierarchy tables), path as written -> text; carried to workers with the policy.
    attachments: dict[str, str] = field(default_factory=dict)

    @property
    def output_actions(self) -> dict[str, Action]:
        """Leaf path -> action, for every leaf that reaches the output."""
        return {p: a for p, a in self.actions.items() if a.output_type() is not None}

    @property
    def dropped(self) -> list[str]:
        """Every leaf path absent from the output: explicit `drop` and default deny."""
        explicit = [p for p, a in self.actions.items() if a.output_type() is None]
        return sorted(explicit + self.unmentioned)

    def sealing_keys(self) -> set[str]:
        """Names of the reveal keys the policy's encrypt actions seal to (random mode) plus the default one,
        which quarantine records and vault originals use."""
        names = {"default"}
        for a in self.actions.values():
            if a.name == "encrypt" and not a.options.get("deterministic"):
                names.add(str(a.options.get("key") or "default"))
        return names

    def requires(self) -> set[str]:
        """Resources the actions need at run time (for example "vault", "keys")."""
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
