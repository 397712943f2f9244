"""Event sources: a time-ordered file replay (with column mappings) and a synthetic drifting stream.

The readers are plain generators (runner-free); ``ReplayEvents`` and ``SyntheticEvents`` wrap them
as Beam sources. The replay source is a splittable DoFn that stamps each event with its event time
and advances the watermark as it goes (bounded out-of-orderness), like a real stream would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from core.progress import BOARD
from core.readers import (
    DATA_ENV,
    ColumnMapping,
    SyntheticConfig,
    read_replay_packed,
    synthetic_events,
    unpack_event,
)
from core.records import MAX_EVENT_BYTES


@lru_cache(maxsize=2)
def _cached_replay(path: str, mapping: ColumnMapping, limit: int | None, max_bytes: int = MAX_EVENT_BYTES) -> list[bytes]:
    return read_replay_packed(path, mapping, limit, max_bytes)


# A task is ("replay", path, ColumnMapping, limit, max bytes) or ("synthetic", SyntheticConfig).
# Synthetic streams of this process, by config: (position of the next event, the generator), so that a
# reader resumed at its last position continues the generator instead of replaying it from the start.
_SYNTHETIC: dict[SyntheticConfig, tuple[int, Iterator[dict[str, Any]]]] = {}


def _task_size(task: tuple) -> int:
    return task[1].events if task[0] == "synthetic" else len(_cached_replay(*task[1:]))


def _task_events(task: tuple, start: int) -> Iterator[dict[str, Any]]:
    """The task's events from position ``start`` on."""
    if task[0] == "replay":
        events = _cached_replay(*task[1:])
        return (unpack_event(events[i]) for i in range(start, len(events)))
    cfg = task[1]
    pos, gen = _SYNTHETIC.pop(cfg, (0, None))
    if gen is None or pos > start:
        pos, gen = 0, synthetic_events(cfg)
    for _ in range(start - pos):
        next(gen)
    return _SyntheticCursor(cfg, start, gen)


class _SyntheticCursor:
    """A synthetic generator that remembers, when the reader stops, where it stopped."""

    def __init__(self, cfg: SyntheticConfig, pos: int, gen: Iterator[dict[str, Any]]):
        self.cfg, self.pos, self.gen = cfg, pos, gen

    def __iter__(self) -> _SyntheticCursor:
        return self

    def __next__(self) -> dict[str, Any]:
        event = next(self.gen)
        self.pos += 1
        _SYNTHETIC[self.cfg] = (self.pos, self.gen)
        return event


def event_timestamp(event: dict[str, Any], fallback: Timestamp | None = None) -> Timestamp:
    """The event's time; where it has none that parses (validation dead-letters it), ``fallback`` (the time of
    the event before it, so that it is counted in the window it arrived in), else 0."""
    ts = event.get("event_time_ms")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) and abs(ts) < 2**53:
        return Timestamp(micros=int(ts) * 1000)
    return fallback if fallback is not None else Timestamp(micros=0)


class _Restrictions(RestrictionProvider):
    """Offsets into the time-ordered events of one task."""

    def initial_restriction(self, task):
        return OffsetRange(0, _task_size(task))

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, task, restriction):
        return restriction.size()

    def split(self, task, restriction):
        yield restriction  # one ordered reader: a replay is a single time-ordered stream


# Paced replays of this process: when each task's next chunk may start (processing time, seconds).
_PACE: dict[Any, float] = {}


@dataclass(frozen=True)
class FlowControl:
    """A streaming run on one process (the DirectRunner) reads ``chunk`` events at a time and waits, at
    most ``max_wait_s``, while more than ``max_in_flight`` events it read are neither applied nor
    dead-lettered (``core.progress.BOARD``): what the run holds stays bounded, whatever the input's size."""

    chunk: int = 2_000
    max_in_flight: int = 10_000
    max_wait_s: float = 5.0

    def wait(self) -> None:
        deadline = time.monotonic() + self.max_wait_s
        while BOARD.in_flight() > self.max_in_flight and time.monotonic() < deadline:
            time.sleep(0.005)


