"""Micro-batches and key groups: how the keyed steps keep Beam's per-element cost off the hot path.

A keyed stateful step costs the runner a state fetch, a commit and a timer per key it touches. On
the DirectRunner that is ~130 us per event for a step keyed by a unique id (measured), more than
the whole model update. So the keyed steps here are keyed by a *key group* (a stable hash of the
id modulo ``groups``, as Flink's key groups) and receive micro-batches ``(group, [events])``:

* ``BatchByKey`` collects a bundle's events into one list per key (bundle-scoped and stateless,
  like ``beam.BatchElements``: no timers, no added latency beyond the bundle the runner chose);
  ``RebatchByKey`` does the same from micro-batches: the keyed steps emit their kept events as one
  list per input batch, so events move between steps as lists and Beam's per-element work (an output
  receiver call and a DoFn invocation per event per step) is paid per batch;
* ``KeyGroupStep`` keeps a group's per-id states (``core.keyed_state.GroupStates``, runner-free, with
  an event-time TTL) in Beam state, marshalled (Beam's state cache weighs what it holds by walking
  it, bytes in O(1)), and a watermark timer per group clears a group whose ids have all gone idle.

More groups = smaller state values per commit (streaming runners commit every bundle); fewer =
fewer keys per event (the DirectRunner). ``--key_groups`` sets it.
"""

from __future__ import annotations

import marshal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders.coders import BytesCoder
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from core.keyed_state import GroupStates, in_time_order
from transforms.runtime import tune_worker

DEAD_LETTER = "dead_letter"


class BatchByKey(beam.DoFn):
    """events -> (key, [events]) per bundle and window (and at most ``max_size`` events per batch, if set).

    A batch carries the earliest timestamp of its events, so it never runs ahead of the watermark
    hold of any event in it. Within a batch events keep their arrival order; the keyed steps sort
    each batch by event time (``in_time_order``). Arrival order is not time order once a stream has
    been re-keyed: a runner hands a keyed step its input key by key, so the next key's events
    interleave in time. With no size cap a bundle gives each key one batch, so sorting it restores
    time order exactly for a bounded (one-bundle) run, and a streaming run's small bundles follow
    the stream."""

    def __init__(self, key_fn: Callable[[dict[str, Any]], Any], max_size: int | None = None, step: str = "BatchByKey"):
        if max_size is not None and max_size < 1:
            raise ValueError(f"{step}: max_size must be >= 1 or None, got {max_size}")
        self.key_fn, self.max_size, self.step = key_fn, max_size, step

    def start_bundle(self) -> None:
        self._batches: dict[tuple[Any, Any], tuple[list[dict[str, Any]], int]] = {}

    def process(self, event: dict[str, Any], windowed=beam.DoFn.WindowedValueParam):
        # The windowed value, not WindowParam + TimestampParam: with those Beam rebuilds the call's
        # arguments for every element (its per-window invoker), which cost more than the batching itself.
        return self._collect((event,), windowed)

    def _collect(self, events: Iterable[dict[str, Any]], windowed: WindowedValue) -> Iterator[WindowedValue]:
        """Add ``events`` (all in ``windowed``'s window, at its timestamp) to their keys' batches;
        yields the batches that reach ``max_size``."""
        windows = windowed.windows
        if len(windows) != 1:
            raise ValueError(f"{self.step}: expected each element in one window (global or fixed windows), "
                             f"got one in {len(windows)} windows")
        window, micros = windows[0], windowed.timestamp.micros
        key_fn, batches, cap = self.key_fn, self._batches, self.max_size
        for event in events:
            key = key_fn(event)
            slot = (key, window)
            held = batches.get(slot)
            if held is None:
                batches[slot] = held = ([], micros)
            elif micros < held[1]:
                batches[slot] = held = (held[0], micros)
            held[0].append(event)
            if cap is not None and len(held[0]) >= cap:
                del batches[slot]
                yield WindowedValue((key, held[0]), Timestamp(micros=held[1]), windows)

    def finish_bundle(self) -> Iterable[WindowedValue]:
        batches, self._batches = self._batches, {}
        for (key, window), (events, micros) in batches.items():
            yield WindowedValue((key, events), Timestamp(micros=micros), [window])


