"""bench/engines.py's runner-free row ("core") does the pipeline's work: same events in, same applied and
dead-lettered counts, same prequential AUC as the DirectRunner pipeline over the same file and flags."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.engines import ENGINE, main, run_core, write_events
from pipelines import cli


def test_the_runner_free_core_row_matches_the_directrunner_pipeline(tmp_path):
    events = str(tmp_path / "events.jsonl")
    args = argparse.Namespace(data=None, events=3000, seed=0, shards=2, batch_size=64, negatives=2, sync=False)
    n = write_events(args, events)
    out = tmp_path / "direct"
    assert cli.main(["--data", events, "--output_dir", str(out), "--shards", "2", "--batch_size", "64",
                     "--negatives", "2", "--no_sync", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())

    core = run_core(args, events)

    assert core["applied"] + core["dead_lettered"] == n
    assert (core["applied"], core["dead_lettered"]) == (summary["events_applied"], summary["events_dead_lettered"])
    assert abs(core["auc"] - summary["prequential"]["auc"]) < 1e-4
    assert core["seconds"] > 0


def test_engine_names_carry_the_flink_rows_shape_and_parallelism_and_unknown_ones_exit_2(capsys):
    shapes = {name: (m["floor"], m["blocks"], m["parallelism"]) if m else None
              for name in ("direct", "core", "flink-p2", "flink-floor-p1", "flink-floor-blocks-p12", "flink-p0",
                           "flink-blocks-p2", "spark")
              for m in [ENGINE.fullmatch(name)]}
    assert shapes == {"direct": (None, None, None), "core": (None, None, None), "flink-p2": (None, None, "2"),
                      "flink-floor-p1": ("floor-", None, "1"), "flink-floor-blocks-p12": ("floor-blocks-", "blocks-", "12"),
                      "flink-p0": None, "flink-blocks-p2": None, "spark": None}
    with pytest.raises(SystemExit) as exit_:
        main(["--engines", "direct,flink-p0"])
    assert exit_.value.code == 2
    assert "--engines: unknown flink-p0" in capsys.readouterr().err
