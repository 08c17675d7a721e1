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
   for the lowest feasible level of each QI) and by a lower bound of the chosen metric (ARX's Loss with a
   suppression weight and per-QI weights, discernibility, AECS, non-uniform entropy, precision). Privacy models
   beyond k and distinct-l (entropy / recursive (c,l) diversity, t-closeness, delta-presence; see
   `privacy_models`) are checked exactly on candidates; only their monotone part prunes (docs/k-anonymity.md).
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
import os
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
from cloakbeam.transforms.generalize import Generalize, Hierarchy, build_hierarchy, canonical_string, unknown_error
from cloakbeam.transforms.privacy_models import ClassFigures, SensitiveModel, class_figures, failing_classes

SECTION = "k_anonymity"
_SEP = "\x1f"  # joins generalized QI values into a class key (in memory only, never written)
_NULL = "\x1e"  # stands for null inside a class key


class AnonymityTargetError(CloakbeamError):
    """The k / l target cannot be met within the suppression limit. The message names the target, never a value."""


# =========================================================================================================
# Spec (picklable, compiled from the policy)
# =========================================================================================================
METRICS = ("loss", "discernibility", "aecs", "entropy", "precision")
#: Metrics that are a weighted sum of per-QI terms, so a branch's bound adds up per QI (weights apply to these).
ADDITIVE_METRICS = ("loss", "entropy", "precision")


@dataclass(frozen=True)
class QuasiIdentifier:
    path: str
    hierarchy: Hierarchy


@dataclass(frozen=True)
class Presence:
    """delta-presence against a declared population table (a file the release is a sample of)."""

    path: str  # as named in the policy; resolved against `base`
    base: str | None
    delta_min: float = 0.0
    delta_max: float = 1.0
    columns: tuple[tuple[str, str], ...] = ()  # (QI path, column name in the population file)


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
    metric: str = "loss"
    weights: tuple[float, ...] | None = None  # per QI, in QI order (additive metrics)
    suppression_weight: float = 0.5  # ARX's generalization/suppression factor (loss, precision)
    diversity: str = "distinct"  # distinct | entropy | recursive
    c: float | None = None
    t: float | None = None
    t_measure: str = "equal"
    sensitive_hierarchy: Hierarchy | None = None
    presence: Presence | None = None

    @property
    def hierarchies(self) -> list[Hierarchy]:
        return [q.hierarchy for q in self.qis]

    @property
    def max_suppressed_fraction(self) -> float:
        return self.suppression_limit

    @property
    def needs_sensitive(self) -> bool:
        return self.sensitive is not None and (self.l is not None or self.t is not None)

    def model(self, sens_levels: tuple[tuple[int, ...], ...] = ()) -> SensitiveModel:
        return SensitiveModel(self.l, self.diversity, self.c, self.t, self.t_measure, sens_levels)


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
    if spec.needs_sensitive:
        assert spec.sensitive is not None
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


