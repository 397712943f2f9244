"""TestStream-driven tests of RefreshModels with explicit watermarks: on-time, late, duplicate and
malformed events, processing-time flushes, accounting, and freshness of scores."""

from __future__ import annotations

import apache_beam as beam
import fastavro.validation
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

import schemas
from core.cleaning import CleanConfig
from core.progress import BOARD
from core.settings import PipelineConfig, ShardingConfig, UpdateConfig
from model.config import LearnerConfig, TableConfig
from pipelines.freshrec_pipeline import RefreshModels
from tests.helpers import BASE_MS, FEATURES, Collected, CollectTo, fixed_clock
from transforms.clean import DEAD_LETTER
from transforms.direct_runner import tune_streaming_direct_runner
from transforms.update import DELTAS, REPORTS, ROLLBACKS, SCORES


def config(batch_size: int = 2, lateness_ms: int = 60_000, flush_interval_s: float | None = None) -> PipelineConfig:
    table = TableConfig(dim=8)
    learner = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width,
                            user_table=table, item_table=table, negatives=2, gate=False, lr=0.2)
    update = UpdateConfig(batch_size=batch_size, flush_interval_s=flush_interval_s, top_k=3)
    return PipelineConfig(FEATURES, learner, update, CleanConfig(), ShardingConfig(shards=1), lateness_ms, 86_400_000,
                          86_400_000, "unused", 0)


def wire(i: int, user: str, item: str, t_s: float, event_id: str | None = None) -> TimestampedValue:
    record = {"event_id": event_id or f"e{i}", "user_id": user, "item_id": item, "event_type": "click",
              "event_time_ms": BASE_MS + int(t_s * 1000), "value": None, "context": {}}
    return TimestampedValue(schemas.encode(schemas.RAW_EVENT, record), BASE_MS / 1000 + t_s)


def at(t_s: float) -> float:
    return BASE_MS / 1000 + t_s


def run_stream(stream: TestStream, cfg: PipelineConfig, key: str) -> dict[str, list]:
    tune_streaming_direct_runner()  # as the pipeline runs it (build_pipeline)
    Collected.clear()
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=opts) as p:
        out = p | stream | RefreshModels(cfg, clock=fixed_clock)
        for tag in (SCORES, DELTAS, ROLLBACKS, REPORTS, DEAD_LETTER):
            out[tag] | f"Collect{tag}" >> CollectTo(f"{key}/{tag}")
    return {tag: Collected.get(f"{key}/{tag}") for tag in (SCORES, DELTAS, ROLLBACKS, REPORTS, DEAD_LETTER)}


def run_with_flush_request(stream: TestStream, cfg: PipelineConfig, key: str, requested: bool) -> dict[str, list]:
    """``run_stream`` while a source waits to acknowledge (``BOARD.request_flush``), or not."""
    BOARD.request_flush(requested)
    try:
        return run_stream(stream, cfg, key)
    finally:
        BOARD.request_flush(False)


def applied(out: dict[str, list]) -> int:
    return sum(r["events"] for r in out[REPORTS])


def test_on_time_events_are_applied_and_scored():
    stream = (TestStream()
              .advance_watermark_to(at(0))
              .add_elements([wire(1, "u1", "a", 1), wire(2, "u2", "b", 2), wire(3, "u1", "b", 3), wire(4, "u2", "a", 4)])
              .advance_watermark_to(at(100))
              .advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=2), "ontime")
    assert applied(out) == 4
    assert out[DEAD_LETTER] == []
    users = {s["user_id"] for s in out[SCORES]}
    assert users == {"u1", "u2"}
    for s in out[SCORES]:
        assert 1 <= len(s["items"]) <= 3 and s["model_version"] >= 1
    assert out[DELTAS], "a step must publish the rows it changed"
    assert {d["table"] for d in out[DELTAS]} >= {"user", "item", "user_query", "dense"}
    # every output record fits its schema, field types included (the file sinks do not re-validate)
    for tag, name in ((SCORES, schemas.SCORED_OUTPUT), (DELTAS, schemas.MODEL_DELTA)):
        for record in out[tag]:
            fastavro.validation.validate(record, schemas.load_schema(name), raise_errors=True)


