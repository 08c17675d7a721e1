"""Release evidence end to end: `run --evaluate` fills the manifest's risk and utility sections and the report,
`cloakbeam evaluate` measures a finished release from the command line (figures JSON and a report, the signed
manifest untouched), bad options fail with exit 2 and a sentence, and `cloakbeam demo` ends with the report's path."""

from __future__ import annotations

import hashlib
import json

import pytest

from cloakbeam.cli.main import main
from cloakbeam.tests.paths import POLICY, SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from cloakbeam.schemas.generate import generate

    d = tmp_path_factory.mktemp("evaluate")
    src = generate(d / "in.jsonl", 3000, seed=31, fmt="jsonl", dirty=0.01)["path"]
    hold = generate(d / "hold.jsonl", 500, seed=32, fmt="jsonl")["path"]
    code = main(["run", "--dev", "--input", src, "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(d / "out"),
                 "--state-dir", str(d / "state"), "--batch-size", "700", "--evaluate", "--holdout", hold, "--evaluate-sample", "2000"])
    assert code == 0
    return d, src, hold, json.loads((d / "out" / "manifest.json").read_text())


def test_run_evaluate_fills_risk_and_utility(evaluated):
    _, _, _, m = evaluated
    risk, util = m["sections"]["risk"], m["sections"]["utility"]
    link = risk["linkage"]
    assert risk["measured"] and risk["linkable_quasi_identifiers"] == ["date_of_birth", "zip", "gender"]
    assert link["records_released"] == m["counts"]["written"]
    assert link["meets_k"] is True and link["smallest_class"] >= 10 and link["statement"].startswith("meets k=10")
    assert link["uniquely_matched"] == 0 and link["prosecutor"]["highest_risk"] <= 0.1
    mi = risk["membership_inference"]
    assert mi["measured"] and mi["members"] == 1000 and mi["non_members"] == 500 and 0.0 <= mi["auc"] <= 1.0
    # On 3,000 records the generalized release still holds many members' exact (generalized) twins.
    assert mi["members_exact_match_share"] > 0.5 and mi["level"] in ("moderate", "high")
    assert util["measured"] and util["label"] == "churned"
    assert util["split"]["released"] == "the release's subject-disjoint split"
    assert "recomputed on the raw rows with the keyring" in util["split"]["raw"]
    assert 0.3 < util["raw"]["auc"] <= 1 and 0.3 < util["released"]["auc"] <= 1
    assert util["sample"]["released_rows_used"] == 2000 and util["sample"]["sample_limit"] == 2000
    loss = util["information_loss"]
    assert loss["zip"]["entropy_loss"] > 0.3 and loss["income"]["entropy_loss"] > 0.3  # generalized: information lost
    assert loss["diagnosis"]["action"] == "keep" and loss["diagnosis"]["entropy_loss"] < 0.05  # kept as is


def test_evaluate_command_measures_a_finished_release_without_touching_it(evaluated, tmp_path, capsys):
    d, src, hold, m = evaluated
    before = hashlib.sha256((d / "out" / "manifest.json").read_bytes()).hexdigest()
    code = main(["evaluate", "--raw", src, "--released", str(d / "out"), "--label", "churned", "--holdout", hold, "--sample", "2000",
                 "--state-dir", str(d / "state"), "--out", str(tmp_path / "fig.json"), "--report", str(tmp_path / "r.html")])
    out = capsys.readouterr().out
    assert code == 0 and "meets k=10" in out and "AUC raw" in out
    fig = json.loads((tmp_path / "fig.json").read_text())
    assert fig["risk"]["linkage"] == m["sections"]["risk"]["linkage"]  # deterministic: the same attack, the same figures
    assert fig["utility"]["released"] == m["sections"]["utility"]["released"]
    assert "ML utility" in (tmp_path / "r.html").read_text()
    assert hashlib.sha256((d / "out" / "manifest.json").read_bytes()).hexdigest() == before
    assert main(["verify", str(d / "out"), "--public-key", str(d / "state" / "keyring.json")]) == 0


def test_evaluate_command_errors_exit_2(evaluated, tmp_path, capsys):
    d, src, _, _ = evaluated
    assert main(["evaluate", "--raw", src, "--released", str(d / "out"), "--label", "ssn_typo"]) == 2
    assert "is not a field the policy releases" in capsys.readouterr().err
    other = tmp_path / "p.yaml"
    other.write_text(POLICY.read_text() + "\n# edited\n")
    assert main(["evaluate", "--raw", src, "--released", str(d / "out"), "--policy", str(other)]) == 2
    assert "not the one this release was made with" in capsys.readouterr().err
    assert main(["evaluate", "--raw", str(tmp_path / "none*.jsonl"), "--released", str(d / "out"), "--state-dir", str(d / "state")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["evaluate", "--raw", src, "--released", str(tmp_path)]) == 2
    assert "no readable manifest.json" in capsys.readouterr().err


def test_run_evaluate_bad_options_fail_before_data_moves(tmp_path, capsys):
    from cloakbeam.schemas.generate import generate

    src = generate(tmp_path / "in.jsonl", 50, seed=1, fmt="jsonl")["path"]
    base = ["run", "--dev", "--input", src, "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "o"), "--state-dir", str(tmp_path / "s")]
    assert main(base + ["--evaluate", "--label", "ssn"]) == 2
    assert "released with action 'encrypt'" in capsys.readouterr().err
    assert main(base + ["--evaluate", "--label", "internal_ref"]) == 2
    assert "is not a field the policy releases" in capsys.readouterr().err
    assert main(base + ["--evaluate", "--evaluate-sample", "5"]) == 2
    assert "at least 100 rows" in capsys.readouterr().err
    assert main(base + ["--holdout", src]) == 2
    assert "apply with --evaluate" in capsys.readouterr().err
    import yaml

    doc = yaml.safe_load(POLICY.read_text())
    doc["parquet_encryption"] = {"columns": {"default": ["income"]}}
    pme = tmp_path / "pme.yaml"
    pme.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main([*base[:6], "--policy", str(pme), *base[8:], "--evaluate"]) == 2
    assert "Parquet modular encryption" in capsys.readouterr().err
    assert not (tmp_path / "o" / "data").exists()

