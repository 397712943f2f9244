"""File replay (column mappings for MovieLens and Globo formats), the synthetic stream, and the CLI end to end.

The real datasets are never copied into the repo: these tests write tiny files in the same formats.
"""

from __future__ import annotations

import glob
import io
import json
import marshal
import os

import apache_beam as beam
import fastavro
import pytest
import torch

import schemas
from core.featurizers import featurized_record
from core.readers import PRESETS, SyntheticConfig, guess_preset, read_replay, synthetic_events
from model.config import LearnerConfig, TableConfig
from model.journal import journal_entry, journal_events, restore_learner
from model.learner import IncrementalLearner
from pipelines import cli
from tests.helpers import FEATURES, Collected, CollectTo, topic_stream
from transforms.sources import ReplayEvents


@pytest.fixture
def movielens_dir(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    rows = [(1, 10, 5, 881250949), (2, 20, 3, 881250900), (1, 30, 4, 881250949), (3, 10, 1, 881250000)]
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows) + "bad\tline\n")
    return str(d)


@pytest.fixture
def globo_dir(tmp_path):
    d = tmp_path / "globo" / "clicks"
    d.mkdir(parents=True)
    header = "user_id,session_id,session_start,session_size,click_article_id,click_timestamp,click_environment,click_deviceGroup,click_os,click_country,click_region,click_referrer_type\n"
    (d / "clicks_hour_000.csv").write_text(header + "0,100,1506825423000,2,157541,1506826828020,4,3,20,1,20,2\n"
                                           "0,100,1506825423000,2,68866,1506826858020,4,3,20,1,20,2\n")
    (d / "clicks_hour_001.csv").write_text(header + "1,200,1506825000000,1,5,1506826000000,4,1,17,1,21,1\n")
    return str(d.parent)


def test_movielens_mapping_sorts_by_time_and_keeps_bad_rows_for_validation(movielens_dir):
    assert guess_preset(movielens_dir) == "movielens"
    events = read_replay(movielens_dir, PRESETS["movielens"])
    assert len(events) == 5
    bad, *good = events  # the unparsable time sorts first and fails validation later
    assert bad["event_time_ms"] is None
    times = [e["event_time_ms"] for e in good]
    assert times == sorted(times) and times[0] == 881250000 * 1000
    assert good[0] == {"event_id": "ml-3-10-881250000", "user_id": "3", "item_id": "10", "event_type": "rating",
                       "event_time_ms": 881250000000, "value": 1, "context": {}}
    # ties keep file order
    tied = [e["item_id"] for e in good if e["event_time_ms"] == 881250949000]
    assert tied == ["10", "30"]


def test_globo_mapping_merges_parts_in_click_time_order(globo_dir):
    assert guess_preset(globo_dir) == "globo"
    events = read_replay(globo_dir, PRESETS["globo"])
    assert [e["event_time_ms"] for e in events] == [1506826000000, 1506826828020, 1506826858020]
    first = events[0]
    assert first["event_type"] == "click" and first["item_id"] == "5" and first["user_id"] == "1"
    assert first["context"]["session_id"] == "200" and first["context"]["click_os"] == "17"


def test_replay_source_stamps_event_time(globo_dir):
    Collected.clear()
    with beam.Pipeline() as p:
        (p | ReplayEvents(globo_dir, PRESETS["globo"])
           | beam.Map(lambda e, ts=beam.DoFn.TimestampParam: (e["event_time_ms"], ts.micros // 1000))
           | CollectTo("replay"))
    pairs = Collected.get("replay")
    assert len(pairs) == 3 and all(a == b for a, b in pairs)


def test_paced_replay_emits_every_event_in_order_one_second_of_events_at_a_time(tmp_path):
    """--replay_rate: the reader emits ``rate`` events, then defers the rest of its range for a second
    (a streaming runner honours the delay; the batch DirectRunner resumes at once)."""
    import time

    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    path = tmp_path / "ratings.tsv"
    path.write_text("".join(f"u{i % 3}\ti{i % 4}\t4\t{1_700_000_000 + i}\n" for i in range(9)))
    Collected.clear()
    t = time.perf_counter()
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=opts) as p:
        (p | ReplayEvents(str(path), PRESETS["movielens"], rate=4) | beam.Map(lambda e: e["event_time_ms"])
           | CollectTo("paced"))
    elapsed = time.perf_counter() - t
    assert Collected.get("paced") == [(1_700_000_000 + i) * 1000 for i in range(9)]
    assert elapsed >= 2.0, "9 events at 4/s: two deferrals of a second each"
    with pytest.raises(ValueError, match="rate"):
        ReplayEvents(str(path), PRESETS["movielens"], rate=0)


def test_missing_dataset_path_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="FRESHREC_DATA"):
        ReplayEvents(str(tmp_path / "nope"), PRESETS["movielens"])