class _ReadInTimeOrder(beam.DoFn):
    """Splittable reader: emits a task's events in time order, each stamped with its event time, and holds
    the watermark ``max_out_of_orderness_ms`` behind the newest event emitted.

    With ``rate`` (events per second) it emits one second's worth of events per call, waiting until
    a second after the previous chunk began, then defers the rest of its range (a self-checkpoint the
    runner resumes as a new bundle): a paced replay, so that a streaming run's downstream keeps up and
    holds only what is in flight, not the whole input. (A delay passed to ``defer_remainder`` is not
    honoured by the DirectRunner, hence the wait in the reader.) With ``flow`` (``FlowControl``) it emits
    ``flow.chunk`` events per call, once the run has caught up with what it read before."""

    def __init__(self, max_out_of_orderness_ms: int, rate: float | None = None, flow: FlowControl | None = None):
        self.max_out_of_orderness_ms, self.rate, self.flow = max_out_of_orderness_ms, rate, flow

    def process(
        self,
        task,
        tracker=beam.DoFn.RestrictionParam(_Restrictions()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ):
        pos = tracker.current_restriction().start
        budget = None
        if self.rate:
            budget = max(1, int(self.rate))
            due = _PACE.get(task, 0.0)
            if due > time.time():
                time.sleep(due - time.time())
            _PACE[task] = max(due, time.time()) + budget / self.rate
        if self.flow is not None:
            self.flow.wait()
            budget = min(budget or self.flow.chunk, self.flow.chunk)
        events, start = _task_events(task, pos), pos
        ts = watermark.current_watermark()
        ts = None if ts is None or ts < Timestamp(0) else ts + self.max_out_of_orderness_ms / 1000.0
        try:
            while tracker.try_claim(pos):
                event = next(events)
                event["seq"] = pos  # its position in the time-ordered input: breaks ties in event time downstream
                ts = event_timestamp(event, ts)
                yield TimestampedValue(event, ts)
                held = ts - self.max_out_of_orderness_ms / 1000.0
                current = watermark.current_watermark()
                if current is None or held > current:
                    watermark.set_watermark(held)
                pos += 1
                if budget is not None:
                    budget -= 1
                    if budget == 0:
                        tracker.defer_remainder()
                        return
        finally:  # once per call, not per event: flow control reads it before the next call
            BOARD.note_emitted(pos - start)


class ReplayEvents(beam.PTransform):
    """A dataset file or folder replayed as a time-ordered event stream (mapped dicts, not yet validated)."""

    def __init__(self, path: str, mapping: ColumnMapping, limit: int | None = None, max_out_of_orderness_ms: int = 60_000,
                 rate: float | None = None, max_bytes: int = MAX_EVENT_BYTES, flow: FlowControl | None = None):
        super().__init__()
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"ReplayEvents: {path!r} does not exist; set --data or ${DATA_ENV} (see README: datasets)")
        if rate is not None and rate <= 0:
            raise ValueError(f"ReplayEvents: rate must be > 0 events/s or None, got {rate}")
        self.path, self.mapping, self.limit, self.max_ooo, self.rate = path, mapping, limit, max_out_of_orderness_ms, rate
        self.max_bytes, self.flow = max_bytes, flow

    def expand(self, pbegin):
        return (
            pbegin
            | "ReplayTask" >> beam.Create([("replay", self.path, self.mapping, self.limit, self.max_bytes)])
            | "ReadInTimeOrder" >> beam.ParDo(_ReadInTimeOrder(self.max_ooo, self.rate, self.flow))
        )


class SyntheticEvents(beam.PTransform):
    """The synthetic drifting stream (``core.readers.synthetic_events``), generated as it is read. Bounded
    (no ``flow``): one bundle, in the global window, as fast as it generates. With ``flow``: in chunks, as a
    streaming run on one process catches up (``FlowControl``)."""

    def __init__(self, cfg: SyntheticConfig, flow: FlowControl | None = None, max_out_of_orderness_ms: int = 60_000):
        super().__init__()
        self.cfg, self.flow, self.max_ooo = cfg, flow, max_out_of_orderness_ms

    def expand(self, pbegin):
        cfg = self.cfg
        if self.flow is not None:
            return (
                pbegin
                | "SyntheticTask" >> beam.Create([("synthetic", cfg)])
                | "GenerateInTimeOrder" >> beam.ParDo(_ReadInTimeOrder(self.max_ooo, None, self.flow))
            )
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "GenerateDriftingEvents" >> beam.FlatMap(lambda _: _in_global_window(synthetic_events(cfg)))
        )


_GLOBAL_WINDOWS = (GlobalWindow(),)


def _in_global_window(events: Iterable[dict[str, Any]]) -> Iterator[WindowedValue]:
    """Each event at its event time in the global window (where Impulse's output is), as a windowed
    value: a TimestampedValue would cost a window assignment per event (a GlobalWindow() reads a proto)."""
    ts = None
    for event in events:
        ts = event_timestamp(event, ts)
        yield WindowedValue(event, ts, _GLOBAL_WINDOWS)