def test_late_event_beyond_allowed_lateness_is_dead_lettered_and_within_is_applied():
    stream = (TestStream()
              .advance_watermark_to(at(0))
              .add_elements([wire(1, "u1", "a", 100)])
              .advance_watermark_to(at(130))           # probes at 100, 115, 130 fire: watermark >= 130 proven
              .add_elements([wire(2, "u1", "b", 80)])   # 50 s behind, allowed lateness 60 s: on time
              .add_elements([wire(3, "u1", "c", 10)])   # 120 s behind: late
              .advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=1, lateness_ms=60_000), "late")
    reasons = [(d["event_id"], d["reason"]) for d in out[DEAD_LETTER]]
    assert len(reasons) == 1 and reasons[0][0] == "e3" and reasons[0][1].startswith("late:"), reasons
    assert out[DEAD_LETTER][0]["step"] == "DropLateEvents"
    assert applied(out) == 2


def test_duplicate_event_id_is_dead_lettered_once():
    stream = (TestStream()
              .advance_watermark_to(at(0))
              .add_elements([wire(1, "u1", "a", 1), wire(2, "u1", "b", 2)])
              .add_elements([wire(9, "u1", "a", 3, event_id="e1")])
              .advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=1), "dup")
    assert [(d["event_id"], d["reason"], d["step"]) for d in out[DEAD_LETTER]] == [("e1", "duplicate event_id", "DedupeEvents")]
    assert applied(out) == 2


def test_malformed_payloads_are_dead_lettered_with_reason_and_raw_bytes():
    bad_bytes = b"\x00\xffnot avro"
    wrong_type = {"event_id": "x", "user_id": "u1", "item_id": "a", "event_type": "teleport", "event_time_ms": BASE_MS}
    stream = (TestStream()
              .advance_watermark_to(at(0))
              .add_elements([TimestampedValue(bad_bytes, at(1)), TimestampedValue(wrong_type, at(1)), wire(1, "u1", "a", 2)])
              .advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=1), "malformed")
    dead = sorted(out[DEAD_LETTER], key=lambda d: d["reason"])
    assert len(dead) == 2
    assert all(d["step"] == "DecodeAndValidate" and d["reason"].startswith("malformed:") for d in dead)
    assert any(d["raw"] == bad_bytes and "undecodable Avro" in d["reason"] for d in dead)
    assert any("unknown event_type" in d["reason"] for d in dead)
    assert applied(out) == 1
    for d in out[DEAD_LETTER]:
        schemas.encode(schemas.DEAD_LETTER, d)  # every dead letter fits its schema


def test_every_input_is_accounted_for():
    elements = [wire(i, f"u{i % 3}", f"i{i % 5}", i) for i in range(30)]
    elements.append(wire(3, "u0", "i3", 31, event_id="e3"))        # duplicate
    elements.append(TimestampedValue(b"garbage", at(31)))         # malformed
    stream = (TestStream().advance_watermark_to(at(0)).add_elements(elements[:20])
              .advance_watermark_to(at(200)).add_elements([wire(99, "u1", "x", 5)])   # late: probes prove 79 s
              .add_elements(elements[20:]).advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=4, lateness_ms=60_000), "accounting")
    total_in = len(elements) + 1
    assert applied(out) + len(out[DEAD_LETTER]) == total_in
    assert sorted(d["reason"].split(":")[0] for d in out[DEAD_LETTER]) == ["duplicate event_id", "late", "malformed"]


def test_scores_change_after_a_users_new_events():
    first = [wire(i, f"u{i % 4}", f"i{i % 6}", i) for i in range(8)]
    later = [wire(100 + i, "u1", "i5", 50 + i) for i in range(4)]
    stream = (TestStream().advance_watermark_to(at(0)).add_elements(first)
              .advance_watermark_to(at(40)).add_elements(later).advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=4), "fresh")
    u1 = sorted((s for s in out[SCORES] if s["user_id"] == "u1"), key=lambda s: s["sequence"])
    assert len(u1) >= 2
    before, after = u1[0], u1[-1]
    assert after["model_version"] > before["model_version"]
    assert after["event_time_ms"] > before["event_time_ms"]
    score_before = {i["item_id"]: i["score"] for i in before["items"]}
    score_after = {i["item_id"]: i["score"] for i in after["items"]}
    assert score_after != score_before
    # the item u1 kept clicking ranks first after the new events
    assert after["items"][0]["item_id"] == "i5"


