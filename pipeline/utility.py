"""ML utility of a release next to its risk: the same model trained on raw and on released training rows.

`compare_models` trains scikit-learn's HistGradientBoostingClassifier (fixed hyper-parameters and seed) on the raw
training split and on the released one, and scores each on its own test split (the same subjects when the split is
the keyed subject split), reporting ROC AUC and accuracy. `information_loss` gives, per feature, the share of the raw
feature's Shannon entropy that the release no longer carries (numbers binned on the raw sample's deciles; 0 = as
informative as raw, 1 = constant or gone). Both return figures only, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MODEL = "sklearn.ensemble.HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)"
_MAX_CATEGORIES = 250  # HistGradientBoosting's categorical support needs fewer categories than its bins (255)


def feature_kind(t: pa.DataType) -> str:
    """"number" for numbers, booleans, dates and timestamps; "category" for strings; "" for what no model reads."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "category"
    return ""


def numbers(col: pa.Array) -> np.ndarray:
    """Numbers, booleans, dates (days) and timestamps (their integer ticks) as float64, NaN for nulls."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_date(t):
        col = col.cast(pa.date32()).cast(pa.int32())
    elif pa.types.is_timestamp(t):
        col = col.cast(pa.int64())
    return np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def design_matrix(table: pa.Table, features: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
    """Numeric matrix (NaN for nulls) and, per column, whether the model should treat it as categorical."""
    cols, categorical = [], []
    for name in features:
        col = table.column(name).combine_chunks()
        kind = feature_kind(col.type)
        if kind == "number":
            cols.append(numbers(col))
            categorical.append(False)
            continue
        strings = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
        enc = pc.dictionary_encode(strings)
        codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), dtype=np.float64)
        if len(enc.dictionary) <= _MAX_CATEGORIES:
            # Categories ordered by their text, so the coding is the same for any row order.
            order = np.argsort(np.asarray(enc.dictionary.to_pylist(), dtype=object).astype(str))
            rank = np.empty(len(order), np.float64)
            rank[order] = np.arange(len(order))
            cols.append(np.where(codes < 0, np.nan, rank[np.maximum(codes, 0).astype(np.int64)] if len(rank) else np.nan))
            categorical.append(True)
        else:
            # Too many categories: each value becomes its frequency in this table (a standard high-cardinality code).
            freq = np.bincount(np.maximum(codes, 0).astype(np.int64), minlength=len(enc.dictionary)).astype(np.float64)
            cols.append(np.where(codes < 0, np.nan, freq[np.maximum(codes, 0).astype(np.int64)] / max(len(codes), 1)))
            categorical.append(False)
    return (np.column_stack(cols) if cols else np.zeros((table.num_rows, 0))), categorical


def _labels(table: pa.Table, label: str) -> np.ndarray:
    col = table.column(label).combine_chunks()
    if pa.types.is_boolean(col.type):
        return np.asarray(pc.fill_null(col, False).to_numpy(zero_copy_only=False), dtype=np.int64)
    strings = col.cast(pa.string())
    values = sorted(v for v in pc.unique(strings).to_pylist() if v is not None)
    if len(values) != 2:
        raise ValueError(f"label '{label}' must have two classes; it has {len(values)}")
    return np.asarray(pc.equal(strings, values[1]).fill_null(False).to_numpy(zero_copy_only=False), dtype=np.int64)


def train_and_score(train: pa.Table, test: pa.Table, features: Sequence[str], label: str) -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import accuracy_score, roc_auc_score

    xtr, cat = design_matrix(train, features)
    xte, cat_te = design_matrix(test, features)
    # Category codes are per table; a feature categorical in one and not the other is read as a number in both.
    cat = [a and b for a, b in zip(cat, cat_te)]
    ytr, yte = _labels(train, label), _labels(test, label)
    if len(set(ytr.tolist())) < 2 or len(set(yte.tolist())) < 2:
        return {"measured": False, "reason": "the training or test split holds only one label class"}
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0,
                                           categorical_features=np.array(cat, dtype=bool) if any(cat) else None)
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: on small shared machines the boosting loop's thread team spends more time waiting than
    # working (measured: 16 s with the default team vs a few seconds with one thread for 16,000 rows on 2 cores).
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(xtr, ytr)
        proba = model.predict_proba(xte)[:, 1]
    return {
        "measured": True,
        "train_rows": int(len(ytr)),
        "test_rows": int(len(yte)),
        "auc": round(float(roc_auc_score(yte, proba)), 4),
        "accuracy": round(float(accuracy_score(yte, proba >= 0.5)), 4),
        "positive_share_test": round(float(yte.mean()), 4),
    }


def _entropy(codes: np.ndarray) -> float:
    if not len(codes):
        return 0.0
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


def _codes(col: pa.Array, edges: np.ndarray | None) -> np.ndarray:
    """Integer codes of a feature for entropy: numbers binned on `edges`, anything else by distinct value."""
    if edges is not None:
        x = numbers(col)
        return np.where(np.isnan(x), -1, np.searchsorted(edges, x, side="right"))
    enc = pc.dictionary_encode(col.cast(pa.string()))
    return np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def information_loss(raw: pa.Table, released: pa.Table, features: Sequence[str], actions: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per feature: entropy in raw and released samples, the share lost, distinct values and null shares."""
    out: dict[str, dict[str, Any]] = {}
    for name in features:
        r = raw.column(name).combine_chunks()
        if name not in released.column_names:
            out[name] = {"action": actions.get(name, "drop"), "entropy_loss": 1.0, "released": False}
            continue
        s = released.column(name).combine_chunks()
        numeric_both = feature_kind(r.type) == "number" and feature_kind(s.type) == "number"
        edges = None
        if numeric_both:
            x = numbers(r)
            x = x[~np.isnan(x)]
            edges = np.unique(np.quantile(x, np.linspace(0.1, 0.9, 9))) if len(x) else np.zeros(0)
        h_raw, h_rel = _entropy(_codes(r, edges)), _entropy(_codes(s, edges))
        out[name] = {
            "action": actions.get(name, "keep"),
            "entropy_raw_bits": round(h_raw, 4),
            "entropy_released_bits": round(h_rel, 4),
            "entropy_loss": round(max(0.0, 1.0 - h_rel / h_raw), 4) if h_raw > 0 else 0.0,
            "distinct_raw": int(pc.count_distinct(r).as_py()),
            "distinct_released": int(pc.count_distinct(s).as_py()),
            "null_share_raw": round(r.null_count / max(len(r), 1), 4),
            "null_share_released": round(s.null_count / max(len(s), 1), 4),
            "released": True,
        }
    return out
