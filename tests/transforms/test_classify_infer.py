"""Class inference without annotations: detectors, name hints, types and content shape, on unnamed columns."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cloakbeam.transforms.classify import infer_class, profile_column

NAMES = [f"{f} {m}{l}" for f in ("Dana", "Li", "Maria", "Tom", "Ann") for m in ("", "K. ") for l in ("Whitfield", "Wong", "Lopez", "Baker")]
TEXT = ["Customer called twice about the invoice and wants a refund soon."] * 40


@pytest.mark.parametrize(
    "path,values,expected,source",
    [
        ("col_a", ["a@example.com", "b.c@mail.example.org"] * 20, "EMAIL", "detector"),
        ("col_b", ["219-09-9999", "123-45-6789"] * 20, "US_SSN", "detector"),
        ("col_c", ["4111111111111111", "5500005555555559"] * 20, "CREDIT_CARD", "detector"),
        ("col_d", ["10.0.0.1", "2001:db8::1"] * 20, "IP_ADDRESS", "detector"),
        ("col_e", ["+1 (212) 555-0143", "212.555.0199"] * 20, "PHONE", "detector"),
        ("col_f", ["female", "male", "unknown"] * 14, "GENDER", "detector"),
        ("col_g", ["94103", "02139"] * 20, "POSTAL_CODE", "detector"),
        ("col_h", ["1980-01-02", "1975-12-31"] * 20, "OTHER", "detector"),  # a date, but nothing says birth
        ("birth_day", ["1980-01-02", "1975-12-31"] * 20, "DATE_OF_BIRTH", "detector + name hint"),
        ("col_i", NAMES, "PERSON_NAME", "content shape"),
        ("col_j", TEXT, "FREE_TEXT", "content shape"),
        ("col_k", [f"K{i:06d}" for i in range(40)], "IDENTIFIER", "content shape (unique values)"),
        ("col_l", ["12.5", "7", "-3.25e2"] * 14, "NUMERIC", "content shape"),
        ("col_m", ["true", "false"] * 20, "LABEL", "content shape"),
        ("col_n", ["2024-01-02T03:04:05Z"] * 40, "OTHER", "content shape (timestamps)"),
        ("col_o", ["red", "green", "blue"] * 14, "OTHER", "default"),
        ("account_number", ["red", "green"] * 20, "IDENTIFIER", "name hint"),
    ],
)
def test_string_columns(path, values, expected, source):
    col = pa.array(values)
    inf = infer_class(path, col.type, profile=profile_column(col))
    assert (inf.cls, inf.source) == (expected, source)
    assert all(v not in inf.evidence for v in values)


@pytest.mark.parametrize(
    "path,arrow_type,expected",
    [
        ("flag", pa.bool_(), "LABEL"),
        ("amount", pa.float64(), "NUMERIC"),
        ("zip", pa.int64(), "POSTAL_CODE"),
        ("customer_id", pa.int64(), "IDENTIFIER"),
        ("dob", pa.date32(), "DATE_OF_BIRTH"),
        ("created", pa.timestamp("us"), "OTHER"),
    ],
)
def test_typed_columns(path, arrow_type, expected):
    assert infer_class(path, arrow_type).cls == expected


def test_declared_and_override_win():
    col = pa.array(["a@example.com"] * 30)
    assert infer_class("x", col.type, declared="OTHER", profile=profile_column(col)).cls == "OTHER"
    assert infer_class("x", col.type, declared="OTHER", override="EMAIL").source == "policy"