def test_processing_time_flush_with_injected_clock():
    stream = (TestStream()
              .advance_watermark_to(at(0))
              .add_elements([wire(1, "u1", "a", 1)])    # batch of 100 never fills; watermark stays put
              .advance_processing_time(10)                # clock is 0, interval 5 s: the timer fires
              .add_elements([wire(2, "u2", "b", 2)])
              .advance_watermark_to_infinity())
    out = run_stream(stream, config(batch_size=100, flush_interval_s=5), "interval")
    assert applied(out) == 2
    assert len(out[REPORTS]) == 2, "first flush by the processing-time timer, second by the watermark"


@pytest.mark.parametrize("requested", [False, True])
def test_a_requested_flush_applies_each_input_as_it_comes(requested):
    """While a source waits to acknowledge (``BOARD.request_flush``, the Pub/Sub read) the update step flushes
    every input it gets, not only full batches and timers."""
    stream = TestStream().advance_watermark_to(at(0))
    for i in range(3):  # three bundles of two events; the batch of 100 never fills, the watermark stays put
        stream = stream.add_elements([wire(2 * i, "u1", "a", 2 * i + 1), wire(2 * i + 1, "u2", "b", 2 * i + 2)])
    out = run_with_flush_request(stream.advance_watermark_to_infinity(), config(batch_size=100),
                                 f"requested{requested}", requested)
    assert applied(out) == 6
    assert sorted(r["events"] for r in out[REPORTS]) == ([2, 2, 2] if requested else [6])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sequences_per_shard_are_gap_free(batch_size):
    elements = [wire(i, f"u{i % 5}", f"i{i % 7}", i) for i in range(20)]
    stream = TestStream().advance_watermark_to(at(0)).add_elements(elements).advance_watermark_to_infinity()
    out = run_stream(stream, config(batch_size=batch_size), f"seq{batch_size}")
    assert sorted(s["sequence"] for s in out[SCORES]) == list(range(1, len(out[SCORES]) + 1))
    assert sorted(d["sequence"] for d in out[DELTAS]) == list(range(1, len(out[DELTAS]) + 1))


@pytest.mark.parametrize("interval_s, requested, saved", [(0, False, [2, 4, 6, 8]), (5, False, [2, 6, 8]),
                                                          (5, True, [2, 4, 6, 8])])
def test_checkpoints_come_at_most_once_per_interval_and_a_put_off_one_is_saved_by_the_timer(
        tmp_path, interval_s, requested, saved):
    """Four flushes of two events with ``--checkpoint_every_s`` (the clock stays at 0): the first
    checkpoints, the next two come within the interval and are put off, the processing-time timer saves
    them once the interval is over (10 s later), and the fourth, put off again, is saved at the end. A source
    waiting to acknowledge (``BOARD.request_flush``) gets a checkpoint every flush."""
    from dataclasses import replace

    from model.checkpoint import checkpoints, verified_state

    stream = TestStream().advance_watermark_to(at(0))
    for i in range(4):  # the watermark stays put: each flush is a full batch of two
        if i == 3:
            stream = stream.advance_processing_time(10)
        stream = stream.add_elements([wire(2 * i, "u1", "a", 2 * i + 1), wire(2 * i + 1, "u2", "b", 2 * i + 2)])
    cfg = config(batch_size=2, flush_interval_s=100)
    cfg = replace(cfg, update=replace(cfg.update, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                                      checkpoint_every_s=interval_s))
    out = run_with_flush_request(stream.advance_watermark_to_infinity(), cfg, f"interval{interval_s}{requested}",
                                 requested)
    assert applied(out) == 8 and len(out[REPORTS]) == 4
    assert sorted(verified_state(f)["meta"]["events_applied"] for f in checkpoints(tmp_path, 0)) == saved
