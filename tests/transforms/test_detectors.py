"""Content detectors: table-driven valid/invalid examples per detector, plus properties checked against
independent reference implementations (Luhn, SSA rules, `ipaddress`, `datetime`)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.transforms.detectors import DETECTORS, any_candidate, evaluate, find_spans, luhn_valid

# detector -> (values that ARE such a value, values that are not)
CASES = {
    "EMAIL": (
        ["john@example.com", "a.b+tag@sub.example.co.uk", "x_y-z@mail.example.net", " padded@example.org "],
        ["plain", "a@b", "@example.com", "a..b@example.com", ".a@example.com", "a.@example.com", "a@@example.com", "a@-x.com"],
    ),
    "US_SSN": (
        ["123-45-6789", "219-09-9999", "899-99-9999", "001-01-0001", "123 45 6789"],
        ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567", "123-45-0000", "12-345-6789", "1234-56-789", "123-45-67890"],
    ),
    "CREDIT_CARD": (
        ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559", "378282246310005", "6011000990139424"],
        ["4111111111111112", "1234567812345678", "0000000000000000", "4111", "411111111111", "12345678901234567890", "5500-0055-5555-5550"],
    ),
    "PHONE": (
        ["(212)555-1234", "212-555-1234", "212.555.1234", "+1 (212) 555-1234", "+1-537-640-6812x41586", "206.269.0743x9150", "+1 212 555 1234"],
        ["12", "555-1234", "phone", "2125551234567890123", "1-2-3"],
    ),
    "IP_ADDRESS": (
        ["192.168.0.1", "10.0.0.255", "0.0.0.0", "2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1", "2001:db8:a:b::c", "::ffff:192.0.2.1"],
        ["256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4x", "2001:db8:::1", "gggg::1", "1:2:3:4:5:6:7:8:9"],
    ),
    "DATE": (
        ["2020-02-29", "1999-12-31", "12/31/1999", "1/2/2003", "2000-02-29"],
        ["2021-02-29", "1900-02-29", "2020-13-01", "2020-00-10", "2020-04-31", "13/01/2020", "2020/01/01", "20200101"],
    ),
    "POSTAL_CODE": (["94103", "02139", "94103-1234"], ["9410", "941031", "ABCDE", "94103-12"]),
    "GENDER": (["female", "Male", "F", "nonbinary", "unknown"], ["banana", "fe male", "123"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detector_accepts_valid_and_rejects_invalid(name):
    valid, invalid = CASES[name]
    column = pa.array(valid + invalid + [None], type=pa.string())
    ev = evaluate(name, column)
    got_full = [v for v, hit in zip(column.to_pylist(), ev.full) if hit]
    assert got_full == valid, f"{name}: full-value hits differ"
    assert not ev.full[-1] and not ev.contains[-1]  # null is never a hit
    assert ev.examined == len(valid) + len(invalid)


@pytest.mark.parametrize("name", ["EMAIL", "US_SSN", "CREDIT_CARD", "PHONE", "IP_ADDRESS", "DATE"])
def test_detector_finds_values_inside_text_but_not_as_whole_value(name):
    valid, _ = CASES[name]
    value = valid[0].strip()
    column = pa.array([f"see {value} here", f"({value})", "nothing to see"])
    ev = evaluate(name, column)
    assert ev.contains.tolist() == [True, True, False]
    assert ev.full.tolist() == [False, False, False]
    spans = find_spans(f"see {value} here", [name])
    assert [(s, e) for s, e, _ in spans] == [(4, 4 + len(value))]


def test_non_string_columns_have_no_hits():
    ev = evaluate("US_SSN", pa.array([123456789, None]))
    assert ev.contains.tolist() == [False, False] and ev.examined == 0


def test_per_value_detector_cap_reports_examined_rows():
    col = pa.array(["212-555-1234"] * 10 + [None] + ["212-555-1234"] * 5)
    ev = evaluate("PHONE", col, max_validate=4)
    assert ev.full_hits == 4
    assert ev.examined == 4  # rows up to the 5th candidate, nulls not counted
    assert evaluate("PHONE", col).full_hits == 15


def test_any_candidate_prefilter_is_a_superset_of_validated_hits():
    col = pa.array(["mail a@example.com", "no pii", None, "ssn 000-12-3456", "card 4111111111111111"])
    rows = any_candidate(col, ["EMAIL", "US_SSN", "CREDIT_CARD"])
    assert rows.tolist() == [True, False, False, True, True]


# -- properties against reference implementations ----------------------------------------------------------

def _luhn_reference(s: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(s)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789", min_size=1, max_size=19), min_size=1, max_size=50))
def test_vectorized_luhn_matches_reference(numbers):
    got = luhn_valid(pa.array(numbers))
    assert got.tolist() == [_luhn_reference(n) for n in numbers]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 999), st.integers(0, 99), st.integers(0, 9999))
def test_ssn_rules_match_the_ssa_definition(area, group, serial):
    value = f"{area:03d}-{group:02d}-{serial:04d}"
    expected = area not in (0, 666) and area < 900 and group != 0 and serial != 0
    assert bool(evaluate("US_SSN", pa.array([value])).full[0]) == expected


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)))
def test_every_real_ip_address_is_detected(addr):
    assert bool(evaluate("IP_ADDRESS", pa.array([addr])).full[0]), "missed an address ipaddress accepts"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdef:.", min_size=2, max_size=45))
def test_ip_detector_never_accepts_what_ipaddress_rejects(text):
    hit = bool(evaluate("IP_ADDRESS", pa.array([text])).full[0])
    if hit:
        ipaddress.ip_address(text)  # raises when the detector accepted an invalid address


@settings(max_examples=200, deadline=None)
@given(st.integers(1800, 2200), st.integers(0, 13), st.integers(0, 32))
def test_date_validator_matches_the_calendar(y, m, d):
    try:
        dt.date(y, m, d)
        real = True
    except ValueError:
        real = False
    assert bool(evaluate("DATE", pa.array([f"{y:04d}-{m:02d}-{d:02d}"])).full[0]) == real


def test_detectors_have_distinct_names_and_compile_in_python_re():
    for name, det in DETECTORS.items():
        assert det.name == name
        assert det.regex().groupindex.get("m"), name
    assert np.all(evaluate("EMAIL", pa.array([], pa.string())).full == np.array([], dtype=bool))


def test_a_valid_value_after_invalid_look_alikes_is_still_found():
    col = pa.array([
        "old 000-12-3456, new 219-09-9999",
        "000-12-3456 666-12-3456 219-09-9999",
        "000-12-3456 only",
        "cards 4111111111111112 and 4111 1111 1111 1111",
    ])
    assert evaluate("US_SSN", col).contains.tolist() == [True, True, False, False]
    assert evaluate("CREDIT_CARD", col).contains.tolist()[3] is True
