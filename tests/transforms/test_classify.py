"""The `classification` policy section: classes and their sources, detector counts, the fail-closed guard
(run time) and the keep-a-direct-identifier check (compile time), per-field overrides, bad configuration."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cloakbeam.core.stats import RunStats
from cloakbeam.errors import ClassificationError, PolicyError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.tests.classify_fixtures import make_ctx
from cloakbeam.tests.paths import POLICY
from cloakbeam.transforms.classify import name_hint
from cloakbeam.transforms.policy import compile_policy, load_policy
from cloakbeam.transforms.protect import protect_batch

SCHEMA = schema_from_dict(
    {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "id", "type": "string", "cloakbeam.class": "IDENTIFIER"},
            {"name": "comment", "type": ["null", "string"], "default": None},
            {"name": "misc", "type": "string", "cloakbeam.class": "OTHER"},
            {"name": "amount", "type": "double"},
            {"name": "ssn", "type": "string", "cloakbeam.class": "US_SSN"},
        ],
    }
)
SSNS = ["219-09-9999", "123-45-6789", "078-05-1120", "555-12-3456"]


def _policy(policy_fields, **section):
    raw = {"version": 1, "dataset": "t", "fields": policy_fields}
    if section:
        raw["classification"] = section
    return compile_policy(raw, SCHEMA, source="p.yaml")


def _batch(misc, comment=None):
    n = len(misc)
    return pa.RecordBatch.from_pydict(
        {
            "id": [f"r{i}" for i in range(n)],
            "comment": comment or [None] * n,
            "misc": misc,
            "amount": [1.0] * n,
            "ssn": (SSNS * n)[:n],
        },
        schema=SCHEMA.arrow,
    )


def test_keep_field_holding_ssns_fails_naming_field_and_detector_never_value(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep", "ssn": "drop"})
    ctx = make_ctx(tmp_path / "k.json")
    with pytest.raises(ClassificationError) as info:
        protect_batch(_batch(SSNS), policy, ctx)
    msg = str(info.value)
    assert "field 'misc'" in msg and "US_SSN" in msg
    assert not any(s in msg for s in SSNS)


def test_cards_embedded_in_a_kept_free_text_field_fail_too(tmp_path):
    policy = _policy({"id": "drop", "comment": "keep", "misc": "keep"})
    batch = _batch(["a", "b"], comment=["paid with 4111 1111 1111 1111", None])
    with pytest.raises(ClassificationError, match="field 'comment'.*CREDIT_CARD"):
        protect_batch(batch, policy, make_ctx(tmp_path / "k.json"))


def test_clean_kept_fields_pass_and_are_counted(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep", "amount": "keep"})
    ctx = make_ctx(tmp_path / "k.json")
    out = protect_batch(_batch(["alpha", "beta", "gamma"]), policy, ctx)
    assert out.num_rows == 3
    assert ctx.stats["classify.misc.guard.rows"] == 3
    assert ctx.stats["classify.misc.guard.US_SSN"] == 0
    assert ctx.stats["classify.ssn.US_SSN"] == 3  # a dropped field is still classified
    assert ctx.stats["classify.ssn.rows"] == 3


def test_invalid_ssns_do_not_trip_the_guard(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep"})
    protect_batch(_batch(["000-12-3456", "666-45-6789", "123-00-4567"]), policy, make_ctx(tmp_path / "k.json"))


def test_threshold_and_warn_overrides(tmp_path):
    misc = ["x"] * 99 + ["219-09-9999"]
    ctx = make_ctx(tmp_path / "k.json")
    protect_batch(_batch(misc), _policy({"id": "drop", "misc": "keep"}, threshold=0.05), ctx)
    with pytest.raises(ClassificationError):
        protect_batch(_batch(misc), _policy({"id": "drop", "misc": "keep"}, threshold=0.005), ctx)
    warn = _policy({"id": "drop", "misc": "keep"}, fields={"misc": {"on_contradiction": "warn"}})
    protect_batch(_batch(SSNS), warn, ctx)
    assert ctx.stats["classify.misc.contradiction"] == 1
    report = warn.sections["classification"].report(RunStats(fields=ctx.stats))
    assert report["contradictions"] == ["misc"]


def test_guard_detectors_are_configurable(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep"}, guard=["EMAIL"])
    protect_batch(_batch(SSNS), policy, make_ctx(tmp_path / "k.json"))  # SSNs no longer guarded
    with pytest.raises(ClassificationError, match="EMAIL"):
        protect_batch(_batch(["a@b.example"]), policy, make_ctx(tmp_path / "k.json"))


def test_protected_fields_are_not_guarded():
    policy = _policy({"id": "drop", "misc": {"action": "mask", "method": "redact"}, "ssn": "drop"})
    assert policy.sections["classification"].guarded == {}


def test_keeping_a_declared_direct_identifier_fails_at_compile_time():
    with pytest.raises(PolicyError, match="field 'ssn' is classified US_SSN \\(schema annotation\\) but the policy keeps it in clear"):
        _policy({"ssn": "keep"})
    policy = _policy({"ssn": "keep"}, fields={"ssn": {"allow_clear": True, "on_contradiction": "warn"}})
    assert "ssn" in policy.sections["classification"].guarded


def test_class_override_and_sources():
    policy = _policy({"id": "drop", "comment": "keep"}, fields={"misc": {"class": "LABEL"}})
    section = policy.sections["classification"]
    assert section.field_classes() == {"id": "IDENTIFIER", "comment": "FREE_TEXT", "misc": "LABEL", "amount": "NUMERIC", "ssn": "US_SSN"}
    assert section.class_sources()["id"] == "schema annotation"
    assert section.class_sources()["comment"] == "name hint"
    assert section.class_sources()["misc"] == "policy"
    assert section.class_sources()["amount"] == "type"


def test_report_holds_rates_and_no_values(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep"})
    ctx = make_ctx(tmp_path / "k.json")
    protect_batch(_batch(["a@b.example", "plain"]), policy, ctx)
    report = policy.sections["classification"].report(RunStats(fields=ctx.stats))
    assert report["fields"]["misc"]["detectors"]["EMAIL"] == {"values": 1, "rate": 0.5}
    assert report["fields"]["ssn"]["detectors"]["US_SSN"]["rate"] == 1.0
    assert report["guarded_fields"] == ["misc"]
    assert "a@b.example" not in repr(report)


def test_sampling_counts_a_strided_sample(tmp_path):
    policy = _policy({"id": "drop", "misc": "keep"}, sample_rows=10)
    ctx = make_ctx(tmp_path / "k.json")
    protect_batch(_batch(["x"] * 100), policy, ctx)
    assert ctx.stats["classify.misc.rows"] == 10
    assert ctx.stats["classify.misc.guard.rows"] == 100  # the guard always scans everything


def test_reference_policy_guards_its_clear_fields(customers_schema):
    policy = load_policy(POLICY, customers_schema)
    section = policy.sections["classification"]
    assert set(section.guarded) <= {"gender", "diagnosis", "income", "signup_ts", "churned"}
    assert "diagnosis" in section.guarded
    assert section.field_classes()["notes"] == "FREE_TEXT"


@pytest.mark.parametrize(
    "section,message",
    [
        ("yes", "'classification' must be a mapping"),
        ({"colour": 1}, "unknown key 'colour'"),
        ({"threshold": 1.5}, "threshold must be a fraction"),
        ({"threshold": True}, "threshold must be a fraction"),
        ({"on_contradiction": "ignore"}, "must be 'fail' or 'warn'"),
        ({"guard": ["SSN"]}, "unknown detector 'SSN'"),
        ({"guard": "US_SSN"}, "must be a list of detector names"),
        ({"sample_rows": -1}, "sample_rows must be a whole number"),
        ({"fields": {"nope": {}}}, "'nope' is not a leaf field"),
        ({"fields": {"misc": "warn"}}, "must be a mapping"),
        ({"fields": {"misc": {"class": "SECRET"}}}, "is not a class"),
        ({"fields": {"misc": {"allow_clear": "yes"}}}, "allow_clear must be true or false"),
        ({"fields": {"misc": {"level": 1}}}, "unknown key 'level'"),
    ],
)
def test_bad_section_fails_at_compile_time(section, message):
    with pytest.raises(PolicyError, match=message) as info:
        _policy({"id": "drop"}, **section) if isinstance(section, dict) else compile_policy(
            {"version": 1, "dataset": "t", "fields": {"id": "drop"}, "classification": section}, SCHEMA, source="p.yaml"
        )
    assert "p.yaml" in str(info.value)


def test_unknown_declared_class_fails():
    bad = schema_from_dict({"type": "record", "name": "B", "fields": [{"name": "x", "type": "string", "cloakbeam.class": "SECRETS"}]})
    with pytest.raises(PolicyError, match="declares unknown class 'SECRETS'"):
        compile_policy({"version": 1, "fields": {"x": "drop"}}, bad)


@pytest.mark.parametrize(
    "path,cls",
    [
        ("ssn", "US_SSN"), ("customer.social_security_number", "US_SSN"), ("card_number", "CREDIT_CARD"), ("cc_num", "CREDIT_CARD"),
        ("email", "EMAIL"), ("contactEmail", "EMAIL"), ("mobile_phone", "PHONE"), ("date_of_birth", "DATE_OF_BIRTH"), ("dob", "DATE_OF_BIRTH"),
        ("zip", "POSTAL_CODE"), ("postcode", "POSTAL_CODE"), ("ip_address", "IP_ADDRESS"), ("client_ip", "IP_ADDRESS"), ("gender", "GENDER"),
        ("full_name", "PERSON_NAME"), ("lastName", "PERSON_NAME"), ("notes", "FREE_TEXT"), ("customer_id", "IDENTIFIER"), ("internal_ref", "IDENTIFIER"),
        ("churned", "LABEL"), ("income", None), ("diagnosis", None), ("zipper_count", None), ("tip_amount", None),
    ],
)
def test_name_hints(path, cls):
    assert name_hint(path) == cls


def test_report_flags_values_that_look_like_another_class(tmp_path):
    policy = _policy({"id": "drop", "misc": {"action": "mask", "method": "redact"}})
    ctx = make_ctx(tmp_path / "k.json")
    protect_batch(_batch(["a@b.example"] * 30), policy, ctx)
    report = policy.sections["classification"].report(RunStats(fields=ctx.stats))
    assert report["fields"]["misc"]["detected_class"] == "EMAIL"
    assert report["fields"]["ssn"]["detected_class"] == "US_SSN"
    assert report["class_mismatches"] == ["misc"]


def test_date_shift_and_pseudonym_scrub_require_keys():
    policy = _policy({"id": "drop", "comment": {"action": "scrub", "mode": "pseudonym"}})
    assert policy.requires() == {"keys"}
    assert _policy({"id": "drop", "comment": {"action": "scrub"}}).requires() == set()


def test_capped_phone_rate_uses_the_rows_actually_examined(tmp_path):
    schema = schema_from_dict({"type": "record", "name": "P", "fields": [{"name": "tel", "type": "string"}]})
    policy = compile_policy({"version": 1, "fields": {"tel": {"action": "mask", "method": "phone"}}, "classification": {"phone_sample": 5}}, schema)
    ctx = make_ctx(tmp_path / "k.json")
    big = pa.RecordBatch.from_pydict({"tel": ["212-555-0143"] * 50}, schema=schema.arrow)  # capped: 5 of 50 examined
    small = pa.RecordBatch.from_pydict({"tel": ["212-555-0143", "nope", "x", "y"]}, schema=schema.arrow)  # not capped
    protect_batch(big, policy, ctx)
    protect_batch(small, policy, ctx)
    report = policy.sections["classification"].report(RunStats(fields=ctx.stats))
    assert ctx.stats["classify.tel.PHONE.examined"] == 5 + 4
    assert report["fields"]["tel"]["detectors"]["PHONE"] == {"values": 6, "rate": round(6 / 9, 4)}
