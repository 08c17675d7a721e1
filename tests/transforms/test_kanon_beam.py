"""The Beam transforms: batch enforcement with assert_that, the run failing on an unreachable target, and
streaming enforcement with TestStream (on-time, late and too-late data) on the DirectRunner in streaming mode."""

from __future__ import annotations

import datetime as dt
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue

from cloakbeam.core.stats import RunStats
from cloakbeam.tests.kanon_fixtures import check_k_l, people_batch, people_policy, protect

QIS = ["dob", "zip", "gender", "home.city"]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"dob": dt.date(1960 + rng.randint(0, 30), rng.randint(1, 12), rng.randint(1, 28)),
             "zip": rng.choice(["10001", "10002", "94107", "94110", "60601"]), "gender": rng.choice("ffmmx"),
             "city": rng.choice(["Oslo", "Bergen"]), "diagnosis": rng.choice(["flu", "cold", "asthma"])} for _ in range(n)]


def _split(elements):
    batches = [e for e in elements if not isinstance(e, RunStats)]
    stats = RunStats.merged([e for e in elements if isinstance(e, RunStats)])
    return [r for b in batches for r in b.to_pylist()], stats, elements


def test_batch_transform_releases_only_k_anonymous_l_diverse_classes_and_counts_suppression():
    pol = people_policy(qis=QIS, k=4, l=2, limit=0.05)
    rows = _rows(600, 1)
    batches = [protect(people_batch(rows[i:i + 100]), pol) for i in range(0, 600, 100)]
    upstream = RunStats(counts={"input": 600})

    def check(elements):
        out, stats, raw = _split(elements)
        check_k_l(out, QIS, 4, 2)
        assert stats.counts["input"] == 600  # upstream RunStats passed through untouched
        assert len(out) + stats.counts["suppressed"] == 600
        assert stats.counts["suppressed"] <= 0.05 * 600
        reports = [e for e in raw if isinstance(e, RunStats) and "k_anonymity" in e.extra]
        assert len(reports) == 1  # the report travels exactly once
        rep = reports[0].extra["k_anonymity"]
        assert rep["records_in"] == 600 and rep["records_suppressed"] == stats.counts["suppressed"]
        assert rep["k_achieved"] >= 4 and rep["l_achieved"] >= 2
        assert set(rep["levels"]) == set(QIS)
        # Released values are at the chosen level: e.g. a dob released at 'year' has four characters.
        level = rep["levels"]["dob"]["name"]
        widths = {"value": 10, "month": 7, "year": 4, "decade": 5, "suppressed": 1}
        assert all(len(r["dob"]) == widths[level] for r in out)
        assert all(set(r) == {"dob", "zip", "gender", "diagnosis", "home"} for r in out)

    with TestPipeline() as p:
        out = p | beam.Create(batches + [upstream]) | "EnforceKAnonymity" >> pol.sections["k_anonymity"].batch_transform(None)
        assert_that(out, check)


def test_batch_transform_on_empty_input_emits_an_empty_report():
    pol = people_policy(k=3)

    def check(elements):
        assert len(elements) == 1 and elements[0].extra["k_anonymity"]["records_in"] == 0

    with TestPipeline() as p:
        out = p | beam.Create([RunStats()]) | beam.Filter(lambda e: False) | pol.sections["k_anonymity"].batch_transform(None)
        assert_that(out, check)


def test_unreachable_target_fails_the_run_with_the_target_named():
    pol = people_policy(k=50, limit=0.02)
    batch = protect(people_batch(_rows(30, 2)), pol)
    with pytest.raises(Exception) as exc:
        with TestPipeline() as p:
            _ = p | beam.Create([batch]) | pol.sections["k_anonymity"].batch_transform(None)
    msg = str(exc.value)
    assert "k-anonymity target k=50 cannot be met" in msg and "only 30 records" in msg
    assert "10001" not in msg and "94107" not in msg


def test_streaming_per_window_k_with_bounded_delay_and_late_data():
    window, lateness = 10, 20
    pol = people_policy(k=3, limit=0.5, streaming={"window_seconds": window, "allowed_lateness_seconds": lateness})

    def mk(n, seed):
        r = random.Random(seed)
        return protect(people_batch([{"dob": dt.date(1980, 1, r.randint(1, 3)), "zip": r.choice(["10001", "10002"]),
                                      "gender": "f", "diagnosis": "flu"} for _ in range(n)]), pol)

    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([TimestampedValue(mk(20, 1), 1), TimestampedValue(mk(20, 2), 5)])
        .add_elements([TimestampedValue(mk(30, 3), 12), TimestampedValue(RunStats(counts={"input": 1}), 13)])
        .advance_watermark_to(25)
        .add_elements([TimestampedValue(mk(2, 4), 3)])  # late for [0, 10) but within the allowed lateness
        .advance_watermark_to(60)
        .add_elements([TimestampedValue(mk(2, 5), 4)])  # later than the allowed lateness: never released
        .advance_watermark_to_infinity()
    )

    def check(elements):
        out, stats, raw = _split(elements)
        panes = stats.extra["k_anonymity_windows"]
        by = {(w["window_start"], w["timing"]): w for w in panes}
        first = by[("1970-01-01T00:00:00Z", "ON_TIME")]
        second = by[("1970-01-01T00:00:10Z", "ON_TIME")]
        late = by[("1970-01-01T00:00:00Z", "LATE")]
        assert first["records_in"] == 40 and second["records_in"] == 30
        for w in (first, second):
            assert w["target_met"] and w["k_achieved"] >= 3
            assert w["records_released"] + w["records_suppressed"] == w["records_in"]
            # Delay bound: a record waits at most until its window's end (event time).
            assert 0 <= w["max_event_delay_seconds"] <= window == w["delay_bound_seconds"]
        # The late pane has 2 records: they cannot reach k=3 by their deadline and are suppressed, counted.
        assert late["records_in"] == 2 and late["records_suppressed"] == 2 and not late["target_met"]
        assert stats.counts["suppressed"] == sum(w["records_suppressed"] for w in panes)
        assert stats.counts["input"] == 1  # RunStats pass through
        # Every released record sits in a class of >= k within its own pane; the whole output too.
        check_k_l(out, ["dob", "zip", "gender"], 3, None)
        assert len(out) == first["records_released"] + second["records_released"]
        assert sum(w["records_in"] for w in panes) == 72  # the 2 too-late records never entered a pane

    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=opts) as p:
        out = p | stream | "EnforceKAnonymity" >> pol.sections["k_anonymity"].streaming_transform(None)
        assert_that(out, check)


def test_section_report_merges_batch_and_window_figures():
    pol = people_policy(k=3)
    sec = pol.sections["k_anonymity"]
    stats = RunStats(extra={"k_anonymity": {"k_achieved": 4, "summary": "x"},
                            "k_anonymity_windows": [{"window_start": "b", "records_in": 5, "records_suppressed": 5, "target_met": False},
                                                    {"window_start": "a", "records_in": 9, "records_suppressed": 0, "records_released": 9, "k_achieved": 3}]})
    rep = sec.report(stats)
    assert rep["batch"]["k_achieved"] == 4 and rep["policy"]["k"] == 3
    assert [w["window_start"] for w in rep["windows"]] == ["a", "b"]
    assert rep["streaming_summary"] == {"windows": 2, "panes": 2, "records_in": 14, "records_suppressed": 5,
                                        "min_k_achieved": 3, "panes_over_suppression_limit": 1}
