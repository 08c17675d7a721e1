"""OUT/report.html: built from the manifest only, self-contained (no script, no external reference), every string
escaped, every section present, a new manifest section shown without code and a registered renderer used; and the
real page in Debian's headless Chromium (driven by Playwright with `executable_path`): it loads with no console
error, every chart is a non-empty SVG, every section is filled, and a screenshot is written under pytest's temporary
directory (`<basetemp>/report-browser0/report.png`; `--basetemp DIR` puts it in DIR)."""

from __future__ import annotations

import copy
import os
import re
import shutil

import pytest

from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.pipeline.report import REPORT_NAME, build_report, report_section
from cloakbeam.tests.paths import POLICY, SCHEMA

SECTION_IDS = ("counts", "fields", "kanon", "suppression", "risk", "utility", "dp", "splits", "keys")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from cloakbeam.schemas.generate import generate

    d = tmp_path_factory.mktemp("report-browser")
    src = generate(d / "in.jsonl", 2500, seed=51, fmt="jsonl", dirty=0.01)["path"]
    hold = generate(d / "hold.jsonl", 300, seed=52, fmt="jsonl")["path"]
    m = run_pipeline(RunSettings(dev=True, inputs=[src], schema=str(SCHEMA), policy=str(POLICY), output=str(d / "out"), batch_size=900,
                                 progress=False, state_dir=str(d / "state"), evaluate=True, holdout=[hold], evaluate_sample=1500))
    return d, m


@pytest.mark.slow
def test_report_is_written_self_contained_with_every_section(release):
    d, m = release
    page = (d / "out" / REPORT_NAME).read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page, sid
    assert "<script" not in page.lower() and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "default-src 'none'" in page  # the browser itself refuses any fetch the page might try
    assert 'class="missing"' not in page  # every section filled for an evaluated run of the reference policy
    assert "meets k=10" in page and "key_fingerprint" in page


def test_values_are_escaped_and_unknown_sections_still_appear():
    m = {"run_id": "r1", "counts": {"input": 1, "written": 1, "quarantined": 0, "suppressed": 0}, "reconciled": True,
         "fields": {"x<y>": {"class": "OTHER", "class_source": "default", "action": {"action": "keep"}}},
         "sections": {"uniqueness": {"summary": "<b>12</b> unique", "unique_records": 12}}}
    page = build_report(m)
    assert "x&lt;y&gt;" in page and "<b>12</b>" not in page and "&lt;b&gt;12&lt;/b&gt;" in page
    assert '<section id="other">' in page and "unique_records" in page
    assert page.count('class="missing"') >= 4  # no k-anonymity, risk, utility, DP or split data: said so, not blank


def test_a_registered_section_renders_and_is_not_repeated_under_other():
    from cloakbeam.pipeline import report as rep

    saved = list(rep._SECTIONS)
    try:
        @report_section("uniqueness", "Uniqueness scan", 45, covers=("uniqueness",))
        def _u(m, sig):
            u = m["sections"].get("uniqueness")
            return None if u is None else rep.kv({"unique records": u["unique_records"]})

        m = {"counts": {}, "sections": {"uniqueness": {"unique_records": 12}}}
        page = build_report(m)
        assert '<section id="uniqueness">' in page and '<section id="other">' not in page
        assert page.index('id="risk"') < page.index('id="uniqueness"') < page.index('id="utility"')
        assert 'id="uniqueness"' not in build_report({"counts": {}, "sections": {}})  # nothing to show: no empty section
    finally:
        rep._SECTIONS[:] = saved


def test_report_tolerates_new_key_and_signature_fields(release):
    _, m = release
    m2 = copy.deepcopy(m)
    m2["keys"]["vault_transit"] = {"mount": "transit", "key": "cloakbeam"}
    page = build_report(m2, {"alg": "Ed25519", "key_fingerprint": "ab12", "signer": {"role": "release-signer"}, "signature": "SIG-BYTES"})
    assert "vault_transit" in page and "release-signer" in page and "SIG-BYTES" not in page


@pytest.mark.slow
def test_report_in_headless_chromium(release, tmp_path_factory):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed; .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    d, _ = release
    shot = d / "report.png"
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto((d / "out" / REPORT_NAME).as_uri(), wait_until="load")
            charts = page.evaluate("""() => [...document.querySelectorAll('svg.chart')].map(s => {
                const r = s.getBoundingClientRect();
                return {label: s.getAttribute('aria-label'), w: r.width, h: r.height,
                        marks: s.querySelectorAll('rect, line').length, bars: [...s.querySelectorAll('rect')].filter(b => b.getBBox().width > 0).length};
            })""")
            sections = page.evaluate("""() => [...document.querySelectorAll('main section')].map(s => ({id: s.id, text: s.innerText.length,
                missing: s.querySelectorAll('.missing').length}))""")
            title = page.title()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert requests == [(d / "out" / REPORT_NAME).as_uri()]  # the page fetched nothing but itself
    assert title.startswith("cloakbeam release report")
    assert len(charts) >= 10
    for c in charts:
        assert c["w"] > 100 and c["h"] > 20 and c["marks"] > 0 and c["bars"] > 0, c
    by_id = {s["id"]: s for s in sections}
    for sid in SECTION_IDS:
        assert by_id[sid]["text"] > 40 and by_id[sid]["missing"] == 0, sid
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w == 1200 and h > 3000
    print(f"report screenshot: {shot}")
    assert re.search(r"report-browser\d*", str(shot))
