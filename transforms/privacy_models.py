"""Privacy models on a sensitive attribute, measured per equivalence class: distinct-, entropy- and recursive
(c,l)-diversity, t-closeness (equal-distance and hierarchical earth mover's distance) and delta-presence.

Plain numpy over a class x sensitive-value count matrix built in bounded chunks of classes, so the memory of
one check is bounded whatever the number of classes. Nothing here sees a value: classes and sensitive values
are integer codes. Definitions follow Machanavajjhala et al. (l-diversity), Li et al. (t-closeness, EMD with
a hierarchical ground distance) and Nergiz et al. (delta-presence); docs/k-anonymity.md states them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK_CELLS = 1 << 22  # class x value cells per chunk (32 MiB of float64)


@dataclass(frozen=True)
class SensitiveModel:
    """What the sensitive attribute must satisfy in every released class (picklable, holds no data)."""

    l: int | None = None  # noqa: E741 - the field's own notation
    diversity: str = "distinct"  # distinct | entropy | recursive
    c: float | None = None  # recursive (c,l)
    t: float | None = None  # t-closeness threshold
    t_measure: str = "equal"  # equal | hierarchical
    #: hierarchical EMD: for each level 1..H of the sensitive hierarchy, the node code of every sensitive code
    levels: tuple[tuple[int, ...], ...] = ()

    @property
    def needs_counts(self) -> bool:
        """True when a class's value counts matter (not only which values are present)."""
        return self.t is not None or (self.l is not None and self.diversity != "distinct")


def class_value_chunks(cls: np.ndarray, ncls: int, sens: np.ndarray, n_sens: int, counts: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first class, counts matrix [classes x values]) over all classes, in chunks of bounded size."""
    per = max(1, _CHUNK_CELLS // max(n_sens, 1))
    if ncls <= per:
        m = np.bincount(cls * n_sens + sens, weights=counts, minlength=ncls * n_sens).reshape(ncls, n_sens)
        yield 0, m
        return
    order = np.argsort(cls, kind="stable")
    cs, ss, ws = cls[order], sens[order], counts[order]
    bounds = np.searchsorted(cs, np.arange(0, ncls + per, per))
    for j, start in enumerate(range(0, ncls, per)):
        a, b = bounds[j], bounds[j + 1]
        width = min(per, ncls - start)
        m = np.bincount((cs[a:b] - start) * n_sens + ss[a:b], weights=ws[a:b], minlength=width * n_sens).reshape(width, n_sens)
        yield start, m


def entropy_bits(m: np.ndarray) -> np.ndarray:
    """Entropy (bits) of each row's distribution; 0 for empty rows."""
    n = m.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, m / np.where(n > 0, n, 1), 0.0)
        h = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0).sum(axis=1)
    return h


def recursive_ratio(m: np.ndarray, l: int) -> np.ndarray:  # noqa: E741
    """r1 / (r_l + ... + r_m) per row with counts sorted descending; recursive (c,l) holds when ratio < c.
    Rows with fewer than l distinct values get +inf."""
    r = -np.sort(-m, axis=1)
    top = r[:, 0] if r.shape[1] else np.zeros(len(r))
    tail = r[:, l - 1:].sum(axis=1) if r.shape[1] >= l else np.zeros(len(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tail > 0, top / np.where(tail > 0, tail, 1), np.inf)


def equal_distance_emd(m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Earth mover's distance with every pair of values at distance 1 (= total variation), per row."""
    n = m.sum(axis=1, keepdims=True)
    p = m / np.where(n > 0, n, 1)
    return 0.5 * np.abs(p - q[None, :]).sum(axis=1)


def hierarchical_emd(m: np.ndarray, q: np.ndarray, levels: Sequence[Sequence[int]]) -> np.ndarray:
    """EMD with the hierarchical ground distance of Li et al.: for each inner node N at height h of a tree of
    height H, cost(N) = h / H * min(positive extra, negative extra) of its children, summed over nodes.
    `levels[j-1][v]` is the node (at height j) above sensitive value v; the last level is the root."""
    n = m.sum(axis=1, keepdims=True)
    extra = m / np.where(n > 0, n, 1) - q[None, :]  # height 0: one column per value
    child_of = np.arange(m.shape[1])  # value -> its node at the current height (identity at height 0)
    height = len(levels)
    total = np.zeros(len(m))
    for h, nodes in enumerate(levels, start=1):
        nodes_arr = np.asarray(nodes, np.int64)
        n_children = int(child_of.max()) + 1 if len(child_of) else 0
        # parent of each child node at height h-1 (a function: the hierarchy nests)
        parent = np.zeros(n_children, np.int64)
        parent[child_of] = nodes_arr
        n_parents = int(nodes_arr.max()) + 1 if len(nodes_arr) else 0
        up = np.zeros((n_children, n_parents))
        up[np.arange(n_children), parent] = 1.0
        pos = np.maximum(extra, 0) @ up
        neg = np.maximum(-extra, 0) @ up
        total += (h / height) * np.minimum(pos, neg).sum(axis=1)
        extra = extra @ up
        child_of = nodes_arr
    return total


@dataclass
class ClassFigures:
    """Per-class model figures for the classes of one lattice node (arrays of length ncls)."""

    entropy: np.ndarray | None = None
    ratio: np.ndarray | None = None
    distance: np.ndarray | None = None


def class_figures(model: SensitiveModel, cls: np.ndarray, ncls: int, sens: np.ndarray, n_sens: int, counts: np.ndarray,
                  q: np.ndarray) -> ClassFigures:
    """Entropy, recursive ratio and t distance per class, as the model needs them."""
    out = ClassFigures()
    want_h = model.l is not None and model.diversity == "entropy"
    want_r = model.l is not None and model.diversity == "recursive"
    want_t = model.t is not None
    if want_h:
        out.entropy = np.zeros(ncls)
    if want_r:
        out.ratio = np.zeros(ncls)
    if want_t:
        out.distance = np.zeros(ncls)
    for start, m in class_value_chunks(cls, ncls, sens, n_sens, counts):
        sl = slice(start, start + len(m))
        if out.entropy is not None:
            out.entropy[sl] = entropy_bits(m)
        if out.ratio is not None:
            assert model.l is not None
            out.ratio[sl] = recursive_ratio(m, model.l)
        if out.distance is not None:
            out.distance[sl] = hierarchical_emd(m, q, model.levels) if model.t_measure == "hierarchical" else equal_distance_emd(m, q)
    return out


def failing_classes(model: SensitiveModel, fig: ClassFigures, eps: float = 1e-9) -> np.ndarray | None:
    """Mask of classes that fail the count-based models (None when the model has none)."""
    bad = None
    if fig.entropy is not None:
        assert model.l is not None
        bad = fig.entropy < np.log2(model.l) - eps
    if fig.ratio is not None:
        assert model.c is not None
        r = ~(fig.ratio < model.c)
        bad = r if bad is None else bad | r
    if fig.distance is not None:
        assert model.t is not None
        d = fig.distance > model.t + eps
        bad = d if bad is None else bad | d
    return bad
