"""Content detectors: find e-mail addresses, phone numbers, SSNs, card numbers, IP addresses and dates in Arrow
string columns, vectorized.

Each detector is a regular expression (run by `pyarrow.compute`, RE2 syntax that Python's `re` also accepts)
plus a validator that rejects look-alikes (Luhn for cards, SSN area/group/serial rules, octet and calendar
ranges). Validators work on whole candidate arrays with pyarrow/numpy; the one exception is PHONE, which asks
`phonenumbers` per candidate value (see `_validate_phone`).

`evaluate(detector, column)` answers two questions per row: does the value *contain* a valid match (the first
regex candidate in the value, validated), and *is* the whole value one (the candidate equals the trimmed value).
Classification uses `full` hit rates; the fail-closed guard and free-text scrubbing use `contains`.
`find_spans` returns every validated span of one string (free text is per row by nature).

Nothing here returns, logs or raises with a matched value except `find_spans`, whose caller replaces the spans.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The data classes every field can get (see docs/classification-and-masking.md).
CLASSES = (
    "PERSON_NAME",
    "EMAIL",
    "PHONE",
    "US_SSN",
    "CREDIT_CARD",
    "DATE_OF_BIRTH",
    "POSTAL_CODE",
    "IP_ADDRESS",
    "GENDER",
    "FREE_TEXT",
    "IDENTIFIER",
    "NUMERIC",
    "LABEL",
    "OTHER",
)

Validator = Callable[[pa.Array], np.ndarray]


@dataclass(frozen=True)
class Detector:
    """One content detector. `pattern` has a named group `m` holding the candidate (the rest is context)."""

    name: str
    data_class: str
    pattern: str
    validate: Validator | None = None
    #: True when the validator is per value (Python); the pipeline check caps how many candidates it validates.
    per_value: bool = False
    #: False for shape-only detectors (zip, gender) that are meaningless inside free text.
    in_text: bool = True
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def regex(self) -> re.Pattern[str]:
        """The same pattern compiled for Python `re` (ASCII semantics like RE2), for span finding."""
        if not self._compiled:
            self._compiled.append(re.compile(self.pattern, re.ASCII))
        return self._compiled[0]


# -- helpers ------------------------------------------------------------------------------------------------

def _np_bool(arr: pa.Array) -> np.ndarray:
    """Boolean Arrow array -> numpy bool, nulls as False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _digits(arr: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(arr, r"[^0-9]", "")


def _fixed_width_digits(arr: pa.Array, width: int) -> np.ndarray:
    """ASCII digit strings, each at most `width` long, as an (n, width) uint8 matrix, left-padded with zeros."""
    padded = pc.utf8_lpad(arr, width=width, padding="0")
    padded = pa.concat_arrays([padded]) if padded.offset else padded
    n = len(padded)
    if n == 0:
        return np.zeros((0, width), dtype=np.uint8)
    offsets = np.frombuffer(padded.buffers()[1], dtype=np.int32, count=n + 1)
    data = np.frombuffer(padded.buffers()[2], dtype=np.uint8)
    mat = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
    return mat - ord("0")


def luhn_valid(digit_strings: pa.Array) -> np.ndarray:
    """Vectorized Luhn check over ASCII digit strings of 1..19 digits (no nulls). Left zero padding keeps the
    checksum, so every string is padded to 19 digits and checked as one numpy matrix."""
    mat = _fixed_width_digits(digit_strings, 19).astype(np.int16)
    double = (np.arange(19)[::-1] % 2) == 1  # every second digit counted from the right (check digit excluded)
    doubled = mat[:, double] * 2
    doubled -= 9 * (doubled > 9)
    total = mat[:, ~double].sum(axis=1) + doubled.sum(axis=1)
    return (total % 10) == 0


# -- validators ---------------------------------------------------------------------------------------------

def _validate_card(cands: pa.Array) -> np.ndarray:
    digits = _digits(cands)
    n = pc.utf8_length(digits).to_numpy(zero_copy_only=False)
    ok = (n >= 13) & (n <= 19)
    if not ok.any():
        return ok
    idx = np.flatnonzero(ok)
    sub = digits.take(pa.array(idx))
    good = luhn_valid(sub)
    # One repeated digit (0000..., 4444...) passes Luhn for some lengths but is never an issued card.
    same = _np_bool(pc.match_substring_regex(sub, r"^(0+|1+|2+|3+|4+|5+|6+|7+|8+|9+)$"))
    ok[idx] = good & ~same
    return ok


def _validate_ssn(cands: pa.Array) -> np.ndarray:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    digits = _digits(cands)
    area = pc.cast(pc.utf8_slice_codeunits(digits, 0, 3), pa.int32()).to_numpy(zero_copy_only=False)
    group = pc.cast(pc.utf8_slice_codeunits(digits, 3, 5), pa.int32()).to_numpy(zero_copy_only=False)
    serial = pc.cast(pc.utf8_slice_codeunits(digits, 5, 9), pa.int32()).to_numpy(zero_copy_only=False)
    return (area != 0) & (area != 666) & (area < 900) & (group != 0) & (serial != 0)


def _validate_email(cands: pa.Array) -> np.ndarray:
    local = pc.utf8_length(pc.replace_substring_regex(cands, r"@.*$", "")).to_numpy(zero_copy_only=False)
    total = pc.utf8_length(cands).to_numpy(zero_copy_only=False)
    bad = _np_bool(pc.match_substring_regex(cands, r"(^\.|\.\.|\.@)"))
    return (local >= 1) & (local <= 64) & (total <= 254) & ~bad


_DAYS = np.array([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def _validate_date(cands: pa.Array) -> np.ndarray:
    """Calendar check (month 1-12, day within the month, leap years) for ISO and US-style dates."""
    iso = pc.extract_regex(cands, r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})$")
    us = pc.extract_regex(cands, r"^(?P<mo>[0-9]{1,2})/(?P<d>[0-9]{1,2})/(?P<y>[0-9]{4})$")
    is_iso = _np_bool(pc.is_valid(iso))

    def part(name: str) -> np.ndarray:
        a = pc.if_else(pc.is_valid(iso), pc.struct_field(iso, name), pc.struct_field(us, name))
        a = pc.if_else(pc.equal(pc.fill_null(a, ""), ""), "0", a)
        return pc.cast(pc.fill_null(a, "0"), pa.int32()).to_numpy(zero_copy_only=False)

    y, mo, d = part("y"), part("mo"), part("d")
    month_ok = (mo >= 1) & (mo <= 12)
    max_day = _DAYS[np.clip(mo - 1, 0, 11)].copy()
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    max_day[(mo == 2) & ~leap] = 28
    ok = month_ok & (d >= 1) & (d <= max_day) & (y >= 1800) & (y <= 2200)
    has = is_iso | _np_bool(pc.is_valid(us))
    return ok & has


def _validate_phone(cands: pa.Array) -> np.ndarray:
    """Per value by necessity: numbering-plan rules (country codes, national number lengths) live in the
    `phonenumbers` metadata, not in a regex. Only regex candidates with 7-15 digits reach it. A number counts when
    it parses and is *possible* for its region (length rules); `is_valid_number` would also reject unassigned
    area codes, which synthetic and many real test numbers use."""
    import phonenumbers

    ndig = pc.utf8_length(_digits(pc.replace_substring_regex(cands, r"(?i)\s*(x|ext\.?)\s*[0-9]+$", ""))).to_numpy(
        zero_copy_only=False
    )
    ok = (ndig >= 7) & (ndig <= 15)
    values = pc.replace_substring_regex(cands, r"^00", "+").to_pylist()  # 00 = international prefix, like +
    for i in np.flatnonzero(ok):
        try:
            num = phonenumbers.parse(values[i], "US")
            ok[i] = phonenumbers.is_possible_number(num)
        except phonenumbers.NumberParseException:
            ok[i] = False
    return ok


def _validate_gender(cands: pa.Array) -> np.ndarray:
    return _np_bool(pc.is_in(pc.utf8_lower(cands), value_set=pa.array(_GENDER_VALUES)))


_GENDER_VALUES = [
    "m", "f", "x", "male", "female", "man", "woman", "non-binary", "nonbinary", "other", "unknown",
    "u", "prefer not to say", "undisclosed", "nb",
]

# -- the detector table ------------------------------------------------------------------------------------
# Context groups before `m` stand in for look-behind (RE2 has none); `\b` is ASCII in both RE2 and re.ASCII.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}"
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = (  # forms with an embedded IPv4 first: alternation is leftmost-first in both RE2 and re
    rf"(?:::(?:[Ff]{{4}}(?::0{{1,4}})?:)?{_IPV4}|(?:{_H}:){{1,4}}:{_IPV4}|(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|(?:{_H}:){{1,6}}:{_H}|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
    rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}|:(?:(?::{_H}){{1,7}}|:))"
)
_EDGE = r"(?:^|[^0-9A-Za-z_+.:-])"  # what may precede a candidate
_EDGE_END = r"(?:$|[^0-9A-Za-z_:])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "EMAIL",
            "EMAIL",
            rf"(?P<m>[A-Za-z0-9._%+-]+@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,24}})\b",
            _validate_email,
        ),
        Detector("US_SSN", "US_SSN", r"(?:^|[^0-9-])(?P<m>[0-9]{3}[- ][0-9]{2}[- ][0-9]{4})(?:$|[^0-9-])", _validate_ssn),
        Detector(
            "CREDIT_CARD",
            "CREDIT_CARD",
            r"(?:^|[^0-9-])(?P<m>[0-9](?:[ -]?[0-9]){12,18})(?:$|[^0-9])",
            _validate_card,
        ),
        Detector(
            "PHONE",
            "PHONE",
            r"(?:^|[^0-9A-Za-z_+.-])(?P<m>(?:\+[0-9]{1,3}[ .-]?|00[0-9]{1,3}[ .-]?)?(?:\([0-9]{3}\) ?|[0-9]{3}[ .-]?)"
            r"[0-9]{3}[ .-]?[0-9]{4}(?: ?(?:x|ext\.? ?)[0-9]{1,6})?)(?:$|[^0-9A-Za-z_])",
            _validate_phone,
            per_value=True,
        ),
        Detector("IP_ADDRESS", "IP_ADDRESS", rf"{_EDGE}(?P<m>{_IPV4}|{_IPV6}){_EDGE_END}"),
        Detector(
            "DATE",
            "DATE_OF_BIRTH",
            r"(?:^|[^0-9/-])(?P<m>[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{1,2}/[0-9]{1,2}/[0-9]{4})(?:$|[^0-9/-])",
            _validate_date,
        ),
        Detector("POSTAL_CODE", "POSTAL_CODE", r"^\s*(?P<m>[0-9]{5}(?:-[0-9]{4})?)\s*$", in_text=False),
        Detector("GENDER", "GENDER", r"^\s*(?P<m>[A-Za-z][A-Za-z -]{0,20})\s*$", _validate_gender, in_text=False),
    )
}

