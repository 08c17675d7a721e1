"""RunStats: the counts a run carries from its workers to the manifest, as pipeline elements.

Beam metrics are not available on every runner (the DaskRunner ignores them), so every stage that counts
something emits a RunStats element next to its RecordBatches; a final combine merges them and the launcher
writes the manifest from the result. RunStats hold counts, file names and hashes only, never a value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FileStat:
    """One file a worker wrote and committed (data or quarantine)."""

    path: str  # relative to the output directory
    rows: int
    bytes: int
    sha256: str
    kind: str = "data"  # "data" | "quarantine"
    window: str | None = None
    split: str | None = None  # the train/validation/test partition of a data file (policy section `split`)

    def to_json(self) -> dict[str, Any]:
        d = {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256, "kind": self.kind}
        if self.window is not None:
            d["window"] = self.window
        if self.split is not None:
            d["split"] = self.split
        return d


@dataclass
class RunStats:
    """Mergeable counts. `counts` keys: input, written, quarantined, suppressed. `fields`: free-form counters
    such as "classify.ssn.US_SSN" or "scrub.notes.EMAIL". `reasons`: quarantine reason code -> count."""

    counts: Counter = field(default_factory=Counter)
    fields: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    files: list[FileStat] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # source path -> {bytes, sha256, records}
    extra: dict[str, Any] = field(default_factory=dict)  # section reports (k-anonymity, windows), JSON-able
    #: Stage timers: wall seconds per stage ("read", "protect", "protect.tokenize", "write", ...), measured with
    #: time.perf_counter in the workers and summed across workers and batches (so they can exceed the run's seconds).
    timers: Counter = field(default_factory=Counter)

    def add_time(self, stage: str, seconds: float) -> None:
        """Add wall seconds to a stage timer (Counter values are seconds here, not counts)."""
        self.timers[stage] += seconds  # type: ignore[assignment]

    def merge(self, other: RunStats) -> RunStats:
        self.counts.update(other.counts)
        self.fields.update(other.fields)
        self.reasons.update(other.reasons)
        self.timers.update(getattr(other, "timers", None) or {})
        self.files.extend(other.files)
        self.inputs.update(other.inputs)
        for k, v in other.extra.items():
            if isinstance(v, list) and isinstance(self.extra.get(k), list):
                self.extra[k] = self.extra[k] + v
            else:
                self.extra.setdefault(k, v)
        return self

    @classmethod
    def merged(cls, items: Iterable[RunStats]) -> RunStats:
        out = cls()
        for s in items:
            out.merge(s)
        out.files.sort(key=lambda f: f.path)
        return out


def is_stats(element: Any) -> bool:
    return isinstance(element, RunStats)
