"""The batch graph does not materialize between Protect and Write: on the FnApiRunner the read, protect, write and
uniqueness-sketch steps fuse into one stage (a Reshuffle, a GroupByKey or a Flatten of inputs from different stages
in between would make the runner buffer every protected batch)."""

from __future__ import annotations

import shutil

import yaml

from cloakbeam.tests.paths import POLICY, SCHEMA


def _fused_stages(tmp_path, policy_doc):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import translations

    from cloakbeam.pipeline.graph import RunSettings, build_graph, prepare

    src = tmp_path / "in.jsonl"
    src.write_text("")
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(policy_doc, sort_keys=False))
    run = prepare(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(pol), output=str(tmp_path / "out"),
                              state_dir=str(tmp_path / "state"), progress=False))
    try:
        p = beam.Pipeline()
        build_graph(p, run)
        _, stages = translations.create_and_optimize_stages(
            p.to_runner_api(), phases=translations.standard_optimize_phases(),
            known_runner_urns=frozenset(["beam:transform:impulse:v1", "beam:transform:group_by_key:v1",
                                         "beam:transform:flatten:v1", "beam:transform:reshuffle:v1"]),
            use_state_iterables=False)
        return [{t.unique_name for t in st.transforms} for st in stages]
    finally:
        shutil.rmtree(run.out_dir, ignore_errors=True)


def test_protect_and_write_are_one_fused_stage(tmp_path):
    doc = yaml.safe_load(POLICY.read_text())
    doc.pop("k_anonymity")  # its plan is a side input: a barrier by design (bounded-memory work is issue 11 part 3)
    doc["fields"].update(date_of_birth={"action": "generalize", "method": "truncate", "to": "year"}, zip="drop", gender="keep")
    assert "uniqueness" in doc
    stages = _fused_stages(tmp_path, doc)
    protect = [s for s in stages if "ProtectRecords/Protect" in s]
    assert len(protect) == 1
    assert {"ReadRecords/Parse", "WriteTrainingParquet/WriteParquet", "ScanUniqueness/SketchBatches", "DpStatistics/Partials"} <= protect[0]