def population_frequency(spec: KAnonSpec) -> pa.Table:
    """The population table's counts per distinct combination of canonical QI values (columns q0.., p).

    Read when the plan is made (the file can be large; it is never attached to the policy). CSV is read as
    text so values compare as canonical strings; Parquet columns are rendered canonically."""
    import os

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from cloakbeam.core import fsio

    pres = spec.presence
    assert pres is not None
    path = pres.path if os.path.isabs(pres.path) or "://" in pres.path or pres.base is None else os.path.join(pres.base, pres.path)
    names = [col for _, col in pres.columns]
    try:
        with fsio.open_read(path) as fh:
            if path.endswith(".parquet"):
                table = pq.read_table(fh, columns=names)
            else:
                table = pcsv.read_csv(fh, convert_options=pcsv.ConvertOptions(
                    include_columns=names, column_types={c: pa.string() for c in names}, strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise AnonymityTargetError(f"delta-presence: cannot read population table {pres.path} with columns {', '.join(names)} "
                                   f"({type(exc).__name__}); check the file and its column names") from None
    data = {_qi_name(i): canonical_string(table.column(col)) for i, (_, col) in enumerate(pres.columns)}
    out = pa.table(data).group_by(list(data), use_threads=False).aggregate([([], "count_all")])
    return out.rename_columns(list(data) + ["p"]).combine_chunks()


# =========================================================================================================
# 2. Lattice and search
# =========================================================================================================
@dataclass
class NodeResult:
    """Evaluation of one lattice node on the frequency set.

    `satisfied`: the privacy models hold after suppressing failing classes within the limit. `relaxed`: the
    monotone part (k and distinct-l) does; it is what the search prunes with, so pruning stays sound for models
    that are not monotone under suppression (entropy/recursive diversity, t-closeness, delta-presence).
    `loss` is the score of the chosen metric (lower is better)."""

    node: tuple[int, ...]
    satisfied: bool
    suppressed: int
    loss: float
    relaxed: bool = True
    bound: float = 0.0  # lower bound of the metric over every satisfying node at or above this one


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
    """Rows of a frequency set rolled up to `base` levels: one code per QI at its base level, counts, sensitive
    codes, and population counts (delta-presence).

    The search evaluates a node on any view whose base is at or below the node (a roll-up is exact: classes
    at a higher level are unions of classes at a lower one), so deeper search branches work on fewer rows."""

    def __init__(self, base: tuple[int, ...], codes: list[np.ndarray], counts: np.ndarray, sens: np.ndarray,
                 pcounts: np.ndarray | None = None) -> None:
        self.base, self.codes, self.counts, self.sens, self.pcounts = base, codes, counts, sens, pcounts
        self.rows = len(counts)
        self._cache: dict[tuple[int, int], np.ndarray] = {}


@dataclass
class ClassStats:
    """Classes of one node on one view: class id per row, sizes, failing masks (exact and relaxed)."""

    cls: np.ndarray
    sizes: np.ndarray
    distinct: np.ndarray
    bad: np.ndarray
    relaxed_bad: np.ndarray
    figures: ClassFigures | None = None
    presence: np.ndarray | None = None  # sample / population size per class (delta-presence)


class Lattice:
    """The generalization lattice over a frequency set. Evaluates nodes with numpy over distinct combinations.

    For every QI the distinct canonical values are generalized once per level (vectorized over the distinct
    values, not the rows), giving integer codes; a node's classes are the distinct tuples of codes. Metric
    terms are precomputed per QI and level, so a node's score needs only its classes and its suppressed rows.
    """

    def __init__(self, freq: pa.Table | None, spec: KAnonSpec, population: pa.Table | None = None) -> None:
        self.spec = spec
        self.hierarchies = spec.hierarchies
        self.tops = tuple(h.top for h in self.hierarchies)
        self.k = spec.k
        self.l = spec.l if spec.sensitive is not None else None
        self.model = spec.model()
        self.metric = spec.metric
        self.forced = 0  # records removed before the search: values outside a hierarchy with on_unknown: suppress
        if freq is not None:
            freq = self._screen_unknown(freq)
        n_sample_rows = 0 if freq is None else freq.num_rows
        counts = np.zeros(0, np.int64) if freq is None else freq.column("n").to_numpy().astype(np.int64)
        self.N = int(counts.sum())
        self.limit = int(math.floor(spec.suppression_limit * (self.N + self.forced) + 1e-9)) - self.forced
        pcounts = None
        if population is not None and freq is not None:
            # One row set for sample and population: population rows carry no sample records (count 0).
            pop = population.select([_qi_name(i) for i in range(len(spec.qis))])
            cols = {c: pa.concat_arrays([freq.column(c).combine_chunks(), pop.column(c).combine_chunks()]) for c in pop.column_names}
            if "s" in freq.column_names:
                cols["s"] = pa.concat_arrays([freq.column("s").combine_chunks(), pa.nulls(population.num_rows, freq.column("s").type)])
            pcounts = np.concatenate([np.zeros(n_sample_rows, np.int64), population.column("p").to_numpy().astype(np.int64)])
            counts = np.concatenate([counts, np.zeros(population.num_rows, np.int64)])
            freq = pa.table(cols)
        n_rows = 0 if freq is None else freq.num_rows
        self.rows = n_rows
        self.counts = counts
        self.pcounts = pcounts
        self.freq = freq
        self._idx: list[np.ndarray] = []
        self._dict: list[pa.Array] = []
        self._codes: list[list[np.ndarray]] = []  # [qi][level] -> code per distinct value
        self._cards: list[list[int]] = []
        self._value_loss: list[list[np.ndarray]] = []  # [qi][level] -> LM per distinct value
        self._code_loss: list[list[np.ndarray]] = []  # [qi][level] -> LM per generalized code
        self._code_count: list[list[np.ndarray]] = []  # [qi][level] -> records per generalized code
        self.level_loss: list[list[float]] = []  # [qi][level] -> record-weighted LM (mean per record)
        self.level_entropy: list[list[float]] = []  # [qi][level] -> non-uniform entropy (bits per record)
        for i, h in enumerate(self.hierarchies):
            col = pa.array([], pa.string()) if freq is None else freq.column(_qi_name(i)).combine_chunks()
            enc = pc.dictionary_encode(col, null_encoding="encode")
            idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            dic = enc.dictionary
            self._idx.append(idx)
            self._dict.append(dic)
            weights = np.bincount(idx, weights=self.counts, minlength=len(dic)) if len(dic) else np.zeros(0)
            observed = weights > 0
            d = int(observed.sum())  # the observed domain (population-only values do not count)
            codes_l, cards_l, vloss_l, closs_l, ccount_l, lloss_l, lent_l = [], [], [], [], [], [], []
            for level in range(h.top + 1):
                gen = h.apply(dic, level)
                genc = pc.dictionary_encode(gen, null_encoding="encode")
                codes = genc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
                card = max(len(genc.dictionary), 1)
                group_size = np.bincount(codes[observed], minlength=card) if len(codes) else np.zeros(card, np.int64)
                if level == 0 or d <= 1:
                    closs = np.zeros(card) if level < h.top or d <= 1 else np.ones(card)
                    if level == h.top:
                        closs = np.ones(card)
                elif level == h.top:
                    closs = np.ones(card)
                else:
                    closs = np.maximum(group_size - 1, 0) / (d - 1)
                vloss = closs[codes] if len(codes) else np.zeros(0)
                ccount = np.bincount(codes, weights=weights, minlength=card) if len(codes) else np.zeros(card)
                codes_l.append(codes)
                cards_l.append(card)
                closs_l.append(closs)
                vloss_l.append(vloss)
                ccount_l.append(ccount)
                lloss_l.append(float((vloss * weights).sum() / self.N) if self.N else float(level == h.top))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ent = np.where(observed, np.log2(np.where(observed, ccount[codes], 1) / np.where(observed, weights, 1)), 0.0) if len(codes) else np.zeros(0)
                lent_l.append(float((ent * weights).sum() / self.N) if self.N else 0.0)
            self._codes.append(codes_l)
            self._cards.append(cards_l)
            self._value_loss.append(vloss_l)
            self._code_loss.append(closs_l)
            self._code_count.append(ccount_l)
            self.level_loss.append(lloss_l)
            self.level_entropy.append(lent_l)
        if spec.needs_sensitive and freq is not None:
            senc = pc.dictionary_encode(freq.column("s").combine_chunks(), null_encoding="encode")
            self._sens = senc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            self._n_sens = max(len(senc.dictionary), 1)
            self._sens_dict = senc.dictionary
        else:
            self._sens = np.zeros(n_rows, np.int64)
            self._n_sens = 1
            self._sens_dict = pa.array([], pa.string())
        self._q = np.bincount(self._sens, weights=self.counts, minlength=self._n_sens) / max(self.N, 1)
        if spec.t is not None and spec.t_measure == "hierarchical":
            self.model = spec.model(self._sensitive_levels())
        q = len(self.tops)
        w = np.ones(q) if spec.weights is None else np.asarray(spec.weights, np.float64)
        self.weights = w / w.sum() if q else w
        sw = spec.suppression_weight
        # ARX's factors: 0 favours suppression (suppressing costs nothing), 1 favours generalization.
        self.s_factor = 2.0 * sw if sw < 0.5 else 1.0
        self.g_factor = 1.0 if sw <= 0.5 else 1.0 - 2.0 * (sw - 0.5)
        #: Per-QI lower-bound terms of the chosen (additive) metric: a node's score is at least their sum.
        self.qbound = [[self._term(i, lv) for lv in range(self.tops[i] + 1)] for i in range(q)]
        self.monotone_models = (self.model.l is None or self.model.diversity == "distinct") and self.model.t is None \
            and spec.presence is None
        self.monotone = self.monotone_models or self.limit <= 0
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

    # -- input screening --------------------------------------------------------------------------------
    def _screen_unknown(self, freq: pa.Table) -> pa.Table:
        """Values outside a map/csv hierarchy: fail (error), remove their records (suppress) or leave them to
        become '*' (top). Counts only; the message never names a value."""
        counts = freq.column("n").to_numpy().astype(np.int64)
        forced = np.zeros(freq.num_rows, np.bool_)
        for i, q in enumerate(self.spec.qis):
            h = q.hierarchy
            if not h.has_domain:
                continue
            unknown = h.unknown(freq.column(_qi_name(i)).combine_chunks())
            if not unknown.any():
                continue
            if h.on_unknown == "error":
                raise unknown_error(q.path, h, int(counts[unknown].sum()))
            if h.on_unknown == "suppress":
                forced |= unknown
        if forced.any():
            self.forced = int(counts[forced].sum())
            return freq.filter(pa.array(~forced))
        return freq

    def _sensitive_levels(self) -> tuple[tuple[int, ...], ...]:
        """For hierarchical EMD: per level 1..top of the sensitive hierarchy, the node code of each sensitive code."""
        h = self.spec.sensitive_hierarchy
        assert h is not None
        values = self._sens_dict.cast(pa.string()) if len(self._sens_dict) else pa.array([], pa.string())
        unknown = h.unknown(values)
        if unknown.any():
            raise unknown_error(str(self.spec.sensitive), h, int(np.bincount(self._sens, weights=self.counts, minlength=self._n_sens)[unknown].sum()))
        out = []
        for level in range(1, h.top + 1):
            enc = pc.dictionary_encode(h.apply(values, level), null_encoding="encode")
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            out.append(tuple(int(c) for c in codes) if len(codes) else (0,) * self._n_sens)
        return tuple(out)

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

    @property
    def additive(self) -> bool:
        return self.metric in ADDITIVE_METRICS

    def _term(self, i: int, lv: int, metric: str | None = None) -> float:
        """QI i's share of the score lower bound at level lv (generalization only, no suppression)."""
        metric = metric or self.metric
        w = float(self.weights[i])
        if metric == "loss":
            return w * self.g_factor * self.level_loss[i][lv]
        if metric == "precision":
            return w * self.g_factor * (lv / self.tops[i] if self.tops[i] else 0.0)
        if metric == "entropy":
            return w * self.level_entropy[i][lv]
        return 0.0

    def loss(self, node: Sequence[int]) -> float:
        """Generalization loss of a node: the weighted mean over QIs of the record-weighted Loss Metric of its
        level, suppression ignored (monotone; the search's bound for `metric: loss`)."""
        if not node:
            return 0.0
        return round(sum(float(self.weights[i]) * self.level_loss[i][lv] for i, lv in enumerate(node)), 12)

    # -- evaluation -------------------------------------------------------------------------------------
    def _full_view(self) -> _View:
        if self._full is None:
            codes = [self._codes[i][0][self._idx[i]] for i in range(len(self.tops))]
            self._full = _View(self.bottom, codes, self.counts, self._sens, self.pcounts)
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
            psummed = np.bincount(key, weights=view.pcounts, minlength=int(total)) if view.pcounts is not None else None
            present = np.flatnonzero(summed) if psummed is None else np.flatnonzero((summed > 0) | (psummed > 0))
            counts = summed[present].astype(np.int64)
            pcounts = psummed[present].astype(np.int64) if psummed is not None else None
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
            return _View(base, new_codes, counts, sens, pcounts)
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
        inv = inv.reshape(-1)
        counts = np.bincount(inv, weights=view.counts, minlength=len(first)).astype(np.int64)
        pcounts = np.bincount(inv, weights=view.pcounts, minlength=len(first)).astype(np.int64) if view.pcounts is not None else None
        return _View(base, [c[first] for c in codes], counts, view.sens[first], pcounts)

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

    def node_stats(self, node: Sequence[int], view: _View | None = None) -> ClassStats:
        """Classes of `node` on `view` with their sizes and which fail (exactly, and in the monotone part)."""
        view = view or self._full_view()
        cls, ncls = self.classes(node, view)
        sizes = np.bincount(cls, weights=view.counts, minlength=ncls).astype(np.int64)
        occupied = sizes > 0
        relaxed_bad = occupied & (sizes < self.k)
        if self.l is not None:
            rows = view.counts > 0
            if view.pcounts is not None and not rows.all():
                distinct = _distinct_per_class(cls[rows], ncls, view.sens[rows], self._n_sens)
            else:
                distinct = _distinct_per_class(cls, ncls, view.sens, self._n_sens)
            relaxed_bad |= occupied & (distinct < self.l)
        else:
            distinct = np.zeros(ncls, np.int64)
        bad = relaxed_bad
        figures = None
        if self.model.needs_counts:
            figures = class_figures(self.model, cls, ncls, view.sens, self._n_sens, view.counts.astype(np.float64), self._q)
            more = failing_classes(self.model, figures)
            if more is not None:
                bad = bad | (occupied & more)
        presence = None
        if view.pcounts is not None and self.spec.presence is not None:
            psizes = np.bincount(cls, weights=view.pcounts, minlength=ncls)
            with np.errstate(divide="ignore", invalid="ignore"):
                presence = np.where(psizes > 0, sizes / np.where(psizes > 0, psizes, 1), np.inf)
            p = self.spec.presence
            bad = bad | (occupied & ((presence < p.delta_min - 1e-12) | (presence > p.delta_max + 1e-12)))
        return ClassStats(cls, sizes, distinct, bad, relaxed_bad, figures, presence)

    def class_stats(self, node: Sequence[int], view: _View | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(class id per row, size per class, distinct sensitive values per class, failing-class mask)."""
        st = self.node_stats(node, view)
        return st.cls, st.sizes, st.distinct, st.bad

    def score(self, node: Sequence[int], st: ClassStats, view: _View | None = None, metric: str | None = None) -> float:
        """The metric's value at `node` given its classes (lower is better; see docs/k-anonymity.md)."""
        metric = metric or self.metric
        view = view or self._full_view()
        sizes, bad = st.sizes, st.bad
        occupied = sizes > 0
        released = occupied & ~bad
        suppressed = int(sizes[bad].sum())
        N = max(self.N, 1)
        if metric == "discernibility":
            return float((sizes[released].astype(np.float64) ** 2).sum() + float(suppressed) * N)
        if metric == "aecs":
            groups = int(released.sum()) + (1 if suppressed else 0)
            return round(N / groups, 10) if groups else float(N)
        total = sum(self._term(i, lv, metric) for i, lv in enumerate(node))
        if suppressed:
            rows = np.flatnonzero(bad[st.cls] & (view.counts > 0))
            c = view.counts[rows].astype(np.float64)
            for i, lv in enumerate(node):
                w = float(self.weights[i])
                if metric == "entropy":
                    # A suppressed record costs its value's entropy at the top: the extra is log2(N / |group|).
                    gen = self._code_count[i][lv][self._codes_at(view, i, lv)[rows]]
                    total += w * float((c * np.log2(N / np.maximum(gen, 1))).sum()) / N
                else:
                    rl = (self._code_loss[i][lv][self._codes_at(view, i, lv)[rows]] if metric == "loss"
                          else np.full(len(rows), lv / self.tops[i] if self.tops[i] else 0.0))
                    extra = (1.0 - self.g_factor) * rl + self.s_factor * (1.0 - rl)
                    total += w * float((c * extra).sum()) / N
        return round(total, 10)

    def bound(self, node: Sequence[int], view: _View | None = None) -> float:
        """A lower bound of the metric over every satisfying node at or above `node`.

        Additive metrics: the generalization terms (suppression only adds). Discernibility: the sum of squared
        class sizes at `node` ignoring suppression (merging classes only raises it, and a suppressed record
        costs N >= its class size). AECS: N / (classes at `node`), as classes only merge going up."""
        if self.additive:
            return round(sum(self.qbound[i][lv] for i, lv in enumerate(node)), 10)
        view = view or self._full_view()
        cls, ncls = self.classes(node, view)
        sizes = np.bincount(cls, weights=view.counts, minlength=ncls)
        if self.metric == "discernibility":
            return float((sizes ** 2).sum())
        groups = int((sizes > 0).sum())
        return round(max(self.N, 1) / groups, 10) if groups else float(max(self.N, 1))

    def evaluate(self, node: tuple[int, ...], view: _View | None = None) -> NodeResult:
        """Suppression, satisfaction and score of `node` (cached); `view` must have its base at or below `node`."""
        hit = self._cache.get(node)
        if hit is not None:
            return hit
        self.evaluations += 1
        st = self.node_stats(node, view)
        suppressed = int(st.sizes[st.bad].sum())
        relaxed = int(st.sizes[st.relaxed_bad].sum()) <= self.limit
        satisfied = suppressed <= self.limit
        if self.additive:
            lb = sum(self.qbound[i][lv] for i, lv in enumerate(node))
        elif self.metric == "discernibility":
            lb = float((st.sizes.astype(np.float64) ** 2).sum())
        else:
            groups = int((st.sizes > 0).sum())
            lb = max(self.N, 1) / groups if groups else float(max(self.N, 1))
        res = NodeResult(node, satisfied, suppressed, self.score(node, st, view), relaxed, round(lb, 10))
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
        """LM per frequency-set row at `node` (weighted mean over QIs)."""
        if not node:
            return np.zeros(self.rows)
        total = np.zeros(self.rows)
        for i, level in enumerate(node):
            total += float(self.weights[i]) * self._value_loss[i][level][self._idx[i]]
        return total

    def all_metrics(self, node: Sequence[int]) -> dict[str, float]:
        """Every metric at `node`, so runs with different metrics can be compared."""
        st = self.node_stats(node)
        return {m: self.score(node, st, metric=m) for m in METRICS}


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
    if lat.forced and lat.limit < 0:
        return (f"k-anonymity target k={spec.k} cannot be met: {lat.forced} records hold values outside a hierarchy with "
                f"on_unknown: suppress, more than the suppression limit of {pct}; extend the hierarchy or raise the limit")
    if lat.N < spec.k:
        return (f"k-anonymity target k={spec.k} cannot be met: the input has only {lat.N} records, fewer than k, "
                f"and suppressing them exceeds the suppression limit of {pct} (suppression_limit {limit}); "
                f"lower k or raise the suppression limit")
    if lat.l is not None:
        distinct = int(len(np.unique(lat._sens[lat.counts > 0]))) if lat.rows else 0
        if distinct < lat.l:
            return (f"l-diversity target l={lat.l} for sensitive attribute '{spec.sensitive}' cannot be met: it has "
                    f"only {distinct} distinct values in the input, so every record would be suppressed, exceeding "
                    f"the suppression limit of {pct}; lower l or raise the suppression limit")
    models = []
    if lat.l is not None:
        models.append(f"{spec.diversity}-l={lat.l}" + (f" (c={spec.c})" if spec.diversity == "recursive" else "") if spec.diversity != "distinct" else f"l={lat.l}")
    if spec.t is not None:
        models.append(f"t-closeness t={spec.t} ({spec.t_measure} distance)")
    if spec.presence is not None:
        models.append(f"delta-presence in [{spec.presence.delta_min}, {spec.presence.delta_max}]")
    return (f"k-anonymity target k={spec.k}"
            + (f" with {', '.join(models)}" if models else "")
            + f" cannot be met within the suppression limit of {pct} by any combination of generalization levels")


def search(lat: Lattice) -> SearchResult:
    """Find the satisfying node of least score (ties: fewer suppressed, then lowest levels).

    Depth-first branch and bound over the QIs, one QI's level at a time, with the QIs not yet assigned held at
    their top level ('*'). Pruning uses monotonicity twice:
      * feasibility, on the monotone part of the models (k and distinct-l, `NodeResult.relaxed`): generalizing
        only merges classes, so its suppression never rises going up the lattice. If a partial assignment
        fails with every unassigned QI fully generalized, every completion fails too, and for the QI being
        assigned only levels at or above its lowest feasible one need exploring (binary search). Models that
        are not monotone under suppression (entropy/recursive diversity, t-closeness, delta-presence) are
        checked exactly on every candidate but never used to prune, so the optimum is still found;
      * bound: a lower bound of the metric over a branch (`Lattice.bound`: per-QI generalization terms for
        additive metrics, class counts at the branch's lowest node otherwise) that cannot beat the incumbent
        cuts the branch. The metrics themselves are not monotone once suppression counts (ARX says the same);
        the bounds are.
    Every node evaluated on the way is a complete node (unassigned QIs at '*') and a candidate; the first
    descent is greedy, so a good incumbent exists early. Raises AnonymityTargetError when nothing satisfies.
    """
    t0 = time.perf_counter()
    if lat.limit < 0:
        raise AnonymityTargetError(_fail_message(lat))
    if lat.N == 0 or not lat.tops:
        b = lat.bottom
        return SearchResult(b, 0, lat.loss(b), 0, 0, time.perf_counter() - t0)
    top = lat.evaluate(lat.top)
    if not top.relaxed or (lat.monotone and not top.satisfied):
        raise AnonymityTargetError(_fail_message(lat))
    q = len(lat.tops)
    best: NodeResult | None = top if top.satisfied else None
    inf = float("inf")

    def rank(r: NodeResult) -> tuple[float, int, tuple[int, ...]]:
        return (r.loss, r.suppressed, r.node)

    def best_score() -> float:
        return best.loss if best is not None else inf

    sat_min: list[tuple[int, ...]] = []  # relaxed-satisfying nodes: everything above them satisfies the relaxation
    fail_max: list[tuple[int, ...]] = []  # relaxed-failing nodes: everything below them fails
    arrays = {"sat": np.zeros((0, q), np.int64), "fail": np.zeros((0, q), np.int64)}

    def sat(node: tuple[int, ...], view: _View | None = None) -> NodeResult:
        """Evaluate a complete candidate exactly and keep the best."""
        nonlocal best
        r = lat.evaluate(node, view)
        if r.satisfied and (best is None or rank(r) < rank(best)):
            best = r
        (sat_min if r.relaxed else fail_max).append(node)
        return r

    def feasible(node: tuple[int, ...], view: _View | None = None) -> bool:
        """Relaxed satisfaction: answered from known nodes by monotonicity when possible, else evaluated."""
        for name, nodes in (("sat", sat_min), ("fail", fail_max)):
            if len(nodes) != arrays[name].shape[0]:
                arrays[name] = np.asarray(nodes, np.int64).reshape(-1, q)
        v = np.asarray(node, np.int64)
        if arrays["sat"].shape[0] and np.any(np.all(arrays["sat"] <= v, axis=1)):
            return True
        if arrays["fail"].shape[0] and np.any(np.all(arrays["fail"] >= v, axis=1)):
            return False
        return sat(node, view).relaxed

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

    additive = lat.additive
    # Per-QI lower bounds: the lowest feasible level of each QI with every other QI at the top.
    qloss = lat.qbound if additive else [[lat.level_loss[i][lv] for lv in range(lat.tops[i] + 1)] for i in range(q)]
    floor = [lowest_feasible(list(lat.tops), i) for i in range(q)]
    order = sorted(range(q), key=lambda i: -qloss[i][floor[i]])  # most constrained QIs first
    # No satisfying node has a QI below its floor, so the search works on the frequency set rolled up to the
    # floors, and each branch rolls its view up further to the levels it has fixed.
    root = lat.rollup(lat._full_view(), tuple(floor)) if lat.nested else lat._full_view()
    visited = 0
    eps = 1e-9

    def branch_bound(node: list[int], view: _View, floors: list[int], depth: int, assigned: float) -> float:
        """Lower bound over the branch whose lowest node has the unassigned QIs at `floors`."""
        if additive:
            return assigned + sum(qloss[o][floors[o]] for o in order[depth:])
        low = list(node)
        for o in order[depth:]:
            low[o] = floors[o]
        return lat.bound(low, view)

    def dfs(depth: int, node: list[int], assigned: float, view: _View, floors: list[int]) -> None:
        nonlocal visited
        visited += 1
        if depth:
            # Floors given the levels fixed so far (others at the top): a tighter bound for every QI left.
            floors = list(floors)
            for j in order[depth:]:
                floors[j] = lowest_feasible(node, j, view, lo=floors[j] - 1)
                if additive and branch_bound(node, view, floors, depth, assigned) > best_score() + eps:
                    return
            if not additive and branch_bound(node, view, floors, depth, assigned) > best_score() * (1 + 1e-12) + eps:
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
            node[i] = lv
            if additive:
                if assigned + qloss[i][lv] + rest[depth + 1] > best_score() + eps:
                    break
            if depth + 1 < q:
                if not additive:
                    low = list(node)
                    for o in order[depth + 1:]:
                        low[o] = floors[o]
                    if lat.bound(low, view) > best_score() * (1 + 1e-12) + eps:
                        break
                base = view.base[:i] + (lv,) + view.base[i + 1:]
                child = lat.rollup(view, base) if lat.rollup_pays(view, base) else view
                dfs(depth + 1, node, assigned + qloss[i][lv], child, floors)
            else:
                r = sat(tuple(node), view)  # complete node: a candidate (its level is feasible by construction)
                if not additive and r.bound > best_score() * (1 + 1e-12) + eps:
                    break
        node[i] = lat.tops[i]

    dfs(0, list(lat.tops), 0.0, root, list(floor))
    if best is None:
        raise AnonymityTargetError(_fail_message(lat))
    return SearchResult(best.node, best.suppressed, best.loss, lat.evaluations, visited, time.perf_counter() - t0)


def exhaustive_search(lat: Lattice) -> NodeResult | None:
    """Evaluate every node (tests only): the satisfying node of least (score, suppressed, levels), or None."""
    import itertools

    if lat.limit < 0:
        return None
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
    #: Seconds the lattice search took (the stage timer "k_anonymity.search"; never part of the report).
    search_seconds: float = field(default=0.0, repr=False, compare=False)

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


def _model_report(spec: KAnonSpec, st: ClassStats, released: np.ndarray) -> dict[str, Any]:
    """Achieved figures of the sensitive-attribute models over released classes (numbers only)."""
    out: dict[str, Any] = {}
    fig = st.figures
    if fig is not None and fig.entropy is not None and released.any():
        out["entropy_l_achieved"] = round(float(np.exp2(fig.entropy[released].min())), 6)
    if fig is not None and fig.ratio is not None and released.any():
        out["recursive_c_needed"] = round(float(fig.ratio[released].max()), 6)  # (c,l) holds for every c above this
    if fig is not None and fig.distance is not None and released.any():
        out["t_achieved"] = round(float(fig.distance[released].max()), 6)
    if st.presence is not None and released.any():
        out["delta_achieved"] = [round(float(st.presence[released].min()), 6), round(float(st.presence[released].max()), 6)]
    return out


def make_plan(freq: pa.Table | None, spec: KAnonSpec, population: pa.Table | None = None) -> Plan:
    """Search the lattice on a frequency set and build the plan and its report. Raises AnonymityTargetError.

    `population` (columns q0.., p) is read from the policy's population table when delta-presence is asked."""
    if population is None and spec.presence is not None and freq is not None:
        population = population_frequency(spec)
    lat = Lattice(freq, spec, population)
    res = search(lat)
    node = res.node
    report: dict[str, Any] = {
        "k_target": spec.k,
        "l_target": spec.l,
        "sensitive": spec.sensitive,
        "suppression_limit": spec.suppression_limit,
        "metric": spec.metric,
        "records_in": lat.N + lat.forced,
        "lattice_nodes": lat.size,
        "nodes_evaluated": res.evaluations,
        "search_seconds": round(res.seconds, 4),
        "levels": {q.path: {"level": lv, "name": q.hierarchy.level_names()[lv], "of": q.hierarchy.top}
                   for q, lv in zip(spec.qis, node)},
    }
    if lat.forced:
        report["records_suppressed_unknown"] = lat.forced
    if lat.N == 0:
        report.update(records_suppressed=lat.forced, records_released=0, k_achieved=None, l_achieved=None, classes=0,
                      class_size_histogram={}, prosecutor_risk=0.0, journalist_risk=0.0, marketer_risk=0.0,
                      information_loss=0.0, generalization_loss=lat.loss(node), metrics={m: 0.0 for m in METRICS})
        return Plan(node, [], report)
    st = lat.node_stats(node)
    cls, sizes, distinct, bad = st.cls, st.sizes, st.distinct, st.bad
    suppress_keys: list[str] = []
    bad_rows = np.nonzero(bad[cls] & (lat.counts > 0))[0]
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
        records_suppressed=n_suppressed + lat.forced,
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
        metrics={m: round(v, 6) for m, v in lat.all_metrics(node).items()},
        **_model_report(spec, st, released),
    )
    return Plan(node, suppress_keys, report)


def _forced_mask(columns: Mapping[str, pa.Array], spec: KAnonSpec, canon: Mapping[str, pa.Array]) -> np.ndarray | None:
    """Rows holding a value outside a QI hierarchy with on_unknown: suppress (removed, counted as suppressed)."""
    mask = None
    for q in spec.qis:
        h = q.hierarchy
        if h.has_domain and h.on_unknown == "suppress":
            unknown = h.unknown(canon[q.path])
            mask = unknown if mask is None else mask | unknown
    return mask


def apply_plan(columns: Mapping[str, pa.Array], spec: KAnonSpec, plan: Plan) -> tuple[dict[str, pa.Array], pa.Array | None]:
    """Generalize the QI columns to the plan's levels; return them and a keep-mask (None = keep every row)."""
    canon = {q.path: canonical_string(_column(columns, q.path)) for q in spec.qis}
    gen = {q.path: q.hierarchy.apply(canon[q.path], level) for q, level in zip(spec.qis, plan.levels)}
    forced = _forced_mask(columns, spec, canon)
    if not plan.suppress_keys and (forced is None or not forced.any()):
        return gen, None
    drop = pc.is_in(class_keys([gen[q.path] for q in spec.qis]), value_set=plan.key_array()) if plan.suppress_keys \
        else pa.array(np.zeros(len(next(iter(canon.values()))) if canon else 0, np.bool_))
    if forced is not None and forced.any():
        drop = pc.or_(drop, pa.array(forced))
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
_SECTION_KEYS = {"k", "quasi_identifiers", "sensitive", "suppression_limit", "streaming", "description", "metric", "weights",
                 "suppression_weight", "presence"}
_SENSITIVE_KEYS = {"field", "l", "diversity", "c", "t", "t_measure", "hierarchy"}
_PRESENCE_KEYS = {"population", "delta_min", "delta_max", "columns"}


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
    metric = rep.get("metric")
    m_part = f"; {metric} {rep['metrics'][metric]}" if metric and metric in (rep.get("metrics") or {}) else ""
    return (f"k={rep.get('k_achieved')} (target {rep.get('k_target')}){l_part}; {levels}; suppressed {sup:,} ({share}); "
            f"prosecutor risk {rep.get('prosecutor_risk')}; information loss {rep.get('information_loss')}{m_part}")


def _auto_fields(policy: CompiledPolicy) -> list[str]:
    return [p for p, a in policy.actions.items() if isinstance(a, Generalize) and a.is_auto]


class KAnonymitySection:
    """The compiled `k_anonymity` section. The lead's graph calls `batch_transform` or `streaming_transform`."""

    def __init__(self, spec: KAnonSpec) -> None:
        self.spec = spec

    def batch_transform(self, runtime: Any = None, spill_dir: str | None = None) -> Any:
        """PTransform over RecordBatch | RunStats elements enforcing k (and l) over the whole input; with
        `spill_dir` (local, private to the run) protected batches wait for the plan in encrypted spill files."""
        from cloakbeam.transforms.kanon_beam import EnforceKAnonymity

        return EnforceKAnonymity(self.spec, spill_dir=spill_dir, runtime=runtime if spill_dir else None)

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
            "metric": s.metric,
            "weights": dict(zip((q.path for q in s.qis), s.weights)) if s.weights is not None else None,
            "suppression_weight": s.suppression_weight,
            "diversity": s.diversity if s.l is not None else None,
            "c": s.c,
            "t": s.t,
            "t_measure": s.t_measure if s.t is not None else None,
            "sensitive_hierarchy": s.sensitive_hierarchy.describe() if s.sensitive_hierarchy is not None else None,
            "presence": {"population": s.presence.path, "delta_min": s.presence.delta_min, "delta_max": s.presence.delta_max}
            if s.presence is not None else None,
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
    sensitive, l_value, diversity, c_value, t_value, t_measure, sens_h = _compile_sensitive(value.get("sensitive"), schema, policy, qi_paths, k)
    metric, weights, sw = _compile_metric(value, qis)
    presence = _compile_presence(value.get("presence"), qis, policy)
    stream = value.get("streaming") or {}
    if not isinstance(stream, Mapping) or set(stream) - {"window_seconds", "allowed_lateness_seconds"}:
        raise _err("'streaming' must be a mapping with 'window_seconds' and optional 'allowed_lateness_seconds'")
    window = stream.get("window_seconds", 60)
    lateness = stream.get("allowed_lateness_seconds", 0)
    for name, v, positive in (("window_seconds", window, True), ("allowed_lateness_seconds", lateness, False)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
            raise _err(f"'streaming.{name}' must be a {'positive' if positive else 'non-negative'} number of seconds")
    spec = KAnonSpec(tuple(qis), k, limit, sensitive, l_value, float(window), float(lateness), metric, weights, sw, diversity,
                     c_value, t_value, t_measure, sens_h, presence)
    return KAnonymitySection(spec)


def _compile_sensitive(sens: Any, schema: InputSchema, policy: CompiledPolicy, qi_paths: set[str], k: int) -> tuple[Any, ...]:
    """(field, l, diversity, c, t, t_measure, hierarchy) of the `sensitive` mapping; PolicyError on problems."""
    if sens is None:
        return None, None, "distinct", None, None, "equal", None
    if not isinstance(sens, Mapping) or set(sens) - _SENSITIVE_KEYS or "field" not in sens:
        raise _err("'sensitive' must be a mapping {field: NAME, l: NUMBER} (optional: diversity: distinct|entropy|recursive, "
                   "c: NUMBER, t: NUMBER, t_measure: equal|hierarchical, hierarchy: {...})")
    sensitive = sens["field"]
    if not isinstance(sensitive, str) or sensitive not in schema.fields or schema.fields[sensitive].is_record:
        raise _err(f"sensitive attribute '{sensitive}' is not a leaf field of schema {schema.source}")
    if sensitive in qi_paths:
        raise _err(f"sensitive attribute '{sensitive}' is also a quasi-identifier; it must be one or the other")
    act = policy.actions.get(sensitive)
    if act is None or act.output_type() is None:
        raise _err(f"sensitive attribute '{sensitive}' is dropped by the fields section; l-diversity is measured "
                   "on its released values, so keep or protect it deterministically")
    t_value = sens.get("t")
    l_value = sens.get("l", None if t_value is not None else 2)
    if l_value is not None:
        if isinstance(l_value, bool) or not isinstance(l_value, int) or l_value < 2:
            raise _err("'sensitive.l' must be an integer of at least 2 (distinct sensitive values per class)")
        if l_value > k:
            raise _err(f"'sensitive.l' ({l_value}) cannot exceed 'k' ({k}): a class of k records has at most k distinct values")
    diversity = sens.get("diversity", "distinct")
    if diversity not in ("distinct", "entropy", "recursive"):
        raise _err("'sensitive.diversity' must be distinct, entropy or recursive")
    if diversity != "distinct" and l_value is None:
        raise _err(f"'sensitive.diversity: {diversity}' needs 'sensitive.l'")
    c_value = sens.get("c")
    if diversity == "recursive":
        if isinstance(c_value, bool) or not isinstance(c_value, (int, float)) or not c_value > 0:
            raise _err("recursive (c,l)-diversity needs 'sensitive.c', a positive number (the most frequent value must "
                       "stay below c times the sum of the l-th and rarer ones)")
    elif c_value is not None:
        raise _err("'sensitive.c' applies to 'diversity: recursive' only")
    if t_value is not None and (isinstance(t_value, bool) or not isinstance(t_value, (int, float)) or not 0 <= t_value <= 1):
        raise _err("'sensitive.t' must be a distance between 0 and 1 (t-closeness)")
    t_measure = sens.get("t_measure", "equal")
    if t_measure not in ("equal", "hierarchical"):
        raise _err("'sensitive.t_measure' must be 'equal' (every two values at distance 1) or 'hierarchical'")
    if "t_measure" in sens and t_value is None:
        raise _err("'sensitive.t_measure' needs 'sensitive.t'")
    sens_h = None
    if t_measure == "hierarchical":
        if "hierarchy" not in sens:
            raise _err("hierarchical t-closeness needs 'sensitive.hierarchy' (e.g. {hierarchy: csv, path: diagnosis.csv}), "
                       "the tree the ground distance is measured in")
        sens_h, problem = build_hierarchy(sens["hierarchy"], pa.string())
        if sens_h is None:
            raise _err(f"sensitive attribute '{sensitive}' has a bad hierarchy: the field {problem}")
    elif "hierarchy" in sens:
        raise _err("'sensitive.hierarchy' is used by 't_measure: hierarchical' only")
    return sensitive, l_value, diversity, float(c_value) if c_value is not None else None, \
        float(t_value) if t_value is not None else None, t_measure, sens_h


def _compile_metric(value: Mapping[str, Any], qis: Sequence[QuasiIdentifier]) -> tuple[str, tuple[float, ...] | None, float]:
    metric = value.get("metric", "loss")
    if metric not in METRICS:
        raise _err(f"'metric' must be one of {', '.join(METRICS)}")
    raw_w = value.get("weights")
    weights = None
    if raw_w is not None:
        if metric not in ADDITIVE_METRICS:
            raise _err(f"'weights' apply to the metrics {', '.join(ADDITIVE_METRICS)}; metric '{metric}' has no per-attribute terms")
        if not isinstance(raw_w, Mapping) or not raw_w:
            raise _err("'weights' must map quasi-identifiers to positive numbers, e.g. {zip: 2, gender: 0.5}")
        paths = [q.path for q in qis]
        for name, w in raw_w.items():
            if name not in paths:
                raise _err(f"'weights' names '{name}', which is not a quasi-identifier")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
                raise _err(f"'weights.{name}' must be a positive number")
        weights = tuple(float(raw_w.get(p, 1.0)) for p in paths)
    sw = value.get("suppression_weight", 0.5)
    if isinstance(sw, bool) or not isinstance(sw, (int, float)) or not 0 <= sw <= 1:
        raise _err("'suppression_weight' must be between 0 (suppressing is free) and 1 (generalizing is free); 0.5 weighs both alike")
    if "suppression_weight" in value and metric not in ("loss", "precision"):
        raise _err(f"'suppression_weight' applies to the metrics loss and precision, not '{metric}'")
    return metric, weights, float(sw)


def _compile_presence(raw: Any, qis: Sequence[QuasiIdentifier], policy: CompiledPolicy) -> Presence | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - _PRESENCE_KEYS or "population" not in raw:
        raise _err("'presence' must be a mapping {population: {path: FILE}, delta_min: 0, delta_max: 0.5} (delta-presence)")
    pop = raw["population"]
    if not isinstance(pop, Mapping) or set(pop) != {"path"} or not isinstance(pop["path"], str) or not pop["path"]:
        raise _err("'presence.population' must be {path: FILE}, a CSV or Parquet table of the population with the "
                   "quasi-identifier columns (relative to the policy file)")
    dmin, dmax = raw.get("delta_min", 0.0), raw.get("delta_max", 1.0)
    for name, v in (("delta_min", dmin), ("delta_max", dmax)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise _err(f"'presence.{name}' must be a share between 0 and 1")
    if not dmin <= dmax:
        raise _err("'presence.delta_min' must not exceed 'presence.delta_max'")
    cols = raw.get("columns", {}) or {}
    if not isinstance(cols, Mapping) or any(c not in {q.path for q in qis} or not isinstance(v, str) for c, v in cols.items()):
        raise _err("'presence.columns' must map quasi-identifiers to the population table's column names")
    source = policy.source
    base = None if source.startswith("<") else (os.path.dirname(os.path.abspath(source)) if "://" not in source else source.rsplit("/", 1)[0])
    return Presence(pop["path"], base, float(dmin), float(dmax), tuple((q.path, str(cols.get(q.path, q.path))) for q in qis))


register_section(SECTION, compile_section)
