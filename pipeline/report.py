"""The release report: OUT/report.html, one self-contained page built from the manifest (and its signature file).

Self-contained: no script, no stylesheet or font from the network, every chart an inline SVG drawn here. It
reads only the manifest, which holds names, counts, hashes and policy text, never a record value, so the page
cannot show one either; every string is HTML-escaped.

Adding a section (for a new manifest section such as a uniqueness scan or access-control information) is one
function: decorate `render(manifest, signature) -> html | None` with `@report_section(id, title, order)`; return
None when the manifest has nothing for it. A manifest section nobody renders still appears under "Other
sections" as a plain table, so new evidence is never silently left out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloakbeam.core import fsio

REPORT_NAME = "report.html"
Renderer = Callable[[Mapping[str, Any], Mapping[str, Any] | None], str | None]


@dataclass(frozen=True)
class ReportSection:
    id: str
    title: str
    order: int
    render: Renderer
    #: manifest["sections"] keys this renderer covers (so "Other sections" does not repeat them)
    covers: tuple[str, ...] = ()


_SECTIONS: list[ReportSection] = []


def report_section(id: str, title: str, order: int, covers: Sequence[str] = ()) -> Callable[[Renderer], Renderer]:
    """Register a report section renderer (see the module docstring)."""

    def deco(fn: Renderer) -> Renderer:
        _SECTIONS[:] = [s for s in _SECTIONS if s.id != id] + [ReportSection(id, title, order, fn, tuple(covers))]
        return fn

    return deco


# ------------------------------------------------------------------------------------------------ helpers
def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return esc(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_num(c) if not isinstance(c, _Raw) else c.html}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class _Raw:
    html: str


def kv(items: Mapping[str, Any]) -> str:
    rows = []
    for k, v in items.items():
        if isinstance(v, (dict, list)):
            v = _Raw(f"<code>{esc(json.dumps(v, sort_keys=True, default=str))}</code>")
        rows.append((k, v))
    return table(("item", "value"), rows, "kv")


_PALETTE = ("#3867d6", "#20bf6b", "#f7b731", "#eb3b5a", "#8854d0", "#0fb9b1", "#fa8231", "#4b6584")


def bar_chart(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], *, errors: Mapping[str, Sequence[float]] | None = None,
              unit: str = "", max_value: float | None = None) -> str:
    """A horizontal grouped bar chart as inline SVG (one group per label, one bar per series)."""
    names = list(series)
    n_bars = max(len(names), 1)
    bar_h, gap, left, right, top = 14, 10, 210, 90, 26
    width = 640
    plot_w = width - left - right
    vals = [float(v) for s in series.values() for v in s if v is not None]
    errs = [float(e) for s in (errors or {}).values() for e in s if e is not None]
    top_value = max_value if max_value is not None else max(vals + [0.0]) + (max(errs) if errs else 0.0)
    top_value = top_value or 1.0
    group_h = n_bars * bar_h + gap
    height = top + len(labels) * group_h + (18 * ((len(names) + 2) // 3) if len(names) > 1 else 8)
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<text x="0" y="16" class="ct">{esc(title)}</text>']
    for i, label in enumerate(labels):
        y0 = top + i * group_h
        parts.append(f'<text x="{left - 6}" y="{y0 + n_bars * bar_h / 2 + 4}" text-anchor="end" class="cl">{esc(label)}</text>')
        for j, name in enumerate(names):
            v = series[name][i]
            if v is None:
                continue
            w = max(0.0, float(v)) / top_value * plot_w
            y = y0 + j * bar_h
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.2f}" height="{bar_h - 2}" fill="{_PALETTE[j % len(_PALETTE)]}"><title>{esc(name)}: {_num(v)}{esc(unit)}</title></rect>')
            e = (errors or {}).get(name, [None] * len(labels))[i]
            if e:
                x1, x2 = left + max(0.0, float(v) - e) / top_value * plot_w, left + (float(v) + e) / top_value * plot_w
                parts.append(f'<line x1="{x1:.2f}" x2="{x2:.2f}" y1="{y + bar_h / 2 - 1}" y2="{y + bar_h / 2 - 1}" stroke="#222" stroke-width="1.5"/>')
            parts.append(f'<text x="{left + w + 4:.2f}" y="{y + bar_h - 3}" class="cv">{_num(v)}{esc(unit)}</text>')
    if len(names) > 1:
        ly = top + len(labels) * group_h + 4
        for j, name in enumerate(names):
            x = left + (j % 3) * 150
            yy = ly + (j // 3) * 18
            parts.append(f'<rect x="{x}" y="{yy}" width="10" height="10" fill="{_PALETTE[j % len(_PALETTE)]}"/><text x="{x + 14}" y="{yy + 9}" class="cl">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def _sections(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    return manifest.get("sections") or {}


# ------------------------------------------------------------------------------------------------ sections
@report_section("counts", "Counts and reconciliation", 10)
def _counts(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    c = m.get("counts", {})
    ok = m.get("reconciled")
    verdict = (f'<p class="verdict {"ok" if ok else "bad"}">input {_num(c.get("input", 0))} = written {_num(c.get("written", 0))} + '
               f'quarantined {_num(c.get("quarantined", 0))} + suppressed {_num(c.get("suppressed", 0))}: '
               f'{"reconciled" if ok else "DOES NOT reconcile"}</p>')
    chart = bar_chart("records", ["input", "written", "quarantined", "suppressed"], {"records": [c.get(k, 0) for k in ("input", "written", "quarantined", "suppressed")]})
    reasons = m.get("quarantine_reasons") or {}
    rtable = table(("quarantine reason", "records"), sorted(reasons.items())) if reasons else "<p>No record was quarantined.</p>"
    problems = "".join(f"<li>{esc(p)}</li>" for p in m.get("reconciliation_problems", []))
    meta = kv({"run": m.get("run_id"), "runner": m.get("runner"), "mode": m.get("mode"), "started": m.get("started_at"),
               "seconds": m.get("seconds"), "input files": len(m.get("inputs", [])), "output files": len(m.get("outputs", [])),
               "policy sha256": (m.get("policy") or {}).get("sha256"), "schema sha256": (m.get("schema") or {}).get("sha256")})
    return verdict + (f"<ul class='bad'>{problems}</ul>" if problems else "") + chart + rtable + meta


@report_section("fields", "Fields: class and action", 20, covers=("classification",))
def _fields(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    rows = []
    for path, f in (m.get("fields") or {}).items():
        a = f.get("action") or {}
        params = {k: v for k, v in a.items() if k not in ("action", "reason")}
        desc = a.get("action", "") + (" (default deny)" if "reason" in a else "")
        rows.append((path, f.get("class"), f.get("class_source"), desc, _Raw(f"<code>{esc(json.dumps(params, sort_keys=True, default=str))}</code>") if params else ""))
    return table(("field", "class", "class source", "action", "parameters"), rows)


@report_section("kanon", "Equivalence classes (k-anonymity)", 30, covers=("k_anonymity",))
def _kanon(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str | None:
    k = _sections(m).get("k_anonymity")
    if not k:
        return _missing("The policy declares no k_anonymity section: no equivalence classes were formed.")
    batch = k.get("batch") or {}
    hist = batch.get("class_size_histogram") or {}
    out = f"<p>{esc(k.get('summary', ''))}</p>"
    if hist:
        labels = list(hist)
        out += bar_chart("equivalence-class sizes (records per bucket)", labels,
                         {"records": [hist[b]["records"] for b in labels], "classes": [hist[b]["classes"] for b in labels]})
    levels = batch.get("levels") or {}
    if levels:
        out += table(("quasi-identifier", "released level", "of"), [(p, v.get("name"), v.get("of")) for p, v in levels.items()])
    out += kv({x: batch.get(x) for x in ("k_target", "k_achieved", "l_target", "l_achieved", "classes", "records_in", "records_released",
                                          "records_suppressed", "suppression_limit", "information_loss") if x in batch})
    return out


@report_section("suppression", "Suppression", 35)
def _suppression(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    c = m.get("counts", {})
    n = c.get("input", 0) or 0
    s = c.get("suppressed", 0) or 0
    batch = (_sections(m).get("k_anonymity") or {}).get("batch") or {}
    limit = batch.get("suppression_limit")
    share = s / n if n else 0.0
    chart = bar_chart("suppressed share of input (%)", ["suppressed"] + (["limit"] if limit is not None else []),
                      {"percent": [round(share * 100, 4)] + ([round(limit * 100, 4)] if limit is not None else [])}, unit="%")
    return f"<p>{_num(s)} of {_num(n)} records suppressed ({share:.2%})" + (f"; the policy allows at most {limit:.2%}." if limit is not None else ".") + "</p>" + chart


@report_section("risk", "Re-identification risk", 40, covers=("risk",))
def _risk(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    out = ""
    batch = (_sections(m).get("k_anonymity") or {}).get("batch") or {}
    if batch:
        out += "<h3>Bounds from k (the search's classes; no population table)</h3>"
        out += table(("model", "figure", "value"), [("prosecutor", "1 / smallest class", batch.get("prosecutor_risk")),
                                                     ("journalist", "mean over classes of 1 / class size", batch.get("journalist_risk")),
                                                     ("marketer", "classes / released records", batch.get("marketer_risk"))])
    r = _sections(m).get("risk")
    if not r or not r.get("measured"):
        return out + _missing("Measured risk: not evaluated for this run (run with --evaluate, or `cloakbeam evaluate`).")
    link = r.get("linkage")
    out += "<h3>Measured: linkage attack on the released files</h3>"
    if link:
        meets = link.get("meets_k")
        cls = "ok" if meets else ("bad" if meets is False else "")
        out += f'<p class="verdict {cls}">{esc(link.get("statement"))}</p>'
        models = ("prosecutor", "journalist", "marketer")
        out += bar_chart("highest record risk / expected share re-identified", list(models),
                         {"risk": [link["prosecutor"]["highest_risk"], link["journalist"]["highest_risk"], link["marketer"]["expected_share"]]}, max_value=1.0)
        out += table(("model", "highest record risk", "average risk", "expected re-identifications"),
                     [("prosecutor", link["prosecutor"]["highest_risk"], link["prosecutor"]["average_risk"], link["prosecutor"]["expected_reidentifications"]),
                      ("journalist", link["journalist"]["highest_risk"], link["journalist"]["average_risk"], link["journalist"]["expected_reidentifications"]),
                      ("marketer", "", link["marketer"]["expected_share"], link["marketer"]["expected_reidentifications"])])
        out += kv({x: link.get(x) for x in ("records_released", "classes", "smallest_class", "smallest_population_class", "uniquely_matched",
                                             "uniquely_matched_share", "records_in_classes_below_k", "classes_not_in_adversary_table") if x in link})
        out += f"<p>Quasi-identifiers joined: {esc(', '.join(r.get('linkable_quasi_identifiers', [])))}. Adversary: {esc(r.get('adversary'))}.</p>"
    else:
        out += f"<p>{esc(r.get('statement'))}</p>"
    mi = r.get("membership_inference") or {}
    out += "<h3>Measured: membership inference</h3>"
    if mi.get("measured"):
        out += f'<p class="verdict {"ok" if mi.get("level") == "low" else "bad"}">{esc(mi.get("statement"))}</p>'
        out += bar_chart("membership test", ["ROC AUC", "advantage", "members: exact match", "non-members: exact match"],
                         {"score": [mi["auc"], mi["advantage"], mi["members_exact_match_share"], mi["non_members_exact_match_share"]]}, max_value=1.0)
        out += kv({x: mi.get(x) for x in ("method", "members", "non_members", "reference_rows", "median_dcr_members", "median_dcr_non_members", "features", "adversary")})
    else:
        out += _missing(f"Not measured: {mi.get('reason', 'no held-out records')}")
    return out


@report_section("utility", "ML utility: raw vs released", 50, covers=("utility",))
def _utility(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    u = _sections(m).get("utility")
    if not u:
        return _missing("Not evaluated for this run (run with --evaluate, or `cloakbeam evaluate`).")
    if not u.get("measured"):
        return _missing(f"Not measured: {u.get('reason') or (u.get('released') or {}).get('reason') or (u.get('raw') or {}).get('reason')}")
    raw, rel = u["raw"], u["released"]
    out = f"<p>{esc(u.get('summary'))}. Label <code>{esc(u.get('label'))}</code>; model <code>{esc(u.get('model'))}</code>.</p>"
    out += bar_chart("test-split scores", ["ROC AUC", "accuracy"], {"raw": [raw["auc"], raw["accuracy"]], "released": [rel["auc"], rel["accuracy"]]}, max_value=1.0)
    out += table(("", "train rows", "test rows", "AUC", "accuracy", "positive share (test)"),
                 [("raw", raw["train_rows"], raw["test_rows"], raw["auc"], raw["accuracy"], raw["positive_share_test"]),
                  ("released", rel["train_rows"], rel["test_rows"], rel["auc"], rel["accuracy"], rel["positive_share_test"])])
    loss = u.get("information_loss") or {}
    if loss:
        names = list(loss)
        out += bar_chart("information loss per feature (share of entropy lost)", names, {"loss": [loss[n].get("entropy_loss", 0.0) for n in names]}, max_value=1.0)
        out += table(("feature", "action", "entropy raw (bits)", "entropy released (bits)", "loss", "distinct raw", "distinct released"),
                     [(n, v.get("action"), v.get("entropy_raw_bits"), v.get("entropy_released_bits"), v.get("entropy_loss"), v.get("distinct_raw"),
                       v.get("distinct_released")) for n, v in loss.items()])
    split = u.get("split") or {}
    sample = u.get("sample") or {}
    out += kv({"split (raw)": split.get("raw"), "split (released)": split.get("released"), **{f"sample: {k}": v for k, v in sample.items()}})
    return out


@report_section("dp", "Differentially private statistics", 60, covers=("dp_statistics",))
def _dp(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    d = _sections(m).get("dp_statistics")
    if not d:
        return _missing("The policy declares no dp_statistics section.")
    b, s = d.get("budget", {}), d.get("spent", {})
    out = f"<p>{esc(d.get('summary'))}. {esc(d.get('partition_selection'))}; {esc(d.get('composition'))}; {esc(d.get('library'))}.</p>"
    out += bar_chart("privacy budget (epsilon)", ["budget", "spent"], {"epsilon": [b.get("epsilon", 0.0), s.get("epsilon", 0.0)]})
    for st in d.get("statistics", []):
        res = st.get("results") or {}
        title = f"{st['name']}: {st['metric']}" + (f" of {st.get('value')}" if st.get("value") else "") + f" (epsilon {st['epsilon']:g}, delta {st['delta']:g}, {st['noise']} noise)"
        out += f"<h3>{esc(title)}</h3>"
        if not res:
            out += _missing(f"No result: {d.get('reason') or 'the DP step did not report'}.")
            continue
        labels = [k for k in st.get("partitions") or [] if k in res] + [k for k in res if k not in (st.get("partitions") or [])]
        out += bar_chart("DP value per partition (bar: noise std. dev.)", labels, {"DP value": [res[k]["value"] for k in labels]},
                         errors={"DP value": [res[k].get("noise_stddev") for k in labels]})
        bounds = {k: st.get(k) for k in ("max_partitions_contributed", "max_contributions_per_partition", "min_value", "max_value") if st.get(k) is not None}
        out += table(("partition", "DP value", "noise std. dev."), [(k, res[k]["value"], res[k].get("noise_stddev", "")) for k in labels])
        out += kv({"group by": st.get("group_by"), **bounds})
    return out


@report_section("splits", "Train / validation / test splits", 70, covers=("splits",))
def _splits(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    sp = _sections(m).get("splits")
    if not sp:
        return _missing("The policy declares no split section: the release is one unsplit set.")
    counts = sp.get("counts", {})
    out = f'<p class="verdict {"ok" if sp.get("reconciled") else "bad"}">{esc(sp.get("summary"))}</p>'
    out += bar_chart("rows per split", list(counts), {"rows": list(counts.values())})
    pol = sp.get("policy", {})
    out += table(("split", "declared fraction", "rows", "share", "files"),
                 [(n, (pol.get("fractions") or {}).get(n), counts[n], (sp.get("shares") or {}).get(n), (sp.get("files") or {}).get(n)) for n in counts])
    out += kv({"subject field": pol.get("by"), "assignment": pol.get("method"), "layout": pol.get("layout")})
    return out


@report_section("keys", "Keys and signer", 80)
def _keys(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str:
    out = "<h3>Keys</h3>" + (kv(dict(m.get("keys") or {})) if m.get("keys") else _missing("The manifest records no key reference."))
    wrapped = m.get("wrapped_keys") or []
    if wrapped:
        # Wrapped data keys are listed by id and KEK only; their (encrypted) bytes are not repeated here.
        shown = ("key_id", "column", "alg", "provider", "kek", "kek_version", "created")
        out += table(shown, [[w.get(k) for k in shown] for w in wrapped])
    out += "<h3>Signature</h3>"
    if sig:
        out += kv({k: v for k, v in sig.items() if k not in ("signature", "public_key")})
    else:
        out += _missing("No manifest signature was found next to the manifest.")
    return out


@report_section("other", "Other sections", 90)
def _other(m: Mapping[str, Any], sig: Mapping[str, Any] | None) -> str | None:
    covered = {c for s in _SECTIONS for c in s.covers}
    rest = {k: v for k, v in _sections(m).items() if k not in covered}
    if not rest:
        return None
    out = ""
    for name, v in sorted(rest.items()):
        out += f"<h3>{esc(name)}</h3>" + (kv(v) if isinstance(v, Mapping) else f"<code>{esc(json.dumps(v, default=str))}</code>")
    return out


# ------------------------------------------------------------------------------------------------ page
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1e272e;background:#f5f6fa}
header{background:#1e3799;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}header p{margin:4px 0 0;opacity:.85}
nav{padding:8px 28px;background:#dfe4ea}nav a{margin-right:14px;color:#1e3799;text-decoration:none}
main{padding:8px 28px 40px;max-width:1100px}section{background:#fff;border-radius:6px;padding:6px 18px 14px;margin:16px 0;box-shadow:0 1px 2px #0002}
h2{font-size:18px;border-bottom:1px solid #dfe4ea;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #dfe4ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f2f6}code{font-size:12px;word-break:break-all}.missing{color:#57606f;font-style:italic}
.verdict{padding:6px 10px;border-radius:4px;background:#f1f2f6}.verdict.ok{background:#d1f2e0}.verdict.bad{background:#fde2e4}
svg.chart{display:block;margin:8px 0}.ct{font-weight:600;font-size:13px}.cl{font-size:12px}.cv{font-size:11px;fill:#2f3542}
"""


