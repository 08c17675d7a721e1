"""k-anonymity: the `k_anonymity` policy section, the lattice search, risk metrics and the Beam transforms.

Layers (the first three import nothing from Beam and are tested without it):

1. Frequency sets: per-batch counts of each distinct combination of quasi-identifier (QI) values at full detail
   (plus the sensitive value when l-diversity is asked), computed with pyarrow `group_by`, merged by summing.
   A frequency set holds counts per combination, never whole records; every lattice node's equivalence classes
   are roll-ups of it.
2. `Lattice` + `search`: the generalization lattice (one level per QI) and an optimal search for the node of
   least information loss whose classes reach k (and l) after suppressing the records of failing classes, with
   at most `suppression_limit` x N records suppressed. Depth-first branch and bound over the QIs, pruned by
   monotonicity (a node below a failing node fails, a node above a satisfying one satisfies; binary searches
   for the lowest feasible level of each QI) and by a loss bound from per-QI floors. The information-loss
   measure is Iyengar's Loss Metric (LM) on the observed domain, averaged over QIs (docs/k-anonymity.md).
3. `Plan` / `apply_plan`: the chosen levels and the keys of the classes to suppress; applied to any batch
   vectorized (string kernels + `is_in`). `report` figures: k and l achieved, levels, class-size histogram,
   prosecutor / journalist / marketer risk, information loss. Reports hold counts and policy names, never values.
4. Beam: `EnforceKAnonymity` (batch: count -> CombineGlobally -> search -> AsSingleton side input -> generalize
   and suppress; one linear chain, no tagged outputs) and `EnforceKAnonymityStreaming` (fixed windows, a
   delay-bounded buffer per window, per-window search, suppression of records that cannot reach k by the
   window's deadline, per-window figures as RunStats elements).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.core.policy import CompiledPolicy, register_section
from cloakbeam.core.stats import RunStats
from cloakbeam.errors import CloakbeamError, PolicyError
from cloakbeam.schemas.avro import InputSchema
from cloakbeam.transforms.generalize import Generalize, Hierarchy, build_hierarchy, canonical_string

SECTION = "k_anonymity"
_SEP = "\x1f"  # joins generalized QI values into a class key (in memory only, never written)
_NULL = "\x1e"  # stands for null inside a class key


class AnonymityTargetError(CloakbeamError):
    """The k / l target cannot be met within the suppression limit. The message names the target, never a value."""


# =========================================================================================================
# Spec (picklable, compiled from the policy)
# =========================================================================================================
@dataclass(frozen=True)
class QuasiIdentifier:
    path: str
    hierarchy: Hierarchy


@dataclass(frozen=True)
class KAnonSpec:
    """What the k-anonymity stage enforces; picklable, holds no data."""

    qis: tuple[QuasiIdentifier, ...]
    k: int
    suppression_limit: float
    sensitive: str | None = None
    l: int | None = None  # noqa: E741 - the standard name of the diversity parameter
    window_seconds: float = 60.0
    allowed_lateness_seconds: float = 0.0

    @property
    def hierarchies(self) -> list[Hierarchy]:
        return [q.hierarchy for q in self.qis]

    @property
    def max_suppressed_fraction(self) -> float:
        return self.suppression_limit


# =========================================================================================================
# 1. Frequency sets
# =========================================================================================================
def _qi_name(i: int) -> str:
    return f"q{i}"


def _column(columns: Mapping[str, pa.Array], path: str) -> pa.Array:
    col = columns[path]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col


def _sensitive_values(col: pa.Array) -> pa.Array:
    try:
        return canonical_string(col)
    except TypeError:
        return col


def frequency_set(columns: Mapping[str, pa.Array], spec: KAnonSpec) -> pa.Table:
    """Counts per distinct combination of canonical QI values (and sensitive value): columns q0.., [s], n."""
    data = {_qi_name(i): canonical_string(_column(columns, q.path)) for i, q in enumerate(spec.qis)}
    if spec.l is not None and spec.sensitive is not None:
        data["s"] = _sensitive_values(_column(columns, spec.sensitive))
    table = pa.table(data)
    out = table.group_by(list(data), use_threads=False).aggregate([([], "count_all")])
    # combine_chunks: group_by returns chunks sliced from shared buffers, which pickle (Beam's default coder
    # for tables) would copy whole for every chunk.
    return out.rename_columns(list(data) + ["n"]).combine_chunks()


def merge_frequency_sets(tables: Sequence[pa.Table]) -> pa.Table | None:
    """Sum frequency sets (same columns) into one; None when there is nothing."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    if len(tables) == 1:
        return tables[0]
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = [c for c in table.column_names if c != "n"]
    out = table.group_by(keys, use_threads=False).aggregate([("n", "sum")])
    return out.rename_columns(keys + ["n"]).combine_chunks()


# =========================================================================================================
# 2. Lattice and search
# =========================================================================================================
@dataclass
class NodeResult:
    """Evaluation of one lattice node on the frequency set."""

    node: tuple[int, ...]
    satisfied: bool
    suppressed: int
    loss: float


