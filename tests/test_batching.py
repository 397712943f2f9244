"""Micro-batches and key groups: BatchByKey, GroupStates' TTL sweep, and time order after re-keying."""

from __future__ import annotations

import random

import apache_beam as beam
import pytest

from core.keyed_state import GroupStates, key_group
from tests.helpers import BASE_MS, FEATURES, Collected, CollectTo
from transforms.batching import BatchByKey, RebatchByKey
from transforms.featurize import FeaturizeEvents


def test_key_group_is_stable_and_in_range():
    assert key_group("user-42", 64) == key_group("user-42", 64)
    assert all(0 <= key_group(f"u{i}", 7) < 7 for i in range(100))
    with pytest.raises(ValueError):
        key_group("u", 0)


def test_group_states_sweep_drops_only_idle_ids_and_at_most_every_eighth_of_the_ttl():
    ttl = 8_000_000
    g = GroupStates.new()
    GroupStates.touch(g, "old", BASE_MS)
    GroupStates.touch(g, "new", BASE_MS + ttl - 10)
    g["states"].update(old={"n": 1}, new={"n": 2})
    assert GroupStates.sweep(g, ttl) == 0  # newest - ttl < old's last touch
    GroupStates.touch(g, "new", BASE_MS + ttl + 5)
    assert GroupStates.sweep(g, ttl) == 0  # swept less than ttl/8 ago
    GroupStates.touch(g, "new", BASE_MS + ttl + ttl // 8)
    assert GroupStates.sweep(g, ttl) == 1
    assert set(g["states"]) == set(g["touched"]) == {"new"}


def test_batch_by_key_keeps_every_event_once_grouped_by_key():
    events = [{"event_id": f"e{i}", "user_id": f"u{i % 5}", "event_time_ms": BASE_MS + i} for i in range(200)]
    Collected.clear()
    with beam.Pipeline() as p:
        (p | beam.Create(events, reshuffle=False)
           | beam.ParDo(BatchByKey(lambda e: e["user_id"], max_size=16))
           | CollectTo("batches"))
    batches = Collected.get("batches")
    assert sorted(e["event_id"] for _, b in batches for e in b) == sorted(e["event_id"] for e in events)
    assert all(len(b) <= 16 and {e["user_id"] for e in b} == {k} for k, b in batches)


def test_batches_keep_their_events_window_and_earliest_timestamp():
    # 4 users, events 10 s apart over 4 minutes, fixed windows of a minute; both the size-capped
    # batches (emitted from process) and the rest (emitted at the end of the bundle)
    events = [{"event_id": f"e{i}", "user_id": f"u{i % 4}", "event_time_ms": BASE_MS + i * 10_000} for i in range(24)]
    Collected.clear()
    with beam.Pipeline() as p:
        (p | beam.Create(events, reshuffle=False)
           | "Stamp" >> beam.Map(lambda e: beam.window.TimestampedValue(e, e["event_time_ms"] / 1000))
           | beam.WindowInto(beam.window.FixedWindows(60))
           | beam.ParDo(BatchByKey(lambda e: e["user_id"], max_size=2))
           | "Describe" >> beam.Map(lambda kv, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam:
                                    (kv[0], [e["event_time_ms"] for e in kv[1]], ts.micros // 1000, w.start.micros // 1000))
           | CollectTo("windowed"))
    batches = Collected.get("windowed")
    assert sum(len(times) for _, times, _, _ in batches) == 24
    for _, times, ts_ms, start_ms in batches:
        assert ts_ms == min(times)
        assert all(start_ms <= t < start_ms + 60_000 for t in times)


def test_rebatch_by_key_regroups_micro_batches_keeping_each_event_once_and_the_earliest_timestamp():
    # three upstream batches (one list each, stamped with their earliest event time) regrouped by user
    events = [{"event_id": f"e{i}", "user_id": f"u{i % 3}", "event_time_ms": BASE_MS + i * 1_000} for i in range(30)]
    upstream = [events[0:10], events[10:25], events[25:30]]
    Collected.clear()
    with beam.Pipeline() as p:
        (p | beam.Create(upstream, reshuffle=False)
           | "Stamp" >> beam.Map(lambda b: beam.window.TimestampedValue(b, b[0]["event_time_ms"] / 1000))
           | beam.ParDo(RebatchByKey(lambda e: e["user_id"], max_size=4))
           | "Describe" >> beam.Map(lambda kv, ts=beam.DoFn.TimestampParam: (kv[0], kv[1], ts.micros // 1000))
           | CollectTo("rebatched"))
    batches = Collected.get("rebatched")
    assert sorted(e["event_id"] for _, b, _ in batches for e in b) == sorted(e["event_id"] for e in events)
    starts = {e["event_id"]: b[0]["event_time_ms"] for b in upstream for e in b}
    for key, batch, ts_ms in batches:
        assert len(batch) <= 4 and {e["user_id"] for e in batch} == {key}
        assert ts_ms == min(starts[e["event_id"]] for e in batch)  # never ahead of any source batch


def test_rebatch_by_key_names_the_step_when_given_a_single_event():
    with pytest.raises(Exception, match="BatchByItemGroup: expected a micro-batch"), beam.Pipeline() as p:
        (p | beam.Create([{"event_id": "e1", "item_id": "i1"}], reshuffle=False)
           | beam.ParDo(RebatchByKey(lambda e: e["item_id"], step="BatchByItemGroup")))


def test_batch_by_key_refuses_an_element_in_several_windows():
    events = [{"event_id": "e1", "user_id": "u1", "event_time_ms": BASE_MS}]
    with pytest.raises(Exception, match="one window"), beam.Pipeline() as p:
        (p | beam.Create(events, reshuffle=False)
           | "Stamp" >> beam.Map(lambda e: beam.window.TimestampedValue(e, e["event_time_ms"] / 1000))
           | beam.WindowInto(beam.window.SlidingWindows(60, 30))
           | beam.ParDo(BatchByKey(lambda e: e["user_id"], step="BatchByUser")))


def test_a_bounded_run_featurizes_each_user_in_event_time_order():
    """Keyed steps hand over their input key by key, so after re-keying by user a user's events arrive
    interleaved in time (here: grouped by item). History and recency must still follow event time."""
    rng = random.Random(3)
    events = [{"event_id": f"e{i}", "user_id": f"u{rng.randrange(4)}", "item_id": f"i{rng.randrange(9)}",
               "event_type": "click", "event_time_ms": BASE_MS + i * 60_000, "value": None, "context": {}}
              for i in range(120)]
    arrival = sorted(events, key=lambda e: e["item_id"])  # what an item-keyed step would emit
    Collected.clear()
    with beam.Pipeline() as p:
        (p | beam.Create([arrival[:60], arrival[60:]], reshuffle=False)  # two micro-batches, as CleanEvents emits
           | FeaturizeEvents(FEATURES, state_ttl_ms=30 * 86_400_000, key_groups=3)
           | beam.FlatMap(lambda batch: batch)
           | CollectTo("featurized"))
    out = sorted(Collected.get("featurized"), key=lambda e: e["event_time_ms"])
    assert len(out) == len(events)
    seen: dict[str, list[str]] = {}
    for e in out:
        before = seen.setdefault(e["user_id"], [])
        assert e["history"] == before[-FEATURES.history:], e["event_id"]
        before.append(e["item_id"])


class _Cell:
    """A ReadModifyWriteState and a timer, as a DoFn sees them."""

    def __init__(self):
        self.value, self.timer = None, None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None

    def set(self, ts):
        self.timer = ts


def test_a_key_group_is_cleared_only_by_a_due_timer_of_its_newest_event():
    # The batch engine fires a fused stage's timers at its next bundle and keeps stale ones: a timer that comes
    # before the step has seen event time reach it, or that an event after it superseded, must not clear.
    from apache_beam.utils.timestamp import Timestamp

    from transforms.clean import DedupeEvents

    step, state, timer = DedupeEvents(ttl_ms=1_000), _Cell(), _Cell()
    step.setup()

    def handle(*times):
        list(step.process((0, [{"event_id": f"e{t}", "event_time_ms": BASE_MS + t} for t in times]), state, timer))

    def fire(at_ms):
        step.clear_idle_group(state, Timestamp(micros=at_ms * 1000))

    handle(0)
    assert timer.timer == Timestamp(micros=(BASE_MS + 1_000) * 1000)
    fire(BASE_MS + 1_000)  # early: the step has seen event time only up to BASE_MS
    assert state.read() is not None
    handle(500)  # the group's newest moves: its timer to BASE_MS + 1,500
    handle(2_000, 3_000)  # event time reaches past both; the group is not idle (newest BASE_MS + 3,000)
    fire(BASE_MS + 1_000)  # stale
    assert state.read() is not None
    fire(BASE_MS + 4_000)  # due (newest + ttl) but the step has not seen event time reach it
    assert state.read() is not None
    handle(4_500)
    fire(BASE_MS + 4_000)  # stale again: e4500 came after it
    assert state.read() is not None
    step._seen_ms = BASE_MS + 6_000  # (another key group's events took event time on)
    fire(BASE_MS + 5_500)  # due: the group idle since BASE_MS + 4,500
    assert state.read() is None
