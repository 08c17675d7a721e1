"""The `mask` action: table-driven per method (output, nulls, shape), determinism across runs and separately
built workers, key dependence of date shifts, and every bad configuration failing at construction."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import PolicyError
from cloakbeam.tests.classify_fixtures import make_action, make_ctx

CASES = [
    # (params, input values, expected output)
    ({"method": "redact"}, ["a", None, "c"], [None, None, None]),
    ({"method": "redact", "value": "[REDACTED]"}, ["a", None, "c"], ["[REDACTED]"] * 3),
    ({"method": "partial"}, ["4111111111111111", "abc", None, ""], ["************1111", "***", None, ""]),
    ({"method": "partial", "keep_first": 2, "keep_last": 1, "char": "#"}, ["abcdefg", "abc", "ab"], ["ab####g", "###", "##"]),
    ({"method": "partial", "keep_first": 1, "keep_last": 0}, ["Zoë Ünal", "x"], ["Z*******", "*"]),
    ({"method": "email"}, ["Bob.Smith@Example.COM", " a@b.org ", "not-an-email", None], ["****@example.com", "****@b.org", None, None]),
    ({"method": "email", "char": "x"}, ["a@b.io"], ["xxxx@b.io"]),
    ({"method": "phone"}, ["+1 (212) 555-0143", "206.269.0743x9150", "12345", None], ["*********43", "********43", None, None]),
    ({"method": "phone", "keep_last": 4, "char": "#"}, ["212-555-0143"], ["######0143"]),
    ({"method": "phone", "keep_last": 0}, ["212-555-0143"], ["**********"]),
    (
        {"method": "ip"},
        ["192.168.7.77", "10.0.0.1", "300.1.1.1", "2001:db8:abcd:1234::1", "2001:db8:a:b::c", "junk", None],
        ["192.168.7.0", "10.0.0.0", None, "2001:db8:abcd::", "2001:db8:a::", None, None],
    ),
    ({"method": "ip", "v4_prefix": 16, "v6_prefix": 32}, ["192.168.7.77", "2001:db8:abcd::1"], ["192.168.0.0", "2001:db8::"]),
    ({"method": "ip", "v4_prefix": 0}, ["192.168.7.77"], ["0.0.0.0"]),
]


@pytest.mark.parametrize("params,values,expected", CASES)
def test_string_methods(params, values, expected, tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    action = make_action("mask", "f", **params)
    out = action.apply(pa.array(values, type=pa.string()), {}, ctx)
    assert out.to_pylist() == expected
    assert len(out) == len(values)
    assert out.type == action.output_type()


def test_unparsed_values_are_counted_never_passed_through(tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    make_action("mask", "email", method="email").apply(pa.array(["x", "y@z.com", None]), {}, ctx)
    assert ctx.stats == {"mask.email.unparsed": 1}


def test_redact_keeps_non_string_types(tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    out = make_action("mask", "income", pa.float64(), method="redact", value=0).apply(pa.array([1.5, None]), {}, ctx)
    assert out.type == pa.float64() and out.to_pylist() == [0.0, 0.0]
    out = make_action("mask", "income", pa.float64(), method="redact").apply(pa.array([1.5, None]), {}, ctx)
    assert out.null_count == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=30), st.integers(0, 5), st.integers(0, 5))
def test_partial_never_reveals_more_than_asked(values, first, last):
    import tempfile
    from pathlib import Path

    ctx = make_ctx(Path(tempfile.mkdtemp()) / "k.json")
    out = make_action("mask", "f", method="partial", keep_first=first, keep_last=last).apply(pa.array(values, pa.string()), {}, ctx).to_pylist()
    for v, o in zip(values, out):
        if v is None:
            assert o is None
            continue
        assert len(o) == len(v)
        if len(v) <= first + last:
            assert set(o) <= {"*"}
        else:
            assert o[:first] == v[:first] and (last == 0 or o[-last:] == v[-last:])
            assert set(o[first : len(v) - last]) <= {"*"}


# -- date shifting ------------------------------------------------------------------------------------------

DATES = pa.array([dt.date(2000, 1, 1), dt.date(1980, 6, 15), dt.date(2000, 1, 1), None, dt.date(1990, 3, 3)], pa.date32())
SUBJECTS = pa.array(["c1", "c2", "c1", "c3", None])


def test_date_shift_is_consistent_per_subject_bounded_and_nonzero(tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    action = make_action("mask", "dob", pa.date32(), method="date_shift", subject="customer_id", max_days=10)
    out = action.apply(DATES, {"customer_id": SUBJECTS}, ctx).to_pylist()
    assert out[3] is None  # null date stays null
    assert out[4] is None  # no subject: withheld, never left unshifted
    d0 = (out[0] - dt.date(2000, 1, 1)).days
    assert d0 == (out[2] - dt.date(2000, 1, 1)).days  # same subject, same offset
    assert 1 <= abs(d0) <= 10
    assert 1 <= abs((out[1] - dt.date(1980, 6, 15)).days) <= 10
    assert ctx.stats["mask.dob.unparsed"] == 1


def test_date_shift_offsets_spread_over_the_whole_window(tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    n = 2000
    base = pa.array([dt.date(2000, 1, 1)] * n, pa.date32())
    subj = pa.array([f"s{i}" for i in range(n)])
    out = make_action("mask", "d", pa.date32(), method="date_shift", subject="s", max_days=3).apply(base, {"s": subj}, ctx)
    offsets = {(d - dt.date(2000, 1, 1)).days for d in out.to_pylist()}
    assert offsets == {-3, -2, -1, 1, 2, 3}


def test_date_shift_timestamps_move_by_whole_days(tmp_path):
    ctx = make_ctx(tmp_path / "k.json")
    t = pa.timestamp("us", tz="UTC")
    ts = pa.array([dt.datetime(2020, 5, 1, 13, 45, 7, 123456, tzinfo=dt.timezone.utc)], t)
    out = make_action("mask", "ts", t, method="date_shift", subject="s").apply(ts, {"s": pa.array(["a"])}, ctx)
    moved = out[0].as_py()
    delta = moved - ts[0].as_py()
    assert delta.seconds == 0 and delta.microseconds == 0 and 1 <= abs(delta.days) <= 30


def test_date_shift_determinism_across_workers_and_dependence_on_key(tmp_path):
    action = make_action("mask", "dob", pa.date32(), method="date_shift", subject="customer_id", max_days=365)
    cols = {"customer_id": pa.array([f"c{i}" for i in range(len(DATES))])}
    a = action.apply(DATES, cols, make_ctx(tmp_path / "k1.json"))
    b = make_action("mask", "dob", pa.date32(), method="date_shift", subject="customer_id", max_days=365).apply(DATES, cols, make_ctx(tmp_path / "k1.json"))
    c = action.apply(DATES, cols, make_ctx(tmp_path / "k2.json"))
    assert a.equals(b)
    assert not a.equals(c)


@pytest.mark.parametrize("method", ["partial", "email", "phone", "ip", "redact"])
def test_string_methods_are_deterministic_across_workers(method, tmp_path):
    values = pa.array(["Bob@x.com", "192.168.1.1", "212-555-0143", None])
    a = make_action("mask", "f", method=method).apply(values, {}, make_ctx(tmp_path / "a.json"))
    b = make_action("mask", "f", method=method).apply(values, {}, make_ctx(tmp_path / "b.json"))
    assert a.equals(b)  # masking is keyless: identical everywhere


@pytest.mark.parametrize(
    "arrow_type,params,message",
    [
        (pa.string(), {}, "parameter 'method' is required"),
        (pa.string(), {"method": "blur"}, "must be one of"),
        (pa.string(), {"method": "email", "keep_last": 2}, "parameter 'keep_last' does not apply to method 'email'"),
        (pa.string(), {"method": "partial", "char": "**"}, "exactly one character"),
        (pa.string(), {"method": "partial", "keep_last": -1}, "must be 0 or more"),
        (pa.string(), {"method": "ip", "v4_prefix": 33}, "between 0 and 32"),
        (pa.string(), {"method": "phone", "keep_last": 6}, "at most 4 digits"),
        (pa.int64(), {"method": "partial"}, "needs a string field"),
        (pa.string(), {"method": "date_shift", "subject": "id"}, "needs a date or timestamp field"),
        (pa.date32(), {"method": "date_shift"}, "needs 'subject: <field>'"),
        (pa.date32(), {"method": "date_shift", "subject": "id", "max_days": 0}, "between 1 and 3650"),
        (pa.int64(), {"method": "redact", "value": "text"}, "cannot be stored in a int64 field"),
        (pa.string(), {"method": "redact", "keep_first": True}, "must be a number"),
    ],
)
def test_bad_configuration_fails_at_construction(arrow_type, params, message):
    with pytest.raises(PolicyError, match=message) as info:
        make_action("mask", "f", arrow_type, **params)
    assert "field 'f' (action 'mask')" in str(info.value)


def test_date_shift_subject_must_exist_in_schema(customers_schema):
    from cloakbeam.transforms.policy import compile_policy

    fields = {"customer_id": "drop", "date_of_birth": {"action": "mask", "method": "date_shift", "subject": "nobody"}}
    with pytest.raises(PolicyError, match="refers to 'nobody', which is not a leaf field"):
        compile_policy({"version": 1, "dataset": "t", "fields": fields}, customers_schema)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 32), st.integers(0, 128))
def test_ip_truncation_matches_ipaddress_networks(addr, v4_prefix, v6_prefix):
    import ipaddress
    import tempfile
    from pathlib import Path

    ctx = make_ctx(Path(tempfile.mkdtemp()) / "k.json")
    out = make_action("mask", "ip", method="ip", v4_prefix=v4_prefix, v6_prefix=v6_prefix).apply(pa.array([str(addr)]), {}, ctx)[0].as_py()
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    # Same address as ipaddress computes (IPv4-mapped IPv6 may print in dotted form: compare parsed values).
    assert ipaddress.ip_address(out) == ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address