#: Detectors whose hits in a field kept in clear fail the run by default.
GUARD_DETECTORS = ("US_SSN", "CREDIT_CARD")
#: Detectors whose spans `scrub` replaces by default.
TEXT_DETECTORS = tuple(name for name, d in DETECTORS.items() if d.in_text and name != "DATE")


_MAX_RETRIES = 4  # later candidates examined per value after an invalid first one


@dataclass
class Evaluation:
    """Per-row results of one detector over one column (numpy bool arrays, nulls count as misses)."""

    contains: np.ndarray
    full: np.ndarray
    examined: int  # rows the validator looked at (all non-null rows unless capped)

    @property
    def contains_hits(self) -> int:
        return int(self.contains.sum())

    @property
    def full_hits(self) -> int:
        return int(self.full.sum())


def as_strings(column: pa.Array) -> pa.Array | None:
    """The column as a string array, or None for types no detector reads (numbers, booleans, binary)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_string(t):
        return column
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return column.cast(pa.string())
    if pa.types.is_dictionary(t) and pa.types.is_string(t.value_type):
        return column.cast(pa.string())
    return None


def evaluate(detector: Detector | str, column: pa.Array, max_validate: int | None = None) -> Evaluation:
    """Run one detector over a column. `max_validate` caps how many candidates a per-value validator checks
    (rows after the cap count as misses; `examined` says how many rows were covered)."""
    det = DETECTORS[detector] if isinstance(detector, str) else detector
    strings = as_strings(column)
    n = len(column)
    contains = np.zeros(n, dtype=bool)
    full = np.zeros(n, dtype=bool)
    if strings is None or n == 0:
        return Evaluation(contains, full, 0)
    nonnull = n - strings.null_count
    examined = nonnull
    ext = pc.extract_regex(strings, det.pattern)
    idx = np.flatnonzero(_np_bool(pc.is_valid(ext)))
    if det.per_value and max_validate is not None and len(idx) > max_validate:
        cut = idx[max_validate]
        examined = int(nonnull - pc.sum(pc.is_valid(strings.slice(cut))).as_py() if cut < n else nonnull)
        idx = idx[:max_validate]
    if len(idx) == 0:
        return Evaluation(contains, full, examined)
    take = pa.array(idx)
    cands = pc.struct_field(ext.take(take), "m")
    ok = det.validate(cands) if det.validate is not None else np.ones(len(idx), dtype=bool)
    contains[idx] = ok
    whole = _np_bool(pc.equal(cands, pc.utf8_trim_whitespace(strings.take(take))))
    full[idx] = ok & whole
    # A row whose first candidate failed validation may hold a valid one later ("000-12-3456, 219-09-9999"):
    # cut the first match away and look again, on those rows only, a bounded number of times.
    retry = idx[~ok]
    rest = strings.take(pa.array(retry)) if len(retry) else None
    for _ in range(_MAX_RETRIES):
        if rest is None or len(retry) == 0 or det.validate is None:
            break
        rest = pc.replace_substring_regex(rest, det.pattern, " ", max_replacements=1)
        ext2 = pc.extract_regex(rest, det.pattern)
        has = _np_bool(pc.is_valid(ext2))
        if not has.any():
            break
        sub = np.flatnonzero(has)
        ok2 = det.validate(pc.struct_field(ext2.take(pa.array(sub)), "m"))
        contains[retry[sub[ok2]]] = True
        keep = sub[~ok2]
        retry, rest = retry[keep], rest.take(pa.array(keep))
    return Evaluation(contains, full, examined)


def any_candidate(column: pa.Array, detectors: Iterable[str]) -> np.ndarray:
    """Rows whose text matches any of the detectors' regexes (unvalidated): the cheap pre-filter for scrubbing."""
    strings = as_strings(column)
    if strings is None:
        return np.zeros(len(column), dtype=bool)
    combined = "|".join(f"(?:{DETECTORS[d].pattern.replace('(?P<m>', '(')})" for d in detectors)
    return _np_bool(pc.match_substring_regex(strings, combined))


def iter_candidates(detector: Detector | str, text: str) -> Iterable[tuple[int, int]]:
    """(start, end) of every unvalidated regex candidate of one detector in one string."""
    det = DETECTORS[detector] if isinstance(detector, str) else detector
    rx = det.regex()
    pos = 0
    while True:
        m = rx.search(text, pos)
        if m is None:
            return
        yield m.start("m"), m.end("m")
        # Continue right after the candidate, so the trailing context character can lead the next match.
        pos = max(m.end("m"), m.start() + 1)


def find_spans(text: str, detectors: Iterable[str]) -> list[tuple[int, int, str]]:
    """Every validated (start, end, detector name) span in one string, candidates validated per detector in
    one vectorized call."""
    out: list[tuple[int, int, str]] = []
    for name in detectors:
        det = DETECTORS[name]
        spans = list(iter_candidates(det, text))
        if not spans:
            continue
        if det.validate is not None:
            ok = det.validate(pa.array([text[s:e] for s, e in spans], type=pa.string()))
        else:
            ok = np.ones(len(spans), dtype=bool)
        out.extend((s, e, name) for (s, e), good in zip(spans, ok) if good)
    return out
