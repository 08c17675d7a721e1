"""Release evidence after a run: measured re-identification risk and ML utility, for the manifest's `risk` and
`utility` sections. Called by the launcher (`run --evaluate`, `demo`) and by `cloakbeam evaluate`.

Where it runs and what it holds: in the launching process, after the pipeline has committed its files, reading
the raw input (the adversary's knowledge) and the released files the manifest lists (so a staged or nested
output layout is followed, never guessed). The linkage attack streams every record, batch by batch, and keeps only
counts per released quasi-identifier class (memory grows with the number of classes). The membership test and the
models use bounded uniform samples (`sample` rows, default 20,000, which is also the DCR reference set).
Nothing it computes is written except figures: no value, no digest, no row.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cloakbeam.core import fsio
from cloakbeam.errors import ConfigError
from cloakbeam.pipeline import risk as _risk
from cloakbeam.pipeline import utility as _utility
from cloakbeam.transforms.generalize import canonical_string
from cloakbeam.transforms.protect import flatten_columns

DEFAULT_SAMPLE = 20_000
DCR_CANDIDATES = 1_000
QI_CLASSES = frozenset({"DATE_OF_BIRTH", "POSTAL_CODE", "GENDER", "AGE", "ZIP"})
FEATURE_ACTIONS = frozenset({"keep", "generalize"})
SPLIT_COLUMN = "split"


@dataclass
class EvaluationSettings:
    """What one evaluation reads; `keys` is an open KeyService when the raw rows' splits can be recomputed."""

    inputs: Sequence[str]
    label: str | None = None
    holdout: Sequence[str] = ()
    input_format: str | None = None
    sample: int = DEFAULT_SAMPLE
    seed: int = 0
    keys: Any = None
    batch_size: int = 65_536


# ------------------------------------------------------------------------------------------------ reading
def _match(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for p in patterns:
        if fsio.is_local(p):
            found = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.exists(p) else [])
        else:
            from apache_beam.io.filesystems import FileSystems

            found = [m.path for m in FileSystems.match([p])[0].metadata_list]
        if not found:
            raise ConfigError(f"evaluation input {p} matches no file")
        files.extend(found)
    return files


def _open(path: str) -> Any:
    if fsio.is_local(path):
        return open(path, "rb")
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path)


def raw_batches(patterns: Sequence[str], schema: Any, fmt: str | None, batch_size: int) -> Iterator[pa.Table]:
    """Parsed raw records as flat tables (leaf paths as column names); records that fail to parse are skipped."""
    from cloakbeam.transforms.ingest import Rejected, detect_format, read_source

    for path in _match(patterns):
        with _open(path) as fh:
            for item in read_source(fh, path, detect_format(path, fmt), schema, batch_size):
                if isinstance(item, Rejected) or item.num_rows == 0:
                    continue
                yield pa.table(flatten_columns(item))


def released_batches(out_dir: str, manifest: Mapping[str, Any]) -> Iterator[pa.Table]:
    """The released rows file by file (as the manifest lists them), flat, with their split as a column."""
    for entry in manifest.get("outputs", []):
        path = fsio.join(out_dir, entry["path"])
        try:
            with _open(path) as fh:
                table = pq.read_table(fh)
        except (OSError, pa.ArrowException):
            raise ConfigError(f"released file {entry['path']} cannot be read for evaluation (Parquet modular encryption needs "
                              "the reader's keys); evaluate a release without it") from None
        flat = pa.table(flatten_columns(table.combine_chunks())) if table.num_rows else pa.table(flatten_columns(table))
        if entry.get("split"):
            flat = flat.append_column(SPLIT_COLUMN, pa.array([entry["split"]] * flat.num_rows, pa.string()))
        yield flat


