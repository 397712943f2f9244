"""Property-based bad input: malformed bytes, wrong types, missing fields, absurd timestamps, huge
strings, unknown event types and duplicate ids. The cleaning core never raises anything but
InvalidEvent (with a reason) and what it accepts fits the wire schema; the pipeline never crashes,
every bad record reaches the dead-letter output with a reason, and input = applied + dead-lettered."""

from __future__ import annotations

import apache_beam as beam
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import schemas
from core.cleaning import CleanConfig, InvalidEvent, decode_event
from core.settings import PipelineConfig, ShardingConfig, UpdateConfig
from model.config import LearnerConfig, TableConfig
from pipelines.freshrec_pipeline import RefreshModels
from tests.helpers import BASE_MS, FEATURES, Collected, CollectTo
from transforms.clean import DEAD_LETTER
from transforms.update import REPORTS

GOOD = {"event_id": "e", "user_id": "u1", "item_id": "i1", "event_type": "click",
        "event_time_ms": BASE_MS, "value": None, "context": {}}

junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=50), st.text(min_size=1000, max_size=5000), st.binary(max_size=50),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
field_names = st.sampled_from(list(GOOD))
absurd_times = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=20))


@st.composite
def bad_records(draw):
    kind = draw(st.sampled_from(["bytes", "wrong_type", "missing", "time", "huge", "event_type"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    rec = dict(GOOD, event_id=f"bad-{draw(st.integers(0, 10**9))}")
    if kind == "wrong_type":
        rec[draw(field_names)] = draw(junk)
    elif kind == "missing":
        del rec[draw(field_names.filter(lambda f: f not in ("value", "context")))]
    elif kind == "time":
        rec["event_time_ms"] = draw(absurd_times)
    elif kind == "huge":
        rec[draw(st.sampled_from(["user_id", "item_id", "event_id"]))] = "x" * draw(st.integers(257, 100_000))
    else:
        rec["event_type"] = draw(st.text(max_size=30).filter(lambda t: t not in schemas.EVENT_TYPES))
    assume(_is_invalid(rec))  # a mutation can land on a valid value (a plausible time, say)
    return rec


def _is_invalid(rec) -> bool:
    try:
        decode_event(rec)
    except InvalidEvent:
        return True
    return False


@settings(max_examples=400, deadline=None)
@given(st.one_of(bad_records(), junk, st.builds(dict, st.dictionaries(st.text(max_size=10), junk, max_size=8))))
def test_decode_accepts_only_schema_valid_events_and_otherwise_gives_a_reason(payload):
    try:
        event = decode_event(payload, CleanConfig())
    except InvalidEvent as exc:
        assert exc.reason
        return
    schemas.encode(schemas.RAW_EVENT, event)  # whatever passes fits the wire schema


def _config() -> PipelineConfig:
    table = TableConfig(dim=4)
    learner = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width,
                            user_table=table, item_table=table, negatives=1, gate=False)
    return PipelineConfig(FEATURES, learner, UpdateConfig(batch_size=5, flush_interval_s=None), CleanConfig(),
                          ShardingConfig(shards=2), 3_600_000, 86_400_000, 86_400_000, "unused", 0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                               HealthCheck.filter_too_much])
@given(bad=st.lists(bad_records(), min_size=1, max_size=15), n_good=st.integers(1, 12), dups=st.integers(0, 4))
def test_pipeline_never_crashes_and_accounts_for_every_record(bad, n_good, dups):
    good = [dict(GOOD, event_id=f"g{i}", user_id=f"u{i % 3}", item_id=f"i{i % 4}", event_time_ms=BASE_MS + i * 1000)
            for i in range(n_good)]
    duplicates = [dict(good[i % n_good]) for i in range(dups)]
    payloads = good + duplicates + bad
    Collected.clear()
    with beam.Pipeline() as p:
        out = (p | beam.Create(payloads, reshuffle=False)
                 | beam.Map(lambda x: beam.window.TimestampedValue(x, BASE_MS / 1000))
                 | RefreshModels(_config()))
        out[REPORTS] | "CollectReports" >> CollectTo("prop/reports")
        out[DEAD_LETTER] | "CollectDead" >> CollectTo("prop/dead")
    applied = sum(r["events"] for r in Collected.get("prop/reports"))
    dead = Collected.get("prop/dead")
    assert applied + len(dead) == len(payloads)
    assert applied == n_good
    assert all(d["reason"] and d["step"] for d in dead)
    assert sum(d["reason"] == "duplicate event_id" for d in dead) == dups
    for d in dead:
        schemas.encode(schemas.DEAD_LETTER, d)