def test_synthetic_stream_is_deterministic_ordered_and_drifts():
    cfg = SyntheticConfig(events=3000, malformed_fraction=0.01, duplicate_fraction=0.01)
    a, b = list(synthetic_events(cfg)), list(synthetic_events(cfg))
    assert a == b
    times = [e["event_time_ms"] for e in a if isinstance(e.get("event_time_ms"), int)]
    assert times == sorted(times)
    ids = [e["event_id"] for e in a]
    assert len(ids) != len(set(ids)), "duplicates are injected"
    # interests drift: a heavy user's topic mix changes between the first and last third
    u0 = [e["context"]["topic"] for e in a if e.get("user_id") == "u0" and e.get("context")]
    assert set(u0[: len(u0) // 3]) != set(u0[-len(u0) // 3 :]) or len(set(u0)) > 1


def test_restore_from_snapshot_and_journal_equals_the_live_learner():
    cfg = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width,
                        user_table=TableConfig(dim=8), item_table=TableConfig(dim=8), gate=True, gate_window=50)
    events = [schemas.decode(schemas.FEATURIZED_EVENT, schemas.encode(schemas.FEATURIZED_EVENT, featurized_record(e)))
              for e in topic_stream(600)]
    live = IncrementalLearner(cfg)
    batches = [events[i : i + 30] for i in range(0, 600, 30)]
    for b in batches[:8]:
        live.learn(b)
        live.take_deltas()
    snapshot = live.to_bytes()
    journal = []
    for b in batches[8:]:
        live.learn(b)
        live.take_deltas()
        journal.append(journal_entry(b))
    restored = restore_learner(cfg, 0, snapshot, journal)
    assert restored.version == live.version
    assert restored.parameters_snapshot() == live.parameters_snapshot()


def test_a_snapshot_of_another_format_is_refused():
    sd = torch.load(io.BytesIO(IncrementalLearner(LearnerConfig()).to_bytes()), weights_only=True)
    sd["format"] = 2
    buf = io.BytesIO()
    torch.save(sd, buf)
    with pytest.raises(ValueError, match="checkpoint format 2 is not 3"):
        IncrementalLearner.from_bytes(buf.getvalue())


def test_a_damaged_journal_entry_is_a_clear_error():
    with pytest.raises(ValueError, match="journal entry"):
        journal_events(journal_entry([{"event_id": "e1"}])[:-3])
    with pytest.raises(ValueError, match="list of event records"):
        journal_events(b"\0\0\0\0" + marshal.dumps({"not": "a list"}))


def read_avro_dir(path):
    records = []
    for f in sorted(glob.glob(os.path.join(path, "*.avro"))):
        with open(f, "rb") as fh:
            records.extend(fastavro.reader(fh))
    return records


def test_cli_runs_the_synthetic_default_and_everything_adds_up(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--output_dir", str(out), "--synthetic_events", "1500", "--shards", "2", "--batch_size", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "scores") in printed and "summary.json" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_accounted"] == 1500
    assert summary["events_applied"] + summary["events_dead_lettered"] == 1500
    assert summary["events_dead_lettered"] > 0 and set(summary["dead_letter_by_reason"]) <= {"malformed", "duplicate event_id", "late"}
    assert summary["counters"]["events_in"] == 1500
    assert summary["prequential"]["auc"] is not None
    scores = read_avro_dir(out / "scores")
    deltas = read_avro_dir(out / "deltas")
    dead = read_avro_dir(out / "dead_letter")
    assert scores and deltas and len(dead) == summary["events_dead_lettered"]
    assert {d["table"] for d in deltas} >= {"user", "item", "user_query", "dense"}
    for shard in (0, 1):
        seqs = sorted(s["sequence"] for s in scores if s["shard"] == shard)
        assert seqs == list(range(1, len(seqs) + 1))


def test_windowed_run_writes_a_summary_per_window_that_adds_up(tmp_path):
    out = tmp_path / "win"
    rc = cli.main(["--output_dir", str(out), "--synthetic_events", "1500", "--shards", "2", "--batch_size", "64",
                   "--output_window_s", "3600"])
    assert rc == 0
    windows = [json.loads(p.read_text()) for p in sorted((out / "summaries").glob("window-*.json"))]
    assert len(windows) >= 2 and not (out / "summary.json").exists()
    assert sum(w["events_accounted"] for w in windows) == 1500
    assert all(w["window_end_ms"] - w["window_start_ms"] == 3_600_000 for w in windows)
    assert sum(w["events_dead_lettered"] for w in windows) == len(read_avro_dir(out / "dead_letter"))


def test_cli_replays_a_movielens_format_file(tmp_path, movielens_dir):
    out = tmp_path / "ml"
    rc = cli.main(["--data", movielens_dir, "--output_dir", str(out), "--shards", "1", "--batch_size", "2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_applied"] == 4 and summary["dead_letter_by_reason"] == {"malformed": 1}


def test_a_flow_controlled_stream_reads_the_synthetic_stream_in_chunks_each_resumed_where_the_last_ended():
    from dataclasses import replace

    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from transforms import sources

    cfg = replace(SyntheticConfig(), events=1_500, seed=3)
    calls = []
    original = sources._task_events
    sources._task_events = lambda task, start: calls.append(start) or original(task, start)
    Collected.clear()
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    try:
        with beam.Pipeline(options=opts) as p:
            (p | sources.SyntheticEvents(cfg, sources.FlowControl(chunk=100)) | beam.Map(lambda e: e["event_id"])
               | CollectTo("flow/ids"))
    finally:
        sources._task_events = original
    assert sorted(calls) == list(range(0, 1_500, 100))  # one chunk per read
    assert Collected.get("flow/ids") == [e["event_id"] for e in synthetic_events(cfg)]


def test_flow_control_waits_while_too_many_events_are_in_flight():
    import threading
    import time

    from core.progress import BOARD
    from transforms.sources import FlowControl

    flow = FlowControl(chunk=10, max_in_flight=100, max_wait_s=1.0)
    BOARD.reset()
    BOARD.note_emitted(500)
    started = time.monotonic()
    flow.wait()  # nothing drains: it gives up after max_wait_s
    assert time.monotonic() - started >= 1.0
    threading.Timer(0.2, lambda: setattr(BOARD, "applied", 450)).start()
    started = time.monotonic()
    flow.wait()  # returns once the run caught up to within max_in_flight
    assert 0.15 <= time.monotonic() - started < 0.9
    BOARD.reset()


def test_a_run_over_batch_max_events_streams_in_bounded_memory_and_its_shards_sync(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--synthetic_events", "3000", "--batch_max_events", "1000", "--shards", "2", "--output_dir",
                     str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "flow-controlled stream" in err and "learn alone" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_in"] == 3000 == summary["events_accounted"]
    assert summary["sync"]["publications"] > 0  # a streaming run: the shards share their global parameters
    # the runner's gauges report each shard's last flush (Beam kept every bundle's value and reported the first)
    gauges = summary["runner_metrics"]["gauges"]
    for shard, version in summary["model_versions"].items():
        assert gauges[f"model_version_shard_{shard}"] == version > 1
        assert gauges[f"table_rows_item_shard_{shard}"] == summary["table_rows"][shard]["item"]


def test_the_runner_keeps_its_metrics_as_a_list_not_a_chain_of_generators():
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from transforms.runtime import keep_runner_metrics_bounded

    keep_runner_metrics_bounded()
    merged = fn_runner.consolidate_monitoring_infos(iter([]))
    assert isinstance(merged, list)
