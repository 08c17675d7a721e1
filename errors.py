"""Exception types shared by every cloakbeam layer.

Messages name fields, files, lines and offsets. They must never contain a record value or key material.
"""

from __future__ import annotations


class CloakbeamError(Exception):
    """Base class for every error cloakbeam raises on purpose."""


class ConfigError(CloakbeamError):
    """Bad policy, schema, key reference or option, found while the pipeline is built (CLI exit code 2)."""


class PolicyError(ConfigError):
    """The policy YAML is invalid; the message says what to fix."""


class SchemaError(ConfigError):
    """The Avro schema is invalid or unsupported."""


class KeyAccessError(CloakbeamError):
    """A key could not be loaded, unwrapped or used (missing, wrong, retired, unreadable keyring)."""


class ClassificationError(CloakbeamError):
    """Content contradicts a field's declared class (fail closed)."""


class ReconciliationError(CloakbeamError):
    """Manifest counts do not add up: input != written + quarantined + suppressed."""


class IntegrityError(CloakbeamError):
    """An artifact (cell, file, manifest, audit log) failed an integrity or authenticity check."""


class AccessDenied(CloakbeamError):
    """A role policy refused a decrypt or detokenize request."""


class UnknownValueError(CloakbeamError):
    """A value is not covered by a generalization hierarchy whose `on_unknown` is `error` (names field and count)."""
