"""Measured re-identification risk of a release: a linkage attack and a membership-inference test.

Plain functions over Arrow columns and numpy arrays; they return counts, shares and scores, never a value.

Linkage attack. The adversary holds the raw quasi-identifiers (QIs) of everyone in the input, with names (the
voter-file scenario), and the published generalization (the manifest says which level each QI was released at).
They generalize their table the same way and join it to the released QIs. With f_j the size of released class j
and F_j the number of the adversary's records with the same released QIs (ARX / El Emam's definitions):

    prosecutor (target known to be in the release):  record risk 1/f_j; highest 1/min f_j; expected re-ids = #classes
    journalist (target may not be in the release):    record risk 1/F_j; highest 1/min F_j
    marketer   (re-identify as many as possible):     expected share (1/n) sum_j f_j / F_j; expected re-ids n * share

`uniquely_matched` counts the released records whose QIs match exactly one record of the adversary's table (F_j = 1):
those are re-identified with certainty.

Membership inference. Distance to the closest released record (DCR): for each candidate raw record the adversary
computes the distance (mean over features of 0/1 for categories, |a-b|/range for numbers) to its nearest released
record, after generalizing the candidate's QIs as published. Members (records given to the run) lie closer than
non-members (held-out records of the same population) when the release leaks membership; the test reports the ROC
AUC of "closer means member" and the advantage max(TPR - FPR) (0: no better than guessing, 1: certain).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SEP = "\x1f"
_NULL = "\x1e"


def class_key(columns: Sequence[pa.Array]) -> pa.Array:
    """One string per row joining the (released-form) QI values; nulls distinct from every string."""
    filled = [pc.fill_null(c.cast(pa.string()), _NULL) for c in columns]
    if len(filled) == 1:
        return filled[0]
    return pc.binary_join_element_wise(*filled, _SEP)


class ClassCounter:
    """Counts rows per class key, batch by batch; memory grows with the number of distinct classes only."""

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._pending = 0

    def add(self, keys: pa.Array) -> None:
        if not len(keys):
            return
        t = pa.table({"k": keys}).group_by("k", use_threads=False).aggregate([([], "count_all")])
        self._parts.append(t.rename_columns(["k", "n"]))
        self._pending += t.num_rows
        if self._pending > 500_000 and len(self._parts) > 1:
            self._parts = [self.table()]
            self._pending = self._parts[0].num_rows

    def table(self) -> pa.Table:
        if not self._parts:
            return pa.table({"k": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
        t = pa.concat_tables(self._parts)
        return t.group_by("k", use_threads=False).aggregate([("n", "sum")]).rename_columns(["k", "n"]).combine_chunks()


def linkage_risk(released: pa.Table, population: pa.Table, k: int | None) -> dict[str, Any]:
    """Risk figures from released class sizes f and the adversary's class sizes F (tables of k, n)."""
    if released.num_rows == 0:
        return {"records_released": 0, "classes": 0, "measured": True, "statement": "nothing was released"}
    joined = released.join(population, "k", join_type="left outer", right_suffix="_pop")
    f = joined.column("n").to_numpy().astype(np.float64)
    F_raw = pc.fill_null(joined.column("n_pop"), 0).to_numpy().astype(np.float64)
    # A released class absent from (or smaller in) the adversary's table means the representations disagree or
    # the release holds records the adversary lacks; F >= f keeps every figure a valid upper bound for that class.
    mismatched = int((F_raw < f).sum())
    F = np.maximum(F_raw, f)
    n = float(f.sum())
    marketer_share = float((f / F).sum() / n)
    out: dict[str, Any] = {
        "records_released": int(n),
        "classes": int(len(f)),
        "smallest_class": int(f.min()),
        "smallest_population_class": int(F.min()),
        "uniquely_matched": int(f[F == 1].sum()),
        "uniquely_matched_share": round(float(f[F == 1].sum() / n), 6),
        "prosecutor": {"highest_risk": round(float(1.0 / f.min()), 6), "average_risk": round(len(f) / n, 6),
                       "expected_reidentifications": round(float(len(f)), 3)},
        "journalist": {"highest_risk": round(float(1.0 / F.min()), 6), "average_risk": round(marketer_share, 6),
                       "expected_reidentifications": round(float((f / F).sum()), 3)},
        "marketer": {"expected_share": round(marketer_share, 6), "expected_reidentifications": round(marketer_share * n, 3)},
        "classes_not_in_adversary_table": mismatched,
    }
    if k is not None:
        small = f < k
        out["k_target"] = k
        out["records_in_classes_below_k"] = int(f[small].sum())
        out["meets_k"] = bool(not small.any())
        out["statement"] = (
            f"meets k={k}: every released record shares its released quasi-identifiers with at least {int(f.min())} released records"
            if out["meets_k"] else
            f"does not meet k={k}: {int(f[small].sum()):,} released records are in classes smaller than {k} (smallest {int(f.min())})"
        )
    else:
        out["statement"] = (f"no k target declared; smallest released class {int(f.min())}, "
                            f"{out['uniquely_matched']:,} records matched uniquely")
    return out


