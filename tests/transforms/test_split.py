"""The `split` section: compile-time validation, the keyed assignment (stable, order- and batch-independent, one
split per subject, shares near the declared fractions), quarantine of records without a subject, and the sink's
Hive-style partitions."""

from __future__ import annotations

import hmac

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import load_schema
from cloakbeam.tests.paths import POLICY, SCHEMA
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.split import SPLIT_COLUMN, SplitSpec, assign, attach, partitions

KEY = bytes(range(32))
SPEC = SplitSpec("customer_id", (("train", 0.8), ("validation", 0.1), ("test", 0.1)))


def _policy(split):
    doc = yaml.safe_load(POLICY.read_text())
    doc["split"] = split
    return compile_policy(doc, load_schema(SCHEMA), "p.yaml")


def test_reference_policy_declares_the_split():
    section = _policy({"by": "customer_id", "train": 0.8, "validation": 0.1, "test": 0.1}).sections["split"]
    assert section.spec.names == ["train", "validation", "test"]


@pytest.mark.parametrize("split, words", [
    ({"by": "customer_id", "train": 0.8, "test": 0.1}, "add up to 0.9"),
    ({"by": "customer_id", "train": 0.9, "test": 0.2}, "add up to 1.1"),
    ({"by": "nobody", "train": 0.8, "test": 0.2}, "'nobody' is not in schema"),
    ({"train": 0.8, "test": 0.2}, "must be a mapping"),
    ({"by": "customer_id", "train": 1.0}, "at least two splits"),
    ({"by": "customer_id", "Train!": 0.5, "test": 0.5}, "lower-case letters"),
    ({"by": "customer_id", "train": -0.2, "test": 1.2}, "fraction between 0 and 1"),
    ({"by": "customer_id", "train": "most", "test": 0.2}, "fraction between 0 and 1"),
])
def test_bad_split_sections_fail_at_compile_time_with_a_sentence(split, words):
    with pytest.raises(PolicyError) as info:
        _policy(split)
    assert words in str(info.value) and "split:" in str(info.value)


def test_a_field_named_split_in_the_output_is_refused():
    schema = load_schema(SCHEMA)
    avro = dict(schema.avro)
    avro["fields"] = list(avro["fields"]) + [{"name": "split", "type": "string"}]
    from cloakbeam.schemas.avro import schema_from_dict

    doc = yaml.safe_load(POLICY.read_text())
    doc["fields"]["split"] = "keep"
    doc["split"] = {"by": "customer_id", "train": 0.5, "test": 0.5}
    with pytest.raises(PolicyError, match="clash with the partition column"):
        compile_policy(doc, schema_from_dict(avro, "s.avsc"), "p.yaml")


def test_known_answer_vector_locks_the_assignment_rule():
    """u = first 64 bits of HMAC-SHA256(key, subject) / 2^64, placed by cumulative fractions. Changing the rule
    would silently move subjects between splits across releases, so it is pinned here."""
    subjects = [f"C{i:010d}" for i in range(8)]
    expected = []
    for s in subjects:
        u = int.from_bytes(hmac.digest(KEY, s.encode(), "sha256")[:8], "big") / 2**64
        expected.append("train" if u < 0.8 else ("validation" if u < 0.9 else "test"))
    assert assign(pa.array(subjects), KEY, SPEC).to_pylist() == expected
    assert expected == ["train", "train", "train", "train", "validation", "test", "train", "train"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=200), st.randoms(use_true_random=False), st.integers(1, 50))
def test_assignment_ignores_order_and_batching_and_keeps_each_subject_in_one_split(subjects, rnd, batch):
    rows = subjects + subjects[: len(subjects) // 2]  # repeated subjects: several records each
    base = dict(zip(rows, assign(pa.array(rows), KEY, SPEC).to_pylist()))
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    got: dict[str, set[str]] = {}
    for i in range(0, len(shuffled), batch):
        chunk = shuffled[i : i + batch]
        for s, label in zip(chunk, assign(pa.array(chunk), KEY, SPEC).to_pylist()):
            got.setdefault(s, set()).add(label)
    assert all(len(v) == 1 for v in got.values())  # no subject in two splits
    assert {s: next(iter(v)) for s, v in got.items()} == base  # same answer whatever the order or batch size


def test_shares_follow_the_fractions_and_keys_change_the_assignment():
    subjects = pa.array([f"S{i}" for i in range(40_000)])
    labels = np.array(assign(subjects, KEY, SPEC).to_pylist())
    for name, frac in SPEC.fractions:
        assert abs((labels == name).mean() - frac) < 0.01
    other = np.array(assign(subjects, bytes(32), SPEC).to_pylist())
    assert (labels != other).mean() > 0.2  # the keyring, not the value alone, decides


def test_null_subject_has_no_label_and_the_check_quarantines_it():
    from cloakbeam.transforms.registry import ActionContext

    section = _policy({"by": "customer_id", "train": 0.5, "test": 0.5}).sections["split"]
    assert assign(pa.array(["a", None, "b"]), KEY, section.spec).to_pylist()[1] is None
    ctx = ActionContext(None)
    section.check({"customer_id": pa.array(["a", None, "b"])}, ctx)
    (mask, reason, field), = ctx.rejections
    assert mask.tolist() == [False, True, False] and reason == "missing_subject" and field == "customer_id"


def test_sink_writes_one_hive_partition_per_split_without_the_hidden_column(tmp_path):
    from cloakbeam.transforms.write import write_training_files

    batch = pa.record_batch({"x": pa.array(range(6))})
    labels = pa.array(["train", "test", "train", "validation", "train", "test"]).dictionary_encode()
    meta = {b"cloakbeam.batch_id": b"src-000001"}
    stats = write_training_files(attach(batch.replace_schema_metadata(meta), labels), str(tmp_path))
    assert sorted((s.path, s.rows, s.split) for s in stats) == [
        ("data/split=test/part-src-000001.parquet", 2, "test"),
        ("data/split=train/part-src-000001.parquet", 3, "train"),
        ("data/split=validation/part-src-000001.parquet", 1, "validation"),
    ]
    t = pq.read_table(tmp_path / "data" / "split=train" / "part-src-000001.parquet")
    assert t.column_names == ["x"] and t.column("x").to_pylist() == [0, 2, 4]
    assert SPLIT_COLUMN not in t.column_names
    assert partitions(batch) == [(None, batch)]  # no split section: one unpartitioned file
