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
from functools import lru_cache
from typing import Any

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

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


def event_timestamp(event: dict[str, Any]) -> Timestamp:
    ts = event.get("event_time_ms")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) and abs(ts) < 2**53:
        return Timestamp(micros=int(ts) * 1000)
    return Timestamp(micros=0)  # unparsable time: validation dead-letters it


class _ReplayRestrictions(RestrictionProvider):
    """Offsets into the time-sorted event list of one replay task: (path, ColumnMapping, limit, max bytes)."""

    def initial_restriction(self, task):
        return OffsetRange(0, len(_cached_replay(*task)))

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, task, restriction):
        return restriction.size()

    def split(self, task, restriction):
        yield restriction  # one ordered reader: a replay is a single time-ordered stream


# Paced replays of this process: when each task's next chunk may start (processing time, seconds).
_PACE: dict[Any, float] = {}


class _ReplayFile(beam.DoFn):
    """Splittable reader: emits events in time order, each stamped with its event time, and holds the
    watermark ``max_out_of_orderness_ms`` behind the newest event emitted.

    With ``rate`` (events per second) it emits one second's worth of events per call, waiting until
    a second after the previous chunk began, then defers the rest of its range (a self-checkpoint the
    runner resumes as a new bundle): a paced replay, so that a streaming run's downstream keeps up and
    holds only what is in flight, not the whole input. (A delay passed to ``defer_remainder`` is not
    honoured by the DirectRunner, hence the wait in the reader.)"""

    def __init__(self, max_out_of_orderness_ms: int, rate: float | None = None):
        self.max_out_of_orderness_ms, self.rate = max_out_of_orderness_ms, rate

    def process(
        self,
        task,
        tracker=beam.DoFn.RestrictionParam(_ReplayRestrictions()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ):
        events = _cached_replay(*task)
        pos = tracker.current_restriction().start
        budget = None
        if self.rate:
            budget = max(1, int(self.rate))
            due = _PACE.get(task, 0.0)
            if due > time.time():
                time.sleep(due - time.time())
            _PACE[task] = max(due, time.time()) + budget / self.rate
        while tracker.try_claim(pos):
            event = unpack_event(events[pos])
            ts = event_timestamp(event)
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


class ReplayEvents(beam.PTransform):
    """A dataset file or folder replayed as a time-ordered event stream (mapped dicts, not yet validated)."""

    def __init__(self, path: str, mapping: ColumnMapping, limit: int | None = None, max_out_of_orderness_ms: int = 60_000,
                 rate: float | None = None, max_bytes: int = MAX_EVENT_BYTES):
        super().__init__()
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"ReplayEvents: {path!r} does not exist; set --data or ${DATA_ENV} (see README: datasets)")
        if rate is not None and rate <= 0:
            raise ValueError(f"ReplayEvents: rate must be > 0 events/s or None, got {rate}")
        self.path, self.mapping, self.limit, self.max_ooo, self.rate = path, mapping, limit, max_out_of_orderness_ms, rate
        self.max_bytes = max_bytes

    def expand(self, pbegin):
        return (
            pbegin
            | "ReplayTask" >> beam.Create([(self.path, self.mapping, self.limit, self.max_bytes)])
            | "ReadInTimeOrder" >> beam.ParDo(_ReplayFile(self.max_ooo, self.rate))
        )


class SyntheticEvents(beam.PTransform):
    def __init__(self, cfg: SyntheticConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        cfg = self.cfg
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "GenerateDriftingEvents" >> beam.FlatMap(lambda _: _in_global_window(synthetic_events(cfg)))
        )


_GLOBAL_WINDOWS = (GlobalWindow(),)


def _in_global_window(events: Iterable[dict[str, Any]]) -> Iterator[WindowedValue]:
    """Each event at its event time in the global window (where Impulse's output is), as a windowed
    value: a TimestampedValue would cost a window assignment per event (a GlobalWindow() reads a proto)."""
    for event in events:
        yield WindowedValue(event, event_timestamp(event), _GLOBAL_WINDOWS)

