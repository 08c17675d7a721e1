"""Every size and depth limit cloakbeam enforces, with its default, in one place (docs/limits-and-quarantine.md).

Record limits (`IngestLimits`) bound what a single input record may cost to parse; a record over a limit is
quarantined, never parsed further, and the run goes on. They are set per dataset in the policy's optional
`limits` section and recorded in every manifest under `limits`:

    limits:
      max_record_bytes: 8388608       # one JSONL/CSV line, Avro record or Parquet row (bytes)
      max_depth: 64                   # nesting of objects/arrays in one record
      quarantine_record_bytes: 65536  # bytes of a rejected record sealed into its quarantine entry

Document limits (YAML policies, config files, role policies) are fixed: `MAX_YAML_BYTES`, `MAX_YAML_DEPTH`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cloakbeam.errors import PolicyError

#: Largest YAML document (policy, config, role policy) cloakbeam reads, in bytes.
MAX_YAML_BYTES = 1 << 20
#: Deepest nesting of mappings/sequences in such a document.
MAX_YAML_DEPTH = 64


@dataclass(frozen=True)
class IngestLimits:
    """Per-record caps applied by ingest (transforms/ingest.py); picklable, JSON-able for the manifest."""

    max_record_bytes: int = 8 << 20
    max_depth: int = 64
    quarantine_record_bytes: int = 64 << 10

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_section(cls, raw: Any) -> IngestLimits:
        """Build from the policy's `limits` section (None = defaults); PolicyError names the bad key."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise PolicyError("'limits' must be a mapping of limit name to a positive whole number")
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for key, value in raw.items():
            if key not in known:
                raise PolicyError(f"unknown limit '{key}' in 'limits'; known limits: {', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"limit '{key}' must be a positive whole number")
            values[key] = value
        out = cls(**values)
        if out.max_depth > 500:
            raise PolicyError("limit 'max_depth' must be at most 500 (deeper records cannot be parsed safely)")
        return out