class UniformSample:
    """A uniform random sample of at most `size` rows over a stream of tables (bounded memory: size + one table)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.table: pa.Table | None = None
        self.priority = np.zeros(0)
        self.seen = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.seen += table.num_rows
        pri = self.rng.random(table.num_rows)
        if self.table is None:
            merged, pris = table, pri
        else:
            merged = pa.concat_tables([self.table, table.select(self.table.column_names)], promote_options="permissive")
            pris = np.r_[self.priority, pri]
        if len(pris) > self.size:
            keep = np.sort(np.argpartition(pris, self.size - 1)[: self.size])
            merged, pris = merged.take(pa.array(keep)), pris[keep]
        self.table, self.priority = merged.combine_chunks(), pris

    def result(self) -> pa.Table | None:
        return self.table


# ------------------------------------------------------------------------------------------------ views
def adversary_views(policy: Any, manifest: Mapping[str, Any]) -> dict[str, Callable[[pa.Array, Mapping[str, pa.Array]], pa.Array]]:
    """Per output field whose released form anyone can compute from the raw value and the published policy (kept
    and generalized fields, k-anonymity QIs at their chosen level): raw column -> released form as strings."""
    kanon = policy.sections.get("k_anonymity")
    levels = ((manifest.get("sections", {}).get("k_anonymity") or {}).get("batch") or {}).get("levels") or {}
    qis = {q.path: q.hierarchy for q in kanon.spec.qis} if kanon is not None else {}
    views: dict[str, Callable[[pa.Array, Mapping[str, pa.Array]], pa.Array]] = {}
    from cloakbeam.transforms.registry import ActionContext

    ctx = ActionContext(None)

    def level_view(h: Any, lv: int) -> Callable[[pa.Array, Mapping[str, pa.Array]], pa.Array]:
        return lambda col, cols: h.apply(canonical_string(col), lv)

    def action_view(a: Any) -> Callable[[pa.Array, Mapping[str, pa.Array]], pa.Array]:
        return lambda col, cols: canonical_string(a.apply(col, cols, ctx))

    for path, action in policy.output_actions.items():
        if path in qis:
            if path not in levels:
                continue  # streaming runs release per-window levels: no single published level to apply
            views[path] = level_view(qis[path], int(levels[path]["level"]))
        elif action.name in FEATURE_ACTIONS:
            views[path] = action_view(action)
    return views


def quasi_identifiers(policy: Any, manifest: Mapping[str, Any]) -> list[str]:
    kanon = policy.sections.get("k_anonymity")
    if kanon is not None:
        return [q.path for q in kanon.spec.qis]
    fields = manifest.get("fields", {})
    return [p for p in policy.output_actions if fields.get(p, {}).get("class") in QI_CLASSES]


def _released_form(table: pa.Table, fields: Sequence[str]) -> list[pa.Array]:
    return [canonical_string(table.column(f).combine_chunks()) for f in fields]


def _adversary_form(table: pa.Table, fields: Sequence[str], views: Mapping[str, Callable[..., pa.Array]]) -> list[pa.Array]:
    cols = {n: table.column(n).combine_chunks() for n in table.column_names}
    return [views[f](cols[f], cols) for f in fields]


# ------------------------------------------------------------------------------------------------ evaluate
def check_label(policy: Any, label: str | None) -> None:
    """A label given for evaluation must be released in clear (`keep`); raise ConfigError with a sentence otherwise."""
    if label is None:
        return
    action = policy.output_actions.get(label)
    if action is None:
        raise ConfigError(f"--label {label} is not a field the policy releases; name a kept field such as the training label")
    if action.name != "keep":
        raise ConfigError(f"--label {label} is released with action '{action.name}'; a training label must be kept in clear")


def evaluate_release(policy: Any, manifest: Mapping[str, Any], out_dir: str, settings: EvaluationSettings) -> dict[str, Any]:
    """Return {"risk": ..., "utility": ...} for the release in `out_dir` described by `manifest`."""
    if settings.sample < 100:
        raise ConfigError("--evaluate-sample must be at least 100 rows")
    views = adversary_views(policy, manifest)
    qis = quasi_identifiers(policy, manifest)
    linkable = [q for q in qis if q in views]
    kanon = policy.sections.get("k_anonymity")
    k = kanon.spec.k if kanon is not None else None

    population, released_counts = _risk.ClassCounter(), _risk.ClassCounter()
    raw_sample, rel_sample = UniformSample(settings.sample, settings.seed), UniformSample(settings.sample, settings.seed + 1)
    for t in raw_batches(settings.inputs, policy.schema, settings.input_format, settings.batch_size):
        if linkable:
            population.add(_risk.class_key(_adversary_form(t, linkable, views)))
        raw_sample.add(t)
    for t in released_batches(out_dir, manifest):
        if linkable:
            released_counts.add(_risk.class_key(_released_form(t, linkable)))
        rel_sample.add(t)
    raw, rel = raw_sample.result(), rel_sample.result()
    if raw is None or rel is None:
        return {"risk": {"measured": False, "reason": "no parsed input or no released rows"},
                "utility": {"measured": False, "reason": "no parsed input or no released rows"}}

    risk: dict[str, Any] = {"measured": True, "quasi_identifiers": qis, "linkable_quasi_identifiers": linkable,
                            "adversary": "holds the raw quasi-identifiers (with names) of every input record and the published generalization"}
    if linkable:
        risk["linkage"] = _risk.linkage_risk(released_counts.table(), population.table(), k)
        risk["statement"] = risk["linkage"]["statement"]
    else:
        risk["linkage"] = None
        risk["statement"] = "no quasi-identifier is released in a form an adversary can compute: linkage on QIs is not possible"
    risk["membership_inference"] = _membership(policy, raw, rel, views, settings, rel_sample.seen)

    utility = _utility_section(policy, raw, rel, settings, views)
    utility["sample"] = {"raw_rows_seen": raw_sample.seen, "released_rows_seen": rel_sample.seen,
                         "raw_rows_used": raw.num_rows, "released_rows_used": rel.num_rows, "sample_limit": settings.sample}
    return {"risk": risk, "utility": utility}


def _membership(policy: Any, raw: pa.Table, rel: pa.Table, views: Mapping[str, Callable[..., pa.Array]], settings: EvaluationSettings,
                released_total: int) -> dict[str, Any]:
    """DCR test: members are raw input records, non-members held-out records; both seen in released form."""
    if not settings.holdout:
        return {"measured": False,
                "reason": "no held-out records were given (pass --holdout with records of the same population that the run did not see)"}
    hold = UniformSample(DCR_CANDIDATES, settings.seed + 2)
    for t in raw_batches(settings.holdout, policy.schema, settings.input_format, settings.batch_size):
        hold.add(t)
    nonmembers = hold.result()
    fields = [f for f in views if f in rel.column_names]
    if nonmembers is None or not fields:
        return {"measured": False, "reason": "no held-out record parsed" if nonmembers is None else "no released field an adversary can compute"}
    # Members drawn at random from the raw sample, the reference is the whole released sample: slicing either would
    # pair early input rows with early output files and overstate the attack.
    rng = np.random.default_rng(settings.seed + 3)
    members = raw.take(pa.array(np.sort(rng.choice(raw.num_rows, min(DCR_CANDIDATES, raw.num_rows), replace=False))))
    reference = rel
    kept = {p for p, a in policy.output_actions.items() if a.name == "keep"}
    kinds = {f: ("number" if f in kept and _utility.feature_kind(rel.schema.field(f).type) == "number" and rel.schema.field(f).type != pa.bool_()
                 else "category") for f in fields}

    def view(table: pa.Table, adversary: bool) -> dict[str, pa.Array]:
        cols = {n: table.column(n).combine_chunks() for n in table.column_names}
        out: dict[str, pa.Array] = {}
        for f in fields:
            if kinds[f] == "number":  # a kept number: the released value is the raw value
                out[f] = pa.array(_utility.numbers(cols[f]), pa.float64())
            else:
                out[f] = views[f](cols[f], cols) if adversary else canonical_string(cols[f])
        return out

    m, h, r = _risk.encode_features([view(members, True), view(nonmembers, True), view(reference, False)], kinds)
    is_number = np.array([kinds[f] == "number" for f in fields])
    result = _risk.membership_inference(_risk.distance_to_closest(m, r, is_number), _risk.distance_to_closest(h, r, is_number))
    share = reference.num_rows / max(released_total, 1)
    if share < 1:
        result["statement"] += (f"; a lower bound: the reference is a {share:.0%} sample of the release, so some members' "
                                "released records are not in it (raise --evaluate-sample to tighten it)")
    result.update(measured=True, features=fields, reference_rows=int(reference.num_rows), reference_share=round(share, 4),
                  adversary="holds each candidate's full raw record and the published policy")
    return result


def _split_rows(table: pa.Table, policy: Any, keys: Any, seed: int, released: bool) -> tuple[np.ndarray, str]:
    """Boolean masks (train, test) per row and how they were chosen."""
    section = policy.sections.get("split")
    names = section.spec.names if section is not None else []
    test_name = "test" if "test" in names else (names[-1] if names else None)
    train_name = "train" if "train" in names else (names[0] if names else None)
    labels = None
    how = "seeded random 80/20 (the policy declares no split)"
    if released and SPLIT_COLUMN in table.column_names:
        labels = table.column(SPLIT_COLUMN).combine_chunks()
        how = "the release's subject-disjoint split"
    elif not released and section is not None and keys is not None:
        from cloakbeam.transforms.split import KEY_PURPOSE, assign

        labels = assign(table.column(section.spec.by).combine_chunks(), keys.prf_key(KEY_PURPOSE), section.spec).cast(pa.string())
        how = "the release's subject-disjoint split, recomputed on the raw rows with the keyring"
    if labels is not None and train_name is not None:
        lab = labels.cast(pa.string())
        train = np.asarray(pc.fill_null(pc.equal(lab, train_name), False).to_numpy(zero_copy_only=False), dtype=bool)
        test = np.asarray(pc.fill_null(pc.equal(lab, test_name), False).to_numpy(zero_copy_only=False), dtype=bool)
        return np.stack([train, test]), how
    rng = np.random.default_rng(seed)
    u = rng.random(table.num_rows)
    if section is not None and not released:
        how = "seeded random 80/20 (no keyring to recompute the subject split)"
    return np.stack([u < 0.8, u >= 0.8]), how


def _utility_section(policy: Any, raw: pa.Table, rel: pa.Table, settings: EvaluationSettings, views: Mapping[str, Any]) -> dict[str, Any]:
    label = settings.label
    if label is None:
        labels = [p for p, f in policy.schema.fields.items() if getattr(f, "declared_class", None) == "LABEL"]
        label = labels[0] if labels else None
    if label is None:
        return {"measured": False, "reason": "no label: pass --label FIELD (or declare a field's class LABEL in the schema)"}
    if label not in raw.column_names or label not in rel.column_names:
        raise ConfigError(f"label '{label}' is not a released field; choose a field the policy keeps")
    split = policy.sections.get("split")
    subject = split.spec.by if split is not None else None
    actions = {p: a.name for p, a in policy.output_actions.items()}
    features = [p for p, a in actions.items()
                if a in FEATURE_ACTIONS and p not in (label, subject) and p in rel.column_names and p in raw.column_names
                and _utility.feature_kind(rel.schema.field(p).type) and _utility.feature_kind(raw.schema.field(p).type)]
    if not features:
        return {"measured": False, "reason": "no kept or generalized feature to train on"}
    (rtr, rte), how_raw = _split_rows(raw, policy, settings.keys, settings.seed, released=False)
    (str_, ste), how_rel = _split_rows(rel, policy, settings.keys, settings.seed, released=True)
    try:
        raw_scores = _utility.train_and_score(raw.filter(pa.array(rtr)), raw.filter(pa.array(rte)), features, label)
        rel_scores = _utility.train_and_score(rel.filter(pa.array(str_)), rel.filter(pa.array(ste)), features, label)
    except ValueError as exc:  # a label that is not binary: the message names the label and counts, never a value
        return {"measured": False, "label": label, "reason": str(exc)}
    out: dict[str, Any] = {
        "measured": bool(raw_scores.get("measured") and rel_scores.get("measured")),
        "label": label,
        "model": _utility.MODEL,
        "features": features,
        "split": {"raw": how_raw, "released": how_rel},
        "raw": raw_scores,
        "released": rel_scores,
        "information_loss": _utility.information_loss(raw, rel, features, actions),
    }
    if out["measured"]:
        out["auc_change"] = round(rel_scores["auc"] - raw_scores["auc"], 4)
        out["accuracy_change"] = round(rel_scores["accuracy"] - raw_scores["accuracy"], 4)
        out["summary"] = (f"AUC raw {raw_scores['auc']:.3f} -> released {rel_scores['auc']:.3f} ({out['auc_change']:+.3f}); "
                          f"accuracy {raw_scores['accuracy']:.3f} -> {rel_scores['accuracy']:.3f}")
    return out
