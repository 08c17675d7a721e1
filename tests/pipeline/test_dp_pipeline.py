"""DP statistics through the whole pipeline (direct runner): results and spent budget in the manifest, noise
present (two runs differ), contributions bounded per subject (a subject with hundreds of rows counts once), sums
and means clamped to the declared bounds. The Dask runner is covered by tests/runners/test_same_answer.py (the
reference policy declares dp_statistics)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.tests.paths import POLICY, SCHEMA

pytestmark = pytest.mark.slow


def _run(tmp_path, src, name, dp=None):
    doc = yaml.safe_load(POLICY.read_text())
    if dp is not None:
        doc["dp_statistics"] = dp
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(p), output=str(tmp_path / name),
                                    progress=False, state_dir=str(tmp_path / "state"), batch_size=250))


@pytest.fixture(scope="module")
def heavy_input(tmp_path_factory):
    """600 reference customers; 300 of the records belong to one subject (the same customer_id)."""
    from cloakbeam.schemas.generate import _pools, generate_table

    d = tmp_path_factory.mktemp("dp")
    t = generate_table(600, 7, 0, _pools(7))
    ids = t.column("customer_id").to_pylist()
    ids[:300] = ["C9999999999"] * 300
    t = t.set_column(t.schema.get_field_index("customer_id"), "customer_id", pa.array(ids))
    pq.write_table(t, d / "in.parquet")
    return d, d / "in.parquet", t


def test_reference_statistics_are_noisy_and_accounted(heavy_input, tmp_path):
    _, src, table = heavy_input
    runs = [_run(tmp_path, src, f"r{i}") for i in range(2)]
    sections = [m["sections"]["dp_statistics"] for m in runs]
    for s in sections:
        assert s["computed"] and s["spent"]["epsilon"] == pytest.approx(3.0) and s["budget"]["epsilon"] == 3.0
        assert s["spent"]["epsilon"] == pytest.approx(sum(st["epsilon"] for st in s["statistics"]))
        by_name = {st["name"]: st for st in s["statistics"]}
        assert set(by_name["customers_by_gender"]["results"]) == {"female", "male", "nonbinary", "unknown"}
        assert set(by_name["mean_income_by_age_band"]["results"]) == {"<30", "30-44", "45-64", "65+"}
        assert by_name["customers_by_gender"]["results"]["female"]["noise_stddev"] == pytest.approx(2 ** 0.5, rel=1e-3)
    a, b = ([r["value"] for st in s["statistics"] for r in st["results"].values()] for s in sections)
    assert a != b  # fresh noise on every run
    assert all(x != round(x) for x in a[:4])  # counts are not exact integers: noise was added


def test_contributions_are_bounded_per_subject_and_values_clamped(heavy_input, tmp_path):
    _, src, table = heavy_input
    subjects = len(set(table.column("customer_id").to_pylist()))  # 301
    dp = {"privacy_unit": "customer_id", "budget": {"epsilon": 3000.0},
          "statistics": [
              {"name": "records", "metric": "count", "epsilon": 1000.0},
              {"name": "rows_per_subject_3", "metric": "count", "epsilon": 1000.0, "max_contributions_per_partition": 3},
              {"name": "income_mean_clamped", "metric": "mean", "value": "income", "min_value": 0, "max_value": 10, "epsilon": 1000.0},
          ]}
    m = _run(tmp_path, src, "bounded", dp)
    res = {st["name"]: st["results"] for st in m["sections"]["dp_statistics"]["statistics"]}
    assert m["counts"]["input"] == 600
    # With epsilon 1000 the noise is tiny (std ~0.0014): the count is the number of subjects, not of rows.
    assert res["records"]["all"]["value"] == pytest.approx(subjects, abs=0.5)
    assert res["rows_per_subject_3"]["all"]["value"] == pytest.approx(subjects - 1 + 3, abs=0.5)
    assert 0 <= res["income_mean_clamped"]["all"]["value"] <= 10  # incomes ~50,000 clamped to the bound
    assert res["income_mean_clamped"]["all"]["value"] > 9


def test_dp_section_holds_no_record_value(heavy_input, tmp_path):
    _, src, table = heavy_input
    m = _run(tmp_path, src, "leak")
    text = yaml.safe_dump(m["sections"]["dp_statistics"])
    for v in table.column("customer_id").to_pylist()[290:320] + table.column("full_name").to_pylist()[:50]:
        assert v not in text