def _distinct_per_class(cls: np.ndarray, ncls: int, sens: np.ndarray, n_sens: int) -> np.ndarray:
    """Number of distinct sensitive codes per class (presence bitmap when small, else a sort)."""
    if ncls * n_sens <= 1 << 25:
        present = np.zeros((n_sens, ncls), np.bool_)  # sensitive-major: the sum runs along contiguous rows
        present[sens, cls] = True
        return present.sum(axis=0, dtype=np.int32)
    pairs = np.sort(cls * n_sens + sens)
    firsts = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
    return np.bincount(firsts // n_sens, minlength=ncls)


def _compress(key: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(key, return_inverse=True)
    return inv.astype(np.int64).reshape(-1), len(uniq)


class _View:
    """Rows of a frequency set rolled up to `base` levels: one code per QI at its base level, counts, sensitive codes.

    The search evaluates a node on any view whose base is at or below the node (a roll-up is exact: classes
    at a higher level are unions of classes at a lower one), so deeper search branches work on fewer rows."""

    def __init__(self, base: tuple[int, ...], codes: list[np.ndarray], counts: np.ndarray, sens: np.ndarray) -> None:
        self.base, self.codes, self.counts, self.sens = base, codes, counts, sens
        self.rows = len(counts)
        self._cache: dict[tuple[int, int], np.ndarray] = {}


class Lattice:
    """The generalization lattice over a frequency set. Evaluates nodes with numpy over distinct combinations.

    For every QI the distinct canonical values are generalized once per level (vectorized over the distinct
    values, not the rows), giving integer codes; a node's classes are the distinct tuples of codes.
    """

    def __init__(self, freq: pa.Table | None, spec: KAnonSpec) -> None:
        self.spec = spec
        self.hierarchies = spec.hierarchies
        self.tops = tuple(h.top for h in self.hierarchies)
        self.k = spec.k
        self.l = spec.l if spec.sensitive is not None else None
        n_rows = 0 if freq is None else freq.num_rows
        self.rows = n_rows
        self.counts = np.zeros(0, np.int64) if freq is None else freq.column("n").to_numpy().astype(np.int64)
        self.N = int(self.counts.sum())
        self.limit = int(math.floor(spec.suppression_limit * self.N + 1e-9))
        self.freq = freq
        self._idx: list[np.ndarray] = []
        self._dict: list[pa.Array] = []
        self._codes: list[list[np.ndarray]] = []  # [qi][level] -> code per distinct value
        self._cards: list[list[int]] = []
        self._value_loss: list[list[np.ndarray]] = []  # [qi][level] -> LM per distinct value
        self.level_loss: list[list[float]] = []  # [qi][level] -> record-weighted LM
        for i, h in enumerate(self.hierarchies):
            if freq is None:
                col = pa.array([], pa.string())
            else:
                col = freq.column(_qi_name(i)).combine_chunks()
            enc = pc.dictionary_encode(col, null_encoding="encode")
            idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            dic = enc.dictionary
            self._idx.append(idx)
            self._dict.append(dic)
            weights = np.bincount(idx, weights=self.counts, minlength=len(dic)) if len(dic) else np.zeros(0)
            d = len(dic)
            codes_l, cards_l, vloss_l, lloss_l = [], [], [], []
            for level in range(h.top + 1):
                gen = h.apply(dic, level)
                genc = pc.dictionary_encode(gen, null_encoding="encode")
                codes = genc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
                card = max(len(genc.dictionary), 1)
                if level == 0:
                    vloss = np.zeros(d)
                elif level == h.top:
                    vloss = np.ones(d)
                elif d > 1:
                    group_size = np.bincount(codes, minlength=card)
                    vloss = (group_size[codes] - 1) / (d - 1)
                else:
                    vloss = np.zeros(d)
                codes_l.append(codes)
                cards_l.append(card)
                vloss_l.append(vloss)
                lloss_l.append(float((vloss * weights).sum() / self.N) if self.N else float(level == h.top))
            self._codes.append(codes_l)
            self._cards.append(cards_l)
            self._value_loss.append(vloss_l)
            self.level_loss.append(lloss_l)
        if self.l is not None and freq is not None:
            senc = pc.dictionary_encode(freq.column("s").combine_chunks(), null_encoding="encode")
            self._sens = senc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            self._n_sens = max(len(senc.dictionary), 1)
        else:
            self._sens = np.zeros(n_rows, np.int64)
            self._n_sens = 1
        self._cache: dict[tuple[int, ...], NodeResult] = {}
        self._full: _View | None = None
        self._maps: dict[tuple[int, int, int], np.ndarray] = {}
        #: Roll-ups need every level to be a function of the level below on the observed values. Policy
        #: hierarchies are validated to nest, but float band edges can round differently; then the search
        #: evaluates everything on the full frequency set instead.
        self.nested = all(
            np.array_equal(self._raw_map(i, a, a + 1)[self._codes[i][a]], self._codes[i][a + 1])
            for i in range(len(self.tops)) for a in range(self.tops[i])
        )
        self.evaluations = 0

    # -- geometry ---------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(np.prod([t + 1 for t in self.tops], dtype=np.float64)) if self.tops else 1

    @property
    def bottom(self) -> tuple[int, ...]:
        return tuple(0 for _ in self.tops)

    @property
    def top(self) -> tuple[int, ...]:
        return self.tops

    def loss(self, node: Sequence[int]) -> float:
        """Information loss of a node: mean over QIs of the record-weighted Loss Metric of its level."""
        if not node:
            return 0.0
        return round(sum(self.level_loss[i][lv] for i, lv in enumerate(node)) / len(node), 12)

    # -- evaluation -------------------------------------------------------------------------------------
    def _full_view(self) -> _View:
        if self._full is None:
            codes = [self._codes[i][0][self._idx[i]] for i in range(len(self.tops))]
            self._full = _View(self.bottom, codes, self.counts, self._sens)
        return self._full

    def _raw_map(self, i: int, a: int, b: int) -> np.ndarray:
        m = np.zeros(self._cards[i][a], np.int64)
        m[self._codes[i][a]] = self._codes[i][b]
        return m

    def _level_map(self, i: int, a: int, b: int) -> np.ndarray:
        """Code at level a -> code at level b of QI i (hierarchies nest, so this is a function)."""
        hit = self._maps.get((i, a, b))
        if hit is None:
            ca, cb = self._codes[i][a], self._codes[i][b]
            hit = np.zeros(self._cards[i][a], np.int64)
            hit[ca] = cb
            if not np.array_equal(hit[ca], cb):  # never used unless `self.nested` was checked first
                raise ValueError(f"hierarchy of quasi-identifier {self.spec.qis[i].path} does not nest")
            self._maps[(i, a, b)] = hit
        return hit

    def _codes_at(self, view: _View, i: int, level: int) -> np.ndarray:
        if level == view.base[i]:
            return view.codes[i]
        hit = view._cache.get((i, level))
        if hit is None:
            hit = self._level_map(i, view.base[i], level)[view.codes[i]]
            view._cache[(i, level)] = hit
        return hit

    def rollup_pays(self, view: _View, base: tuple[int, ...], factor: float = 2.0) -> bool:
        """Roll up only when the new base can cut the rows by `factor` (bound: product of level cardinalities)."""
        if view.rows <= 4096 or not self.nested:
            return False
        bound = float(self._n_sens)
        for i, lv in enumerate(base):
            bound *= self._cards[i][lv]
            if bound >= view.rows / factor:
                return False
        return True

    def rollup(self, view: _View, base: tuple[int, ...]) -> _View:
        """Roll a view up to higher base levels: regroup its rows (with the sensitive code) and sum counts."""
        if base == view.base:
            return view
        codes = [self._codes_at(view, i, lv) for i, lv in enumerate(base)]
        cards = [self._cards[i][lv] for i, lv in enumerate(base)]
        total = float(np.prod(np.asarray(cards, np.float64))) * self._n_sens
        if total <= max(4 * view.rows, 1 << 20):
            # Small key space: group with one bincount and decode the keys (no sort).
            key = np.zeros(view.rows, np.int64)
            for c, card in zip(codes, cards):
                if card > 1:
                    key = key * card + c
            key = key * self._n_sens + view.sens
            summed = np.bincount(key, weights=view.counts, minlength=int(total))
            present = np.flatnonzero(summed)
            counts = summed[present].astype(np.int64)
            rem = present.copy()
            sens = rem % self._n_sens
            rem //= self._n_sens
            new_codes: list[np.ndarray] = [np.zeros(0)] * len(cards)
            for i in range(len(cards) - 1, -1, -1):
                if cards[i] > 1:
                    new_codes[i] = rem % cards[i]
                    rem //= cards[i]
                else:
                    new_codes[i] = np.zeros(len(present), np.int64)
            return _View(base, new_codes, counts, sens)
        key = np.zeros(view.rows, np.int64)
        kcard = 1
        for i, lv in enumerate(base):
            card = self._cards[i][lv]
            if card == 1:
                continue
            if kcard * card >= 2**62:
                key, kcard = _compress(key)
            key = key * card + codes[i]
            kcard *= card
        if kcard * self._n_sens >= 2**62:
            key, kcard = _compress(key)
        key = key * self._n_sens + view.sens
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        counts = np.bincount(inv.reshape(-1), weights=view.counts, minlength=len(first)).astype(np.int64)
        return _View(base, [c[first] for c in codes], counts, view.sens[first])

    def classes(self, node: Sequence[int], view: _View | None = None) -> tuple[np.ndarray, int]:
        """Class id per row of `view` (default: the whole frequency set) and the number of classes at `node`."""
        view = view or self._full_view()
        key = np.zeros(view.rows, np.int64)
        kcard = 1
        # Finest QIs last, so the key is compressed as late (and as rarely) as possible.
        for i in sorted(range(len(node)), key=lambda j: self._cards[j][node[j]]):
            level = node[i]
            card = self._cards[i][level]
            if card == 1:
                continue
            if kcard * card >= 2**62:
                key, kcard = _compress(key)
            key = key * card + self._codes_at(view, i, level)
            kcard *= card
        if kcard <= max(4 * view.rows, 1 << 16):
            return key, kcard
        return _compress(key)

    def class_stats(self, node: Sequence[int], view: _View | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(class id per row, size per class, distinct sensitive values per class, failing-class mask)."""
        view = view or self._full_view()
        cls, ncls = self.classes(node, view)
        sizes = np.bincount(cls, weights=view.counts, minlength=ncls).astype(np.int64)
        if self.l is not None:
            distinct = _distinct_per_class(cls, ncls, view.sens, self._n_sens)
            bad = (sizes > 0) & ((sizes < self.k) | (distinct < self.l))
        else:
            distinct = np.zeros(ncls, np.int64)
            bad = (sizes > 0) & (sizes < self.k)
        return cls, sizes, distinct, bad

    def evaluate(self, node: tuple[int, ...], view: _View | None = None) -> NodeResult:
        """Suppression and satisfaction of `node` (cached); `view` must have its base at or below `node`."""
        hit = self._cache.get(node)
        if hit is not None:
            return hit
        self.evaluations += 1
        _, sizes, _, bad = self.class_stats(node, view)
        suppressed = int(sizes[bad].sum())
        res = NodeResult(node, suppressed <= self.limit, suppressed, self.loss(node))
        self._cache[node] = res
        return res

    # -- value access for plans -------------------------------------------------------------------------
    def generalized_rows(self, node: Sequence[int], rows: np.ndarray) -> list[pa.Array]:
        """Generalized QI strings of the given frequency-set rows at `node` (for suppression keys)."""
        out = []
        for i, level in enumerate(node):
            gen = self.hierarchies[i].apply(self._dict[i], level)
            out.append(gen.take(pa.array(self._idx[i][rows])))
        return out

    def row_loss(self, node: Sequence[int]) -> np.ndarray:
        """LM per frequency-set row at `node` (mean over QIs)."""
        if not node:
            return np.zeros(self.rows)
        total = np.zeros(self.rows)
        for i, level in enumerate(node):
            total += self._value_loss[i][level][self._idx[i]]
        return total / len(node)


@dataclass
class SearchResult:
    node: tuple[int, ...]
    suppressed: int
    loss: float
    evaluations: int
    visited: int  # branch-and-bound tree nodes visited
    seconds: float


def _fail_message(lat: Lattice) -> str:
    spec = lat.spec
    limit = f"{spec.suppression_limit:.4g}".rstrip("0") or "0"
    pct = f"{spec.suppression_limit * 100:.4g}%"
    if lat.N < spec.k:
        return (f"k-anonymity target k={spec.k} cannot be met: the input has only {lat.N} records, fewer than k, "
                f"and suppressing them exceeds the suppression limit of {pct} (suppression_limit {limit}); "
                f"lower k or raise the suppression limit")
    if lat.l is not None:
        distinct = int(len(np.unique(lat._sens))) if lat.rows else 0
        if distinct < lat.l:
            return (f"l-diversity target l={lat.l} for sensitive attribute '{spec.sensitive}' cannot be met: it has "
                    f"only {distinct} distinct values in the input, so every record would be suppressed, exceeding "
                    f"the suppression limit of {pct}; lower l or raise the suppression limit")
    return (f"k-anonymity target k={spec.k}"
            + (f" with l={lat.l}" if lat.l is not None else "")
            + f" cannot be met within the suppression limit of {pct}, even with every quasi-identifier fully generalized")


def search(lat: Lattice) -> SearchResult:
    """Find the satisfying node of least loss (ties: fewer suppressed, then lowest levels).

    Depth-first branch and bound over the QIs, one QI's level at a time, with the QIs not yet assigned held at
    their top level ('*'). Pruning uses monotonicity twice:
      * feasibility: generalizing only merges classes, so suppression never rises going up the lattice. If a
        partial assignment fails with every unassigned QI fully generalized, every completion fails too, and
        for the QI being assigned only levels at or above the lowest feasible one need exploring (found by
        scanning up; the levels above it are known to satisfy without evaluation);
      * bound: the loss is a sum of per-QI terms that never decrease with the level, so a branch whose assigned
        loss plus a lower bound for the unassigned QIs (each QI's own lowest feasible level with all others at
        the top) cannot beat the incumbent is cut.
    Every node evaluated on the way is a complete node (unassigned QIs at '*') and a candidate; the first
    descent is greedy, so a good incumbent exists early. Raises AnonymityTargetError when even the top fails.
    """
    t0 = time.perf_counter()
    if lat.N == 0 or not lat.tops:
        b = lat.bottom
        return SearchResult(b, 0, lat.loss(b), 0, 0, time.perf_counter() - t0)
    top = lat.evaluate(lat.top)
    if not top.satisfied:
        raise AnonymityTargetError(_fail_message(lat))
    q = len(lat.tops)
    best = top

    def rank(r: NodeResult) -> tuple[float, int, tuple[int, ...]]:
        return (r.loss, r.suppressed, r.node)

    sat_min: list[tuple[int, ...]] = []  # satisfying nodes: everything above them satisfies
    fail_max: list[tuple[int, ...]] = []  # failing nodes: everything below them fails
    arrays = {"sat": np.zeros((0, q), np.int64), "fail": np.zeros((0, q), np.int64)}

    def sat(node: tuple[int, ...], view: _View | None = None) -> bool:
        """Evaluate a complete candidate exactly and keep the best."""
        nonlocal best
        r = lat.evaluate(node, view)
        if r.satisfied and rank(r) < rank(best):
            best = r
        (sat_min if r.satisfied else fail_max).append(node)
        return r.satisfied

    def feasible(node: tuple[int, ...], view: _View | None = None) -> bool:
        """Satisfaction only: answered from known nodes by monotonicity when possible, else evaluated."""
        for name, nodes in (("sat", sat_min), ("fail", fail_max)):
            if len(nodes) != arrays[name].shape[0]:
                arrays[name] = np.asarray(nodes, np.int64).reshape(-1, q)
        v = np.asarray(node, np.int64)
        if arrays["sat"].shape[0] and np.any(np.all(arrays["sat"] <= v, axis=1)):
            return True
        if arrays["fail"].shape[0] and np.any(np.all(arrays["fail"] >= v, axis=1)):
            return False
        return sat(node, view)

    def lowest_feasible(node: list[int], i: int, view: _View | None = None, lo: int = -1) -> int:
        """Lowest level of QI i such that `node` with that level satisfies (binary search; top always does)."""
        hi = lat.tops[i]  # level lo fails (or is -1), level hi satisfies
        if view is not None and hi - lo > 2:
            # Every node tried here has the other QIs as in `node`: roll the view up to that (often far coarser).
            base = tuple(max(lv, view.base[j]) if j != i else max(lo + 1, view.base[j]) for j, lv in enumerate(node))
            if lat.rollup_pays(view, base, factor=4.0):
                view = lat.rollup(view, base)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = list(node)
            trial[i] = mid
            if feasible(tuple(trial), view):
                hi = mid
            else:
                lo = mid
        return hi

    # Per-QI lower bounds: the lowest feasible level of each QI with every other QI at the top.
    qloss = [[lv / q for lv in row] for row in lat.level_loss]  # per-QI contribution to the mean
    floor = [lowest_feasible(list(lat.tops), i) for i in range(q)]
    order = sorted(range(q), key=lambda i: -qloss[i][floor[i]])  # most constrained QIs first
    # No satisfying node has a QI below its floor, so the search works on the frequency set rolled up to the
    # floors, and each branch rolls its view up further to the levels it has fixed.
    root = lat.rollup(lat._full_view(), tuple(floor)) if lat.nested else lat._full_view()
    rest_lb = [0.0] * (q + 1)
    for d in range(q - 1, -1, -1):
        rest_lb[d] = rest_lb[d + 1] + qloss[order[d]][floor[order[d]]]
    visited = 0
    eps = 1e-12

    def dfs(depth: int, node: list[int], assigned: float, view: _View, floors: list[int]) -> None:
        nonlocal visited
        visited += 1
        if depth:
            # Floors given the levels fixed so far (others at the top): a tighter bound for every QI left.
            floors = list(floors)
            for j in order[depth:]:
                floors[j] = lowest_feasible(node, j, view, lo=floors[j] - 1)
                if assigned + sum(qloss[o][floors[o]] for o in order[depth:]) > best.loss + eps:
                    return
        rest = [0.0] * (q + 1)
        for d in range(q - 1, depth, -1):
            rest[d] = rest[d + 1] + qloss[order[d]][floors[order[d]]]
        i = order[depth]
        if depth + 1 == q:
            # Leaves differ only in QI i: evaluate them on the view rolled up to this branch's levels.
            base = tuple(max(lv, view.base[j]) if j != i else max(floors[i], view.base[j]) for j, lv in enumerate(node))
            if lat.rollup_pays(view, base, factor=4.0):
                view = lat.rollup(view, base)
        for lv in range(floors[i], lat.tops[i] + 1):
            lb = assigned + qloss[i][lv] + rest[depth + 1]
            if lb > best.loss + eps:
                break
            node[i] = lv
            if depth + 1 < q:
                base = view.base[:i] + (lv,) + view.base[i + 1:]
                child = lat.rollup(view, base) if lat.rollup_pays(view, base) else view
                dfs(depth + 1, node, assigned + qloss[i][lv], child, floors)
            else:
                sat(tuple(node), view)  # complete node: a candidate (its level is feasible by construction)
        node[i] = lat.tops[i]

    dfs(0, list(lat.tops), 0.0, root, list(floor))
    return SearchResult(best.node, best.suppressed, best.loss, lat.evaluations, visited, time.perf_counter() - t0)


def exhaustive_search(lat: Lattice) -> NodeResult | None:
    """Evaluate every node (tests only): the satisfying node of least (loss, suppressed, levels), or None."""
    import itertools

    best = None
    for node in itertools.product(*[range(t + 1) for t in lat.tops]):
        r = lat.evaluate(tuple(node))
        if r.satisfied and (best is None or (r.loss, r.suppressed, r.node) < (best.loss, best.suppressed, best.node)):
            best = r
    return best


# =========================================================================================================
# 3. Plans, application and reports
# =========================================================================================================
@dataclass
class Plan:
    """The chosen levels per QI and the keys of the classes whose records are suppressed (in memory only)."""

    levels: tuple[int, ...]
    suppress_keys: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    _keys: pa.Array | None = field(default=None, repr=False, compare=False)

    def key_array(self) -> pa.Array:
        """The suppression keys as one Arrow array, built once per worker (the value set of `is_in`)."""
        if self._keys is None:
            self._keys = pa.array(self.suppress_keys, pa.string())
        return self._keys


_HIST_EDGES = (1, 2, 3, 5, 10, 20, 50, 100, 1000, 10000)


def class_size_histogram(sizes: np.ndarray) -> dict[str, dict[str, int]]:
    """Bucketed class sizes: {"10-19": {"classes": c, "records": r}, ...} (counts only)."""
    out: dict[str, dict[str, int]] = {}
    upper: list[int | None] = list(_HIST_EDGES[1:]) + [None]  # the last bucket is open
    for lo, hi in zip(_HIST_EDGES, upper):
        sel = sizes >= lo if hi is None else (sizes >= lo) & (sizes < hi)
        if not np.any(sel):
            continue
        label = f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")
        out[label] = {"classes": int(sel.sum()), "records": int(sizes[sel].sum())}
    return out


def class_keys(gen_columns: Sequence[pa.Array]) -> pa.Array:
    """One string key per row joining the generalized QI values (nulls distinct from every string)."""
    filled = [pc.fill_null(c, _NULL) for c in gen_columns]
    if len(filled) == 1:
        return filled[0]
    return pc.binary_join_element_wise(*filled, _SEP)


def make_plan(freq: pa.Table | None, spec: KAnonSpec) -> Plan:
    """Search the lattice on a frequency set and build the plan and its report. Raises AnonymityTargetError."""
    lat = Lattice(freq, spec)
    res = search(lat)
    node = res.node
    report: dict[str, Any] = {
        "k_target": spec.k,
        "l_target": spec.l,
        "sensitive": spec.sensitive,
        "suppression_limit": spec.suppression_limit,
        "records_in": lat.N,
        "lattice_nodes": lat.size,
        "nodes_evaluated": res.evaluations,
        "search_seconds": round(res.seconds, 4),
        "levels": {q.path: {"level": lv, "name": q.hierarchy.level_names()[lv], "of": q.hierarchy.top}
                   for q, lv in zip(spec.qis, node)},
    }
    if lat.N == 0:
        report.update(records_suppressed=0, records_released=0, k_achieved=None, l_achieved=None, classes=0,
                      class_size_histogram={}, prosecutor_risk=0.0, journalist_risk=0.0, marketer_risk=0.0,
                      information_loss=0.0, generalization_loss=lat.loss(node))
        return Plan(node, [], report)
    cls, sizes, distinct, bad = lat.class_stats(node)
    suppress_keys: list[str] = []
    bad_rows = np.nonzero(bad[cls])[0]
    if len(bad_rows):
        keys = class_keys(lat.generalized_rows(node, bad_rows))
        suppress_keys = pc.unique(keys).to_pylist()
    released = (sizes > 0) & ~bad
    rsizes = sizes[released]
    n_released = int(rsizes.sum())
    n_suppressed = lat.N - n_released
    row_loss = lat.row_loss(node)
    row_released = released[cls]
    info_loss = float(((row_loss * lat.counts)[row_released].sum() + n_suppressed) / lat.N)
    report.update(
        records_suppressed=n_suppressed,
        records_released=n_released,
        classes=int(len(rsizes)),
        k_achieved=int(rsizes.min()) if len(rsizes) else None,
        l_achieved=(int(distinct[released].min()) if len(rsizes) else None) if spec.l is not None else None,
        class_size_histogram=class_size_histogram(rsizes),
        prosecutor_risk=round(float(1.0 / rsizes.min()), 6) if len(rsizes) else 0.0,
        journalist_risk=round(float(np.mean(1.0 / rsizes)), 6) if len(rsizes) else 0.0,
        marketer_risk=round(float(len(rsizes) / n_released), 6) if n_released else 0.0,
        generalization_loss=lat.loss(node),
        information_loss=round(info_loss, 6),
    )
    return Plan(node, suppress_keys, report)


def apply_plan(columns: Mapping[str, pa.Array], spec: KAnonSpec, plan: Plan) -> tuple[dict[str, pa.Array], pa.Array | None]:
    """Generalize the QI columns to the plan's levels; return them and a keep-mask (None = keep every row)."""
    gen = {}
    for q, level in zip(spec.qis, plan.levels):
        gen[q.path] = q.hierarchy.apply(canonical_string(_column(columns, q.path)), level)
    if not plan.suppress_keys:
        return gen, None
    keys = class_keys([gen[q.path] for q in spec.qis])
    drop = pc.is_in(keys, value_set=plan.key_array())
    return gen, pc.invert(drop)


def enforce_table(batch: pa.RecordBatch | pa.Table, spec: KAnonSpec, plan: Plan) -> tuple[pa.RecordBatch | pa.Table, int]:
    """Apply a plan to a (protected) batch: generalized QIs, rows of small classes removed. Returns (out, suppressed)."""
    from cloakbeam.transforms.protect import _record_validity, assemble, flatten_columns

    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    columns = flatten_columns(batch)
    gen, keep = apply_plan(columns, spec, plan)
    columns.update(gen)
    out = assemble(columns, batch.schema, _record_validity(batch), batch.num_rows)
    if keep is None:
        return out, 0
    kept = out.filter(keep)
    return kept, out.num_rows - kept.num_rows


# =========================================================================================================
# Policy section
# =========================================================================================================
_SECTION_KEYS = {"k", "quasi_identifiers", "sensitive", "suppression_limit", "streaming", "description"}


def _err(msg: str) -> PolicyError:
    return PolicyError(f"k_anonymity: {msg}")


def _parse_limit(value: Any) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise _err("'suppression_limit' must be a share such as 0.02 or '2%'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1):
        raise _err("'suppression_limit' must be a share between 0 and 1 (e.g. 0.02) or a percentage such as '2%'")
    return float(value)


def summary_line(rep: Mapping[str, Any]) -> str:
    """One line for the CLI summary: achieved k/l, levels, suppression, risk, loss (no values)."""
    levels = ", ".join(f"{p}={v['name']}" for p, v in rep.get("levels", {}).items())
    n = rep.get("records_in") or 0
    sup = rep.get("records_suppressed") or 0
    share = f"{sup / n:.2%}" if n else "0%"
    l_part = f", l={rep.get('l_achieved')} (target {rep.get('l_target')})" if rep.get("l_target") else ""
    return (f"k={rep.get('k_achieved')} (target {rep.get('k_target')}){l_part}; {levels}; suppressed {sup:,} ({share}); "
            f"prosecutor risk {rep.get('prosecutor_risk')}; information loss {rep.get('information_loss')}")


def _auto_fields(policy: CompiledPolicy) -> list[str]:
    return [p for p, a in policy.actions.items() if isinstance(a, Generalize) and a.is_auto]


class KAnonymitySection:
    """The compiled `k_anonymity` section. The lead's graph calls `batch_transform` or `streaming_transform`."""

    def __init__(self, spec: KAnonSpec) -> None:
        self.spec = spec

    def batch_transform(self, runtime: Any = None) -> Any:
        """PTransform over RecordBatch | RunStats elements enforcing k (and l) over the whole input."""
        from cloakbeam.transforms.kanon_beam import EnforceKAnonymity

        return EnforceKAnonymity(self.spec)

    def streaming_transform(self, runtime: Any = None) -> Any:
        """PTransform enforcing k per fixed window with a bounded delay; emits per-window RunStats."""
        from cloakbeam.transforms.kanon_beam import EnforceKAnonymityStreaming

        return EnforceKAnonymityStreaming(self.spec)

    def report(self, run_stats: RunStats) -> dict[str, Any]:
        """The manifest's `sections.k_anonymity`: the batch report and/or per-window figures (counts only)."""
        out: dict[str, Any] = {"policy": self.describe()}
        batch = run_stats.extra.get("k_anonymity")
        if batch is not None:
            out["batch"] = batch
            out["summary"] = summary_line(batch)
        windows = run_stats.extra.get("k_anonymity_windows")
        if windows is not None:
            ws = sorted(windows, key=lambda w: (w.get("window_start", ""), w.get("pane_index", 0)))
            out["windows"] = ws
            released = [w for w in ws if w.get("records_released")]
            out["streaming_summary"] = {
                "windows": len({w.get("window_start") for w in ws}),
                "panes": len(ws),
                "records_in": sum(w.get("records_in", 0) for w in ws),
                "records_suppressed": sum(w.get("records_suppressed", 0) for w in ws),
                "min_k_achieved": min((w["k_achieved"] for w in released if w.get("k_achieved") is not None), default=None),
                "panes_over_suppression_limit": sum(1 for w in ws if not w.get("target_met", True)),
            }
            if batch is None:
                sm = out["streaming_summary"]
                out["summary"] = (f"{sm['windows']} windows, min k {sm['min_k_achieved']} (target {self.spec.k}), "
                                  f"suppressed {sm['records_suppressed']:,} of {sm['records_in']:,}, "
                                  f"{sm['panes_over_suppression_limit']} panes missed the target")
        return out

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            "k": s.k,
            "l": s.l,
            "sensitive": s.sensitive,
            "suppression_limit": s.suppression_limit,
            "quasi_identifiers": {q.path: q.hierarchy.describe() for q in s.qis},
            "window_seconds": s.window_seconds,
            "allowed_lateness_seconds": s.allowed_lateness_seconds,
        }


def compile_section(value: Any, schema: InputSchema, policy: CompiledPolicy) -> KAnonymitySection | None:
    """Validate the `k_anonymity` section against the schema and the fields section; PolicyError on problems."""
    auto = _auto_fields(policy)
    if value is None:
        if auto:
            raise PolicyError(
                f"field '{auto[0]}' uses 'generalize' with 'level: auto' but the policy has no k_anonymity section; "
                "add the field to k_anonymity.quasi_identifiers or give it a fixed method"
            )
        return None
    if not isinstance(value, Mapping):
        raise _err("the section must be a mapping with 'k', 'quasi_identifiers' and 'suppression_limit'")
    unknown = sorted(set(value) - _SECTION_KEYS)
    if unknown:
        raise _err(f"unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(_SECTION_KEYS))}")
    k = value.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise _err("'k' must be an integer of at least 2 (k=1 protects nobody)")
    limit = _parse_limit(value.get("suppression_limit", 0.0))
    qis_raw = value.get("quasi_identifiers")
    if not isinstance(qis_raw, Mapping) or not qis_raw:
        raise _err("'quasi_identifiers' must map each quasi-identifier field to its hierarchy, e.g. "
                   "zip: {hierarchy: prefix, lengths: [3, 1]}")
    qis: list[QuasiIdentifier] = []
    for path, hspec in qis_raw.items():
        info = schema.fields.get(path) if isinstance(path, str) else None
        if info is None:
            raise _err(f"quasi-identifier '{path}' is not in schema {schema.source}; fix its name")
        if info.is_record:
            raise _err(f"quasi-identifier '{path}' is a record; name its leaf fields by dotted path")
        action = policy.actions.get(path)
        if action is None or action.output_type() is None:
            raise _err(f"quasi-identifier '{path}' is dropped by the fields section; give it "
                       "'{action: generalize, level: auto}' so it reaches the k-anonymity stage, or remove it from "
                       "quasi_identifiers")
        if not (isinstance(action, Generalize) and action.is_auto):
            raise _err(f"quasi-identifier '{path}' uses action '{action.name}' in the fields section; it must use "
                       "'{action: generalize, level: auto}' so the k-anonymity stage receives it at full detail and "
                       "releases it at the chosen level")
        hierarchy, problem = build_hierarchy(hspec, info.arrow_type)
        if hierarchy is None:
            raise _err(f"quasi-identifier '{path}' has a bad hierarchy: the field {problem}")
        qis.append(QuasiIdentifier(path, hierarchy))
    qi_paths = {q.path for q in qis}
    for p in auto:
        if p not in qi_paths:
            raise _err(f"field '{p}' uses 'generalize' with 'level: auto' but is not listed in quasi_identifiers; "
                       "list it there with its hierarchy or give it a fixed method")
    sensitive = l_value = None
    sens = value.get("sensitive")
    if sens is not None:
        if not isinstance(sens, Mapping) or set(sens) - {"field", "l"} or "field" not in sens:
            raise _err("'sensitive' must be a mapping {field: NAME, l: NUMBER}")
        sensitive = sens["field"]
        if not isinstance(sensitive, str) or sensitive not in schema.fields or schema.fields[sensitive].is_record:
            raise _err(f"sensitive attribute '{sensitive}' is not a leaf field of schema {schema.source}")
        if sensitive in qi_paths:
            raise _err(f"sensitive attribute '{sensitive}' is also a quasi-identifier; it must be one or the other")
        act = policy.actions.get(sensitive)
        if act is None or act.output_type() is None:
            raise _err(f"sensitive attribute '{sensitive}' is dropped by the fields section; l-diversity is measured "
                       "on its released values, so keep or protect it deterministically")
        l_value = sens.get("l", 2)
        if isinstance(l_value, bool) or not isinstance(l_value, int) or l_value < 2:
            raise _err("'sensitive.l' must be an integer of at least 2 (distinct sensitive values per class)")
        if l_value > k:
            raise _err(f"'sensitive.l' ({l_value}) cannot exceed 'k' ({k}): a class of k records has at most k distinct values")
    stream = value.get("streaming") or {}
    if not isinstance(stream, Mapping) or set(stream) - {"window_seconds", "allowed_lateness_seconds"}:
        raise _err("'streaming' must be a mapping with 'window_seconds' and optional 'allowed_lateness_seconds'")
    window = stream.get("window_seconds", 60)
    lateness = stream.get("allowed_lateness_seconds", 0)
    for name, v, positive in (("window_seconds", window, True), ("allowed_lateness_seconds", lateness, False)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
            raise _err(f"'streaming.{name}' must be a {'positive' if positive else 'non-negative'} number of seconds")
    spec = KAnonSpec(tuple(qis), k, limit, sensitive, l_value, float(window), float(lateness))
    return KAnonymitySection(spec)


register_section(SECTION, compile_section)