def build_report(manifest: Mapping[str, Any], signature: Mapping[str, Any] | None = None) -> str:
    """The report page as a string (UTF-8 HTML)."""
    sections = []
    for s in sorted(_SECTIONS, key=lambda s: s.order):
        body = s.render(manifest, signature)
        if body is None:
            continue
        sections.append((s, body))
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s, _ in sections)
    main = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{body}</section>' for s, body in sections)
    pol = manifest.get("policy") or {}
    title = f"cloakbeam release report: {pol.get('dataset', '')}"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>run {esc(manifest.get('run_id'))} · finished {esc(manifest.get('finished_at'))} · "
            f"cloakbeam {esc((manifest.get('versions') or {}).get('cloakbeam'))}</p></header>"
            f"<nav>{nav}</nav><main>{main}</main></body></html>\n")


def write_report(out_dir: str, manifest: Mapping[str, Any]) -> str:
    """Build the report from the manifest (and OUT/manifest.json.sig when present); write OUT/report.html atomically."""
    sig = None
    sig_path = fsio.join(out_dir, "manifest.json.sig")
    try:
        if fsio.is_local(sig_path):
            with open(sig_path, encoding="utf-8") as fh:
                sig = json.load(fh)
        else:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(sig_path) as fh:
                sig = json.loads(fh.read())
    except (OSError, ValueError):
        sig = None
    path = fsio.join(out_dir, REPORT_NAME)
    with fsio.atomic_writer(path) as w:
        w.write(build_report(manifest, sig).encode("utf-8"))
    return path