class RebatchByKey(BatchByKey):
    """``BatchByKey`` over micro-batches: lists of events (a keyed step's output) -> (key, [events]) per
    bundle and window. A new batch carries the earliest timestamp of the batches its events came from.

    With ``tick_keys`` (keys 0 .. tick_keys - 1) and ``tick_every_ms``, a bundle whose newest element
    reaches a later multiple of ``tick_every_ms`` of event time than the last one ticked here also sends
    every key it holds no batch for an empty one, stamped with that newest time: a tick that tells an idle
    key how far event time got (the shards' sync epochs, ``UpdateShardModel``)."""

    def __init__(self, key_fn: Callable[[dict[str, Any]], Any], max_size: int | None = None, step: str = "RebatchByKey",
                 tick_keys: int = 0, tick_every_ms: int = 0):
        super().__init__(key_fn, max_size, step)
        self.tick_keys, self.tick_every_ms = tick_keys, tick_every_ms

    def setup(self) -> None:
        self._ticked: dict[Any, int] = {}  # window -> the last tick's multiple of tick_every_ms

    def start_bundle(self) -> None:
        super().start_bundle()
        self._newest: dict[Any, int] = {}  # window -> newest element timestamp of the bundle (micros)

    def process(self, batch: list[dict[str, Any]], windowed=beam.DoFn.WindowedValueParam):
        if not isinstance(batch, list):
            raise TypeError(f"{self.step}: expected a micro-batch (a list of events), got {type(batch).__name__}")
        if self.tick_keys and len(windowed.windows) == 1:
            window = windowed.windows[0]
            self._newest[window] = max(self._newest.get(window, windowed.timestamp.micros), windowed.timestamp.micros)
        return self._collect(batch, windowed)

    def finish_bundle(self) -> Iterable[WindowedValue]:
        held = {(key, window) for key, window in self._batches}
        yield from super().finish_bundle()
        for window, micros in self._newest.items():
            mark = micros // 1000 // self.tick_every_ms
            if mark <= self._ticked.get(window, -(2**62)):
                continue
            self._ticked[window] = mark
            for key in range(self.tick_keys):
                if (key, window) not in held:
                    yield WindowedValue((key, []), Timestamp(micros=micros), [window])


def batch_by(key_fn: Callable[[dict[str, Any]], int], step: str = "BatchByKey") -> beam.ParDo:
    """``BatchByKey`` with an int key (a shard or key group), typed so the runner picks a deterministic key coder."""
    return beam.ParDo(BatchByKey(key_fn, step=step)).with_output_types(tuple[int, list[Any]])


def rebatch_by(key_fn: Callable[[dict[str, Any]], int], step: str = "RebatchByKey", tick_keys: int = 0,
               tick_every_ms: int = 0) -> beam.ParDo:
    """``RebatchByKey`` with an int key, typed as ``batch_by``."""
    return beam.ParDo(RebatchByKey(key_fn, None, step, tick_keys, tick_every_ms)).with_output_types(tuple[int, list[Any]])


class KeyGroupStep(beam.DoFn):
    """Base of the steps keyed by key group: reads the group's ``GroupStates``, lets ``handle_batch``
    handle the micro-batch in event-time order, sweeps idle ids, writes the group back, and keeps one watermark
    timer per group that clears it once all its ids are idle. The timer clears only a group that is idle in
    the event time this step has seen: the batch engine (Beam's ``FnApiRunner``) fires a fused stage's
    event-time timers at its next bundle (the stage's input watermark is its source's, already at the end),
    and keeps a timer set again in a later bundle as well as the first; there an early or stale timer
    cleared dedupe ids and feature state after every bundle. A refused timer is not set again: the group's
    next event sets the next one, and until then its state (swept at each touch) stays.

    Main output: the kept events of each input batch as one list (none when all were refused), with the
    input batch's timestamp; refused events go to ``DEAD_LETTER`` one by one, each at its event time."""

    STEP = "KeyGroupStep"
    # The group is kept marshalled: Beam's state cache weighs every value it holds by walking it
    # (objsize), which for a group of dicts of buckets cost more than marshalling it; bytes weigh in O(1).
    GROUP_STATES = ReadModifyWriteStateSpec("group_states", BytesCoder())
    GROUP_IDLE = TimerSpec("group_idle", TimeDomain.WATERMARK)

    def __init__(self, ttl_ms: int):
        if ttl_ms <= 0:
            raise ValueError(f"{self.STEP}: ttl_ms must be > 0, got {ttl_ms}")
        self.ttl_ms = ttl_ms

    def setup(self):
        tune_worker()
        self._seen_ms = -(1 << 62)  # the newest event time this step has handled, any key

    def handle_batch(self, group: dict[str, Any], events: list[dict[str, Any]],
                     dead: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events to pass on (in time order); refused ones go into ``dead`` as dead-letter records."""
        raise NotImplementedError

    def process(self, element: tuple[int, list[dict[str, Any]]], state=beam.DoFn.StateParam(GROUP_STATES),
                idle=beam.DoFn.TimerParam(GROUP_IDLE)):
        events = in_time_order(element[1])
        if events:
            self._seen_ms = max(self._seen_ms, int(events[-1]["event_time_ms"]))
        stored = state.read()
        group = marshal.loads(stored) if stored else GroupStates.new()
        newest_before = group["newest"]
        dead: list[dict[str, Any]] = []
        kept = self.handle_batch(group, events, dead)
        for record in dead:
            yield TaggedOutput(DEAD_LETTER, TimestampedValue(record, record["event_time_ms"] / 1000))
        if kept:
            yield kept
        GroupStates.sweep(group, self.ttl_ms)
        state.write(marshal.dumps(group))
        if group["newest"] is not None and group["newest"] != newest_before:
            idle.set(Timestamp(micros=(group["newest"] + self.ttl_ms) * 1000))

    @on_timer(GROUP_IDLE)
    def clear_idle_group(self, state=beam.DoFn.StateParam(GROUP_STATES), fire=beam.DoFn.TimestampParam):
        fire_ms = fire.micros // 1000
        if fire_ms > self._seen_ms:  # fired before this step saw event time reach it (see the class docstring)
            return
        stored = state.read()
        newest = marshal.loads(stored)["newest"] if stored else None
        if newest is None or newest + self.ttl_ms <= fire_ms:  # not a stale timer: the group is idle
            state.clear()
