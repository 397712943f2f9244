"""``UpdateShardModel`` (pipelines/flink_update.py) driven without Flink: keyed state, event-time timers and a
checkpoint as plain dicts, so that a restore can be placed exactly where a test wants it.

Run with .venv-flink's Python (``python -m tests.flink_fakes``, by tests/test_flink_job.py): it feeds one
time-ordered stream to two shards, shard 1 going quiet a third of the way in, with the watermark lagging the
events. It takes a checkpoint once every event is in, then ends the input twice: on the same operator (an
uninterrupted run), and on new ones restored from the checkpoint, with no event after the restore (timers
of one timestamp fire in no set order in Flink: one restored run fires the quiet shard's first). It prints,
as JSON, the epochs of the sync publications each run has at the end, per shard, with micro-batches cut in
arrival order and in event-time order. ``python -m tests.flink_fakes batches`` prints the micro-batches of
``batches_from_two_bursty_inputs`` instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from model.hashing import shard_of
from model.sync import SyncConfig, parse_name
from pipelines.flink_io import END_OF_TIME
from pipelines.flink_update import UpdateShardModel
from tests.helpers import BASE_MS, cfg, topic_stream


class _Keyed:
    """State and timers of one operator: ``{(name, key): value}`` and ``{(timestamp, key)}``."""

    def __init__(self, store: dict | None = None, timers: set | None = None):
        self.store, self.timers, self.key, self.watermark = store or {}, timers or set(), None, -(2**63)


class _Value:
    def __init__(self, keyed: _Keyed, name: str):
        self.keyed, self.name = keyed, name

    def value(self) -> Any:
        return self.keyed.store.get((self.name, self.keyed.key))

    def update(self, value: Any) -> None:
        self.keyed.store[(self.name, self.keyed.key)] = value

    def clear(self) -> None:
        self.keyed.store.pop((self.name, self.keyed.key), None)


class _List(_Value):
    def get(self) -> list:
        return list(self.value() or [])

    def add(self, value: Any) -> None:
        self.update(self.get() + [value])


class _Metric:
    def add_group(self, _name: str) -> _Metric:
        return self

    def counter(self, _name: str) -> _Metric:
        return self

    def distribution(self, _name: str) -> _Metric:
        return self

    def gauge(self, _name: str, _fn: Any) -> None:
        return None

    def inc(self, _n: int = 1) -> None:
        return None

    def update(self, _value: int) -> None:
        return None


class _RuntimeContext:
    def __init__(self, keyed: _Keyed):
        self.keyed = keyed

    def get_state(self, desc) -> _Value:
        return _Value(self.keyed, desc.name)

    def get_list_state(self, desc) -> _List:
        return _List(self.keyed, desc.name)

    def get_metrics_group(self) -> _Metric:
        return _Metric()


class _Context:
    """What ``process_element`` and ``on_timer`` are given: the current key, timestamp and timer service."""

    def __init__(self, keyed: _Keyed, timestamp: int):
        self.keyed, self._timestamp = keyed, timestamp

    def get_current_key(self) -> Any:
        return self.keyed.key

    def timestamp(self) -> int:
        return self._timestamp

    def timer_service(self) -> _Context:
        return self

    def current_watermark(self) -> int:
        return self.keyed.watermark

    def register_event_time_timer(self, t: int) -> None:
        self.keyed.timers.add((t, self.keyed.key))

    def register_processing_time_timer(self, _t: int) -> None:
        raise AssertionError("no processing-time timers in these runs")

    def time_domain(self) -> Any:
        from pyflink.datastream import TimeDomain
        return TimeDomain.EVENT_TIME


def open_operator(op: UpdateShardModel, keyed: _Keyed) -> UpdateShardModel:
    op.open(_RuntimeContext(keyed))
    return op


def element(op: UpdateShardModel, keyed: _Keyed, key: Any, event: dict) -> list:
    keyed.key = key
    return list(op.process_element(event, _Context(keyed, event["event_time_ms"])))


def advance(op: UpdateShardModel, keyed: _Keyed, watermark: int, keys_down: bool = False) -> list:
    """The watermark moves to ``watermark``: due timers fire in timestamp order (those set on the way,
    at or below it, too), timers of one timestamp by key, or (``keys_down``) by key from the highest."""
    keyed.watermark, out = watermark, []
    order = (lambda t: (t[0], -t[1])) if keys_down else None
    while due := sorted((t for t in keyed.timers if t[0] <= watermark), key=order):
        keyed.timers.discard(due[0])
        keyed.key = due[0][1]
        out += list(op.on_timer(due[0][0], _Context(keyed, due[0][0])) or [])
    return out


def publications(location: str) -> dict[int, list[int]]:
    """The epochs each shard published on the folder medium."""
    out: dict[int, list[int]] = {}
    for name in os.listdir(location):
        parsed = parse_name(name)
        if parsed is not None:
            out.setdefault(parsed[1], []).append(parsed[0])
    return {s: sorted(e) for s, e in sorted(out.items())}


def restore_after_the_last_event(work: str, events: int = 120, lag_ms: int = 25_000, ordered: bool = False) -> dict[str, Any]:
    sync, shards = SyncConfig(shards=2, interval_ms=10_000, keep_ms=0), 2
    stream = topic_stream(events, users=12)
    quiet_after = stream[len(stream) // 3]["event_time_ms"]
    stream = [e for e in stream if shard_of(e["user_id"], shards) == 0 or e["event_time_ms"] <= quiet_after]
    location = os.path.join(work, "sync-a")
    os.makedirs(location)
    make = lambda loc: UpdateShardModel(cfg(negatives=1), 4, 3, 2, sync=sync, sync_location=loc,  # noqa: E731
                                        ordered=ordered, order_window=32)
    keyed = _Keyed()
    op = open_operator(make(location), keyed)
    for e in stream:
        element(op, keyed, shard_of(e["user_id"], shards), e)
        advance(op, keyed, e["event_time_ms"] - lag_ms)
    # the checkpoint: keyed state, timers and the sync folder as they are now
    saved = copy.deepcopy((keyed.store, keyed.timers, keyed.watermark))
    shutil.copytree(location, os.path.join(work, "sync-b"))
    shutil.copytree(location, os.path.join(work, "sync-c"))
    advance(op, keyed, END_OF_TIME)  # uninterrupted: the input ends
    out = {"newest_epoch": sync.epoch_of(stream[-1]["event_time_ms"]), "quiet_after_epoch": sync.epoch_of(quiet_after),
           "uninterrupted": publications(location)}
    # restored with every event in, so the input ends at once; the quiet shard's timers last, then first
    for run, keys_down in (("restored", False), ("restored_quiet_first", True)):
        restored = _Keyed(*copy.deepcopy(saved[:2]))
        restored.watermark = saved[2]
        folder = os.path.join(work, "sync-c" if keys_down else "sync-b")
        advance(open_operator(make(folder), restored), restored, END_OF_TIME, keys_down)
        out[run] = publications(folder)
    return out


def chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def record_batches(op: UpdateShardModel) -> dict[int, list[list[str]]]:
    """The event ids of each micro-batch ``op`` learns from now on, per shard (its ``_flush_batch`` calls)."""
    seen: dict[int, list[list[str]]] = {}
    flush_batch = op._flush_batch

    def recorded(shard: int, events: list, meta: dict):
        seen.setdefault(shard, []).append([e["event_id"] for e in events])
        return flush_batch(shard, events, meta)

    op._flush_batch = recorded  # type: ignore[method-assign]
    return seen


def batches_from_two_bursty_inputs(ordered: bool, watermark: bool = True, batch: int = 4, burst: int = 10,
                                   events: int = 120) -> dict[str, Any]:
    """The events of one time-ordered stream reach the step from two upstream subtasks (odd and even positions),
    in bursts of ``burst`` from each in turn, as a keyed step at parallelism 2 receives them; the watermark is
    the older of the two inputs' newest event times (or, not ``watermark``, it stays put until the end). Half-way,
    a checkpoint; the rest is fed twice: on the same operator and on one restored from the checkpoint. The event
    ids of each micro-batch (``_flush_batch``), per shard, of both runs, what time order would make of them
    (``expected``), and the most events a shard held at once."""
    shards, stream = 2, topic_stream(events, users=12)
    sides = (stream[0::2], stream[1::2])
    arrival = [e for i in range(0, len(sides[0]), burst) for side in sides for e in side[i:i + burst]]
    newest, held = {0: -(2**63), 1: -(2**63)}, [0]

    def feed(op: UpdateShardModel, keyed: _Keyed, part: list) -> None:
        for e in part:
            newest[int(e["event_id"][1:]) % 2] = e["event_time_ms"]
            element(op, keyed, shard_of(e["user_id"], shards), e)
            held[0] = max(held[0], len(keyed.store.get(("buffer", keyed.key)) or []))
            if watermark:
                advance(op, keyed, min(newest.values()))

    def run(keyed: _Keyed, part: list) -> tuple[UpdateShardModel, dict[int, list[list[str]]]]:
        op = open_operator(UpdateShardModel(cfg(negatives=1), batch, 3, 2, ordered=ordered, order_window=8 * batch), keyed)
        seen = record_batches(op)
        feed(op, keyed, part)
        return op, seen

    half, keyed = len(arrival) // 2, _Keyed()
    op, first = run(keyed, arrival[:half])
    saved, seen_then = copy.deepcopy((keyed.store, keyed.timers, keyed.watermark, dict(newest))), copy.deepcopy(first)
    feed(op, keyed, arrival[half:])
    advance(op, keyed, END_OF_TIME)
    restored = _Keyed(*copy.deepcopy(saved[:2]))
    restored.watermark, newest = saved[2], dict(saved[3])
    op_after, after = run(restored, arrival[half:])
    advance(op_after, restored, END_OF_TIME)
    expected: dict[int, list[str]] = {}
    for e in stream:
        expected.setdefault(shard_of(e["user_id"], shards), []).append(e["event_id"])
    return {"uninterrupted": first, "restored": {s: seen_then.get(s, []) + after.get(s, []) for s in range(shards)},
            "expected": {s: chunks(ids, batch) for s, ids in expected.items()}, "held": held[0], "window": 8 * batch}


def batches_with_ties(batch: int = 4, events: int = 40) -> dict[str, Any]:
    """One shard, one upstream subtask, events in pairs of one timestamp (``e9`` and ``e10`` among them): the
    micro-batches cut in event-time order keep ties in the order they arrived, the input's, as the DirectRunner
    does, and what that order would make of them (``expected``)."""
    stream = [{**e, "event_time_ms": BASE_MS + (i + 1) // 2 * 1000} for i, e in enumerate(topic_stream(events, users=12))]
    keyed = _Keyed()
    op = open_operator(UpdateShardModel(cfg(negatives=1), batch, 3, 2, ordered=True, order_window=8 * batch), keyed)
    seen = record_batches(op)
    for e in stream:
        element(op, keyed, 0, e)
        advance(op, keyed, e["event_time_ms"] - 1)
    advance(op, keyed, END_OF_TIME)
    return {"batches": seen.get(0, []), "expected": chunks([e["event_id"] for e in stream], batch)}


if __name__ == "__main__":
    if sys.argv[1:] == ["batches"]:
        json.dump({"ordered": batches_from_two_bursty_inputs(True), "arrival": batches_from_two_bursty_inputs(False),
                   "no_watermark": batches_from_two_bursty_inputs(True, watermark=False),
                   "ties": batches_with_ties()}, sys.stdout)
    else:  # micro-batches cut in arrival order, then in event-time order
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp2:
            json.dump({"arrival": restore_after_the_last_event(tmp),
                       "ordered": restore_after_the_last_event(tmp2, ordered=True)}, sys.stdout)
