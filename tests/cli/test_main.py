"""The command line: generate, demo summary, help, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cloakbeam.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_generate_is_reproducible_by_seed(tmp_path, capsys):
    a, b, c = (tmp_path / n for n in ("a.csv", "b.csv", "c.csv"))
    assert main(["generate", "--rows", "300", "--seed", "5", "--format", "csv", "--out", str(a)]) == 0
    assert main(["generate", "--rows", "300", "--seed", "5", "--format", "csv", "--out", str(b)]) == 0
    assert main(["generate", "--rows", "300", "--seed", "6", "--format", "csv", "--out", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert "wrote 300 records" in capsys.readouterr().out


def test_generated_cards_are_luhn_valid_and_notes_embed_pii(tmp_path):
    import pyarrow.parquet as pq

    from cloakbeam.schemas.generate import generate

    t = pq.read_table(generate(tmp_path / "c.parquet", 2000, seed=1, fmt="parquet")["path"])
    for card in t["card_number"].to_pylist():
        digits = [int(x) for x in card][::-1]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits))
        assert total % 10 == 0
    rows = t.select(["full_name", "email", "phone", "ssn", "notes"]).to_pylist()
    embedded = sum(1 for r in rows if r["notes"] and any(v and v in r["notes"] for v in (r["full_name"], r["email"], r["phone"], r["ssn"])))
    assert embedded > 1000
    assert all(not s.startswith(("000", "666", "9")) for s in t["ssn"].to_pylist())


def test_generate_rejects_bad_arguments(tmp_path, capsys):
    assert main(["generate", "--rows", "10", "--dirty", "1.5", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--dirty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--rows", "10", "--format", "xml", "--out", "x"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_demo_prints_the_summary_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0  # the default 20,000 rows: the size the policy is made for
    out = capsys.readouterr().out
    for needle in ("rows in", "written", "quarantined", "suppressed", "rows/s", "internal_ref", "default deny", "manifest",
                   "uniqueness: passed"):
        assert needle in out
    assert (tmp_path / "demo" / ".cloakbeam").is_dir()
    assert (tmp_path / "demo" / "output" / "manifest.json").is_file()
    # The demo ends by printing the release report's path; the manifest carries every release-evidence section.
    report = tmp_path / "demo" / "output" / "report.html"
    assert out.strip().splitlines()[-1] == f"cloakbeam demo: report {report}"
    m = json.loads((tmp_path / "demo" / "output" / "manifest.json").read_text())
    for name in ("splits", "dp_statistics", "risk", "utility", "k_anonymity", "uniqueness"):
        assert name in m["sections"], name
    assert m["sections"]["risk"]["membership_inference"]["measured"]
    assert report.exists() and "Differentially private statistics" in report.read_text()
    # A second demo in the same directory would replace the first one. At 1,000 records the release singles people
    # out: the run fails closed with the scan's sentence, publishes nothing, and the first, complete release stays
    # as it was, with a failure record saying why the second did not replace it.
    before = (tmp_path / "demo" / "output" / "manifest.json").read_bytes()
    assert main(["demo", "--rows", "1000", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "uniqueness scan: " in err and "The release was withheld: nothing was published" in err
    assert (tmp_path / "demo" / "output" / "manifest.json").read_bytes() == before
    failure = json.loads((tmp_path / "demo" / "output" / ".cloakbeam-failure.json").read_text())
    assert "uniqueness scan" in json.dumps(failure)


def test_help_documents_every_command():
    out = subprocess.run([sys.executable, "-m", "cloakbeam.cli.main", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "demo", "generate"):
        assert cmd in out


@pytest.mark.slow
def test_wheel_installs_only_the_cloakbeam_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("cloakbeam-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"cloakbeam"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "cloakbeam/schemas/customers.avsc" in names and "cloakbeam/keys/__init__.py" in names
    # The native core is compiled into the wheel, with its stub.
    assert any(n.startswith("cloakbeam/_native.") and n.endswith((".so", ".pyd")) for n in names)
    assert "cloakbeam/_native.pyi" in names
