"""Stage timers: per-stage wall seconds measured in the workers, carried in RunStats.timers (summed across workers
and batches) and written into the manifest as `stages`, with the launcher's `prepare` and `graph`."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from cloakbeam.core.stats import RunStats
from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.pipeline.manifest import stage_seconds
from cloakbeam.tests.paths import POLICY, SCHEMA


def test_sketch_seconds_are_summed_by_merge_and_not_compared():
    from cloakbeam.transforms.uniqueness import ScanSketch

    a, b = ScanSketch(rows=3, seconds=0.5), ScanSketch(rows=4, seconds=0.25)
    merged = a.merge(b, 16)
    assert merged.rows == 7 and merged.seconds == 0.75
    assert ScanSketch(rows=7, seconds=9.0) == merged  # the timer is not part of the figures


def test_timers_merge_by_summing():
    a = RunStats(timers=Counter({"read": 0.5, "protect": 1.0}))
    b = RunStats(timers=Counter({"protect": 2.0, "write": 0.25}))
    merged = RunStats.merged([a, b, RunStats()])
    assert merged.timers == Counter({"read": 0.5, "protect": 3.0, "write": 0.25})
    assert stage_seconds(merged) == {"protect": 3.0, "read": 0.5, "write": 0.25}


@pytest.mark.slow
def test_a_run_records_positive_seconds_for_the_stages_its_policy_uses(tmp_path):
    from cloakbeam.schemas.generate import _pools, generate_table

    src = tmp_path / "in.parquet"
    pq.write_table(generate_table(1200, 3, 0, _pools(3)), src)

    def run(name, batch_size):
        return run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(POLICY),
                                        output=str(tmp_path / name), progress=False, state_dir=str(tmp_path / "state"),
                                        batch_size=batch_size))

    manifest = run("many", 200)  # six batches: the per-batch timers are summed
    stages = manifest["stages"]
    used = {"prepare", "graph", "read", "protect", "write", "dp_statistics", "protect.classify", "protect.tokenize",
            "protect.scrub", "protect.encrypt", "protect.mask", "protect.generalize",
            "k_anonymity.search", "k_anonymity.apply", "uniqueness"}
    assert used <= set(stages), sorted(used - set(stages))
    assert all(stages[name] > 0 for name in used), {n: stages[n] for n in used}
    # The action families are part of the protect step, which is part of the graph's run.
    families = sum(v for k, v in stages.items() if k.startswith("protect."))
    assert families <= stages["protect"] * 1.01 + 1e-3
    assert stages["protect"] < stages["graph"] * 4  # summed over at most a few workers, not counted per element
    assert all(isinstance(v, float) for v in stages.values())