# ------------------------------------------------------------------------------------------------ DCR
def encode_features(tables: Sequence[Mapping[str, pa.Array]], kinds: Mapping[str, str]) -> list[np.ndarray]:
    """Encode the same features of several tables consistently: categories as shared integer codes (-1 = null),
    numbers scaled to [0, 1] by the pooled range (NaN = null). Returns one (rows, features) float matrix per table."""
    mats: list[list[np.ndarray]] = [[] for _ in tables]
    for name, kind in kinds.items():
        cols = [t[name] for t in tables]
        if kind == "number":
            vals = [np.asarray(pc.fill_null(c.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols]
            pooled = np.concatenate(vals) if vals else np.zeros(0)
            lo, hi = (np.nanmin(pooled), np.nanmax(pooled)) if np.isfinite(pooled).any() else (0.0, 1.0)
            span = (hi - lo) or 1.0
            for i, v in enumerate(vals):
                mats[i].append((v - lo) / span)
        else:
            strings = [c.cast(pa.string()) for c in cols]
            dictionary = pc.unique(pa.chunked_array(strings, pa.string())).drop_null() if strings else pa.array([], pa.string())
            for i, s in enumerate(strings):
                idx = pc.index_in(s, value_set=dictionary)
                mats[i].append(np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.float64) + 0.0)
    return [np.column_stack(m) if m else np.zeros((len(next(iter(t.values()))) if t else 0, 0)) for m, t in zip(mats, tables)]


def distance_to_closest(candidates: np.ndarray, released: np.ndarray, is_number: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Per candidate row, the smallest mean per-feature distance to any released row (chunked; bounded memory).

    Categories: 0 when equal, 1 otherwise (a null never equals anything); numbers: |a - b| capped at 1, 1 when
    either is null."""
    out = np.empty(len(candidates), np.float64)
    n_features = candidates.shape[1] if candidates.ndim == 2 else 0
    if not len(released) or not n_features:
        out[:] = 1.0
        return out
    num = is_number.astype(bool)
    cat = ~num
    rc = np.where(released[:, cat] < 0, -1, released[:, cat]).astype(np.int32)
    cc_all = np.where(candidates[:, cat] < 0, -2, candidates[:, cat]).astype(np.int32)
    rn = released[:, num].astype(np.float32)
    cn_all = candidates[:, num].astype(np.float32)
    for s in range(0, len(candidates), chunk):
        total = np.zeros((min(chunk, len(candidates) - s), len(released)), np.float32)
        if cat.any():
            total += (cc_all[s:s + chunk, None, :] != rc[None, :, :]).sum(axis=2, dtype=np.int16)
        if num.any():
            d = np.abs(cn_all[s:s + chunk, None, :] - rn[None, :, :])
            total += np.minimum(np.nan_to_num(d, nan=1.0), 1.0).sum(axis=2)
        out[s:s + chunk] = total.min(axis=1) / n_features
    return out


def membership_inference(member_dcr: np.ndarray, nonmember_dcr: np.ndarray) -> dict[str, Any]:
    """AUC and advantage of the attack "a candidate closer to the release is a member"."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_dcr)), np.zeros(len(nonmember_dcr))]
    score = -np.r_[member_dcr, nonmember_dcr]
    auc = float(roc_auc_score(y, score))
    fpr, tpr, _ = roc_curve(y, score)
    adv = float(np.max(tpr - fpr))
    level = "low" if adv < 0.1 else ("moderate" if adv < 0.3 else "high")
    return {
        "method": "distance to closest released record (DCR)",
        "members": int(len(member_dcr)),
        "non_members": int(len(nonmember_dcr)),
        "auc": round(auc, 4),
        "advantage": round(adv, 4),
        "members_exact_match_share": round(float((member_dcr == 0).mean()), 4) if len(member_dcr) else 0.0,
        "non_members_exact_match_share": round(float((nonmember_dcr == 0).mean()), 4) if len(nonmember_dcr) else 0.0,
        "median_dcr_members": round(float(np.median(member_dcr)), 4) if len(member_dcr) else None,
        "median_dcr_non_members": round(float(np.median(nonmember_dcr)), 4) if len(nonmember_dcr) else None,
        "level": level,
        "statement": (f"membership advantage {adv:.2f} ({level}): an adversary holding a candidate's record tells members from "
                      f"non-members with ROC AUC {auc:.2f} (0.5 is guessing)"),
    }
