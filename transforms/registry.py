"""The action registry: every policy word (`keep`, `drop`, `mask`, `encrypt`, ...) maps to one Action class.

An Action is validated once, when the policy is compiled (bad parameters fail pipeline construction with a
sentence that names the field and says what to fix), and then applied to whole Arrow columns. Actions import
nothing from Beam. A policy that names an unregistered action fails at construction: it never passes data
through.

Modules that define actions register them with `@register`; `load_builtin_actions()` imports those modules.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import FieldInfo

# Modules whose import registers actions. A module that does not exist yet is skipped, so each protection
# issue lands its module without touching this list's readers.
BUILTIN_ACTION_MODULES = (
    "cloakbeam.transforms.basic",
    "cloakbeam.transforms.masking",
    "cloakbeam.transforms.pseudonymize",
    "cloakbeam.transforms.scrub",
    "cloakbeam.transforms.encrypt",
    "cloakbeam.transforms.tokenize",
    "cloakbeam.transforms.generalize",
)

_REGISTRY: dict[str, type[Action]] = {}


@dataclass(frozen=True)
class Param:
    """Declaration of one action parameter: its type(s), whether required, default and allowed values."""

    types: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error sentence, or None when fine
    doc: str = ""


class ActionContext:
    """Per-worker resources an action may use, created in `DoFn.setup()` from a picklable RuntimeConfig.

    Holds key and vault handles lazily, and a Counter of statistics that the pipeline carries to the manifest.
    Counters hold counts only, never values.
    """

    def __init__(self, runtime: Any = None) -> None:
        self.runtime = runtime
        self.stats: Counter[str] = Counter()
        #: Wall seconds per action family ("tokenize", "scrub", ...) and "classify" (the policy's batch checks),
        #: summed over batches by `protect_batch`; the Protect step carries them as stage timers "protect.<name>".
        self.timers: Counter[str] = Counter()
        #: Rows an action could not protect, as (boolean row mask, reason code, field path); see reject_rows.
        self.rejections: list[tuple[Any, str, str]] = []
        self._keys: Any = None
        self._vault: Any = None

    @property
    def run_id(self) -> str:
        return getattr(self.runtime, "run_id", "local")

    @property
    def dataset_id(self) -> str:
        return getattr(self.runtime, "dataset_id", "default")

    @property
    def keys(self) -> Any:
        """The KeyService (see cloakbeam.keys), opened on first use from the runtime's key reference."""
        if self._keys is None:
            from cloakbeam.keys.service import open_key_service

            self._keys = open_key_service(self.runtime.keys)
        return self._keys

    @property
    def vault(self) -> Any:
        """The token vault, opened on first use from the runtime's vault reference."""
        if self._vault is None:
            from cloakbeam.vault import open_vault  # provided by the vault issue

            self._vault = open_vault(self.runtime.vault, self.keys)
        return self._vault

    def reject_rows(self, mask: Any, reason: str, field: str) -> None:
        """Mark rows of the current batch that this action cannot protect (for example a value too short for
        its token format). They leave the output and go to the quarantine; the run goes on. `reason` is a code
        such as "invalid_value", never a value."""
        import numpy as np

        m = np.asarray(mask, dtype=bool)
        if m.any():
            self.rejections.append((m, reason, field))

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.stats[key] += int(n)

    def close(self) -> None:
        for handle in (self._vault, self._keys):
            close = getattr(handle, "close", None)
            if close is not None:
                close()
        self._vault = self._keys = None


class Action:
    """Base class of protection actions. Subclasses set `name`, declare `params`, and implement `apply`.

    `apply` receives the input column at this action's path and a mapping of every input leaf column (for
    actions that read a linked field), and returns the protected column. It must be vectorized over the
    column and must never put a value in an exception message, a log line or a counter name.
    """

    name: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    #: True when the action may be applied to a record (struct) path as a whole (`keep`, `drop`).
    applies_to_records: ClassVar[bool] = False
    #: Arrow type predicates this action accepts; empty means any type.
    accepts: ClassVar[tuple[Callable[[pa.DataType], bool], ...]] = ()
    #: Resources the action needs at run time: "keys", "vault".
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, field: FieldInfo, params: Mapping[str, Any]) -> None:
        self.field = field
        self.options = self._validate(dict(params))
        self.configure()

    # -- construction -------------------------------------------------------------------------------
    def fail(self, sentence: str) -> PolicyError:
        """Build a PolicyError that names this field and action."""
        return PolicyError(f"field '{self.field.path}' (action '{self.name}'): {sentence}")

    def _validate(self, raw: dict[str, Any]) -> dict[str, Any]:
        odd = [k for k in raw if not isinstance(k, str)]
        if odd:
            raise self.fail(f"parameter names must be words; found a {type(odd[0]).__name__} key")
        unknown = sorted(set(raw) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise self.fail(f"unknown parameter '{unknown[0]}'; allowed parameters: {allowed}")
        if self.accepts and not self.field.is_record and not any(p(self.field.arrow_type) for p in self.accepts):
            raise self.fail(f"cannot be applied to a column of type {self.field.arrow_type}")
        if self.field.is_record and not self.applies_to_records:
            raise self.fail("applies to leaf fields only; name the record's fields one by one")
        out: dict[str, Any] = {}
        for key, spec in self.params.items():
            if key not in raw:
                if spec.required:
                    raise self.fail(f"parameter '{key}' is required")
                out[key] = spec.default
                continue
            value = raw[key]
            if isinstance(value, bool) and spec.types in (int, (int,), float, (int, float)):
                raise self.fail(f"parameter '{key}' must be a number, not true/false")
            if not isinstance(value, spec.types):
                names = spec.types.__name__ if isinstance(spec.types, type) else "/".join(t.__name__ for t in spec.types)
                raise self.fail(f"parameter '{key}' must be of type {names}")
            if spec.choices is not None and value not in spec.choices:
                raise self.fail(f"parameter '{key}' must be one of {', '.join(map(str, spec.choices))}")
            if spec.check is not None:
                problem = spec.check(value)
                if problem:
                    raise self.fail(f"parameter '{key}' {problem}")
            out[key] = value
        return out

    def configure(self) -> None:
        """Hook for cross-parameter checks; raise `self.fail(...)` on a bad combination."""

    # -- schema -------------------------------------------------------------------------------------
    def output_type(self) -> pa.DataType | None:
        """Arrow type of the protected column, or None when the column is removed from the output."""
        return self.field.arrow_type

    def describe(self) -> dict[str, Any]:
        """Action and non-secret parameters, for Parquet metadata and the manifest."""
        return {"action": self.name, **{k: v for k, v in self.options.items() if v is not None}}

    # -- run time -----------------------------------------------------------------------------------
    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        raise NotImplementedError


def register(cls: type[Action]) -> type[Action]:
    """Class decorator: make `cls.name` usable in policies."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no action name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"action '{cls.name}' is registered twice ({existing.__qualname__}, {cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def load_builtin_actions() -> None:
    for mod in BUILTIN_ACTION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def get_action(name: str) -> type[Action]:
    load_builtin_actions()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PolicyError(
            f"unknown action '{name}'; registered actions: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_actions() -> list[str]:
    load_builtin_actions()
    return sorted(_REGISTRY)
