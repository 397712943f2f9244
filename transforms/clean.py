"""CleanEvents: decode + validate, drop late events, dedupe by event id. Every refusal is dead-lettered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from core.cleaning import REDELIVERED, CleanConfig, InvalidEvent, LatenessTracker, dead_letter, decode_event
from core.keyed_state import GroupStates, key_group
from core.progress import BOARD
from model.hashing import shard_of
from transforms.batching import DEAD_LETTER, KeyGroupStep, batch_by, rebatch_by
from transforms.runtime import tune_worker

__all__ = ["DEAD_LETTER", "CleanEvents", "DecodeAndValidate", "DedupeEvents", "DropLateEvents", "dead_letter"]
NAMESPACE = "freshrec"


def ts_ms(ts: Timestamp) -> int:
    return int(ts.micros // 1000)


class DecodeAndValidate(beam.DoFn):
    STEP = "DecodeAndValidate"

    def __init__(self, cfg: CleanConfig = CleanConfig()):
        self.cfg = cfg
        self.events_in = Metrics.counter(NAMESPACE, "events_in")
        self.malformed = Metrics.counter(NAMESPACE, "dead_letter_malformed")

    def process(self, payload: Any) -> Iterable[Any]:
        self.events_in.inc()
        BOARD.note_read()
        try:
            event = decode_event(payload, self.cfg)
        except InvalidEvent as exc:
            self.malformed.inc()
            BOARD.note_dead()
            yield TaggedOutput(DEAD_LETTER, dead_letter(payload, f"malformed: {exc.reason}", self.STEP))
            return
        yield event


class DropLateEvents(beam.DoFn):
    """Keyed by shard, on micro-batches. Late = older than the proven watermark minus allowed lateness
    (see LatenessTracker). Main output: the on-time events of each batch as one list."""

    STEP = "DropLateEvents"
    WATERMARK = ReadModifyWriteStateSpec("watermark_ms", VarIntCoder())
    NEWEST = ReadModifyWriteStateSpec("newest_ms", VarIntCoder())
    PROBE = TimerSpec("watermark_probe", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_ms: int):
        if allowed_lateness_ms < 0:
            raise ValueError(f"{self.STEP}: allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        self.allowed_lateness_ms = allowed_lateness_ms
        self.late = Metrics.counter(NAMESPACE, "dead_letter_late")

    def setup(self):
        tune_worker()

    def process(
        self,
        element: tuple[int, list[dict[str, Any]]],
        watermark=beam.DoFn.StateParam(WATERMARK),
        newest=beam.DoFn.StateParam(NEWEST),
        probe=beam.DoFn.TimerParam(PROBE),
    ):
        _, events = element
        tracker = LatenessTracker(self.allowed_lateness_ms)
        proven = watermark.read()
        if proven is not None:
            tracker.advance(proven)
        before = newest.read()
        latest = before
        kept = []
        for event in events:
            event_ms = event["event_time_ms"]
            if tracker.is_late(event_ms):
                self.late.inc()
                BOARD.note_dead()
                reason = tracker.late_reason(event_ms)
                yield TaggedOutput(DEAD_LETTER, TimestampedValue(dead_letter(None, reason, self.STEP, event), event_ms / 1000))
                continue
            if latest is None or event_ms > latest:
                latest = event_ms
            kept.append(event)
        if kept:
            yield kept
        if latest is not None and latest != before:
            newest.write(latest)
            probe.set(Timestamp(micros=latest * 1000))

    @on_timer(PROBE)
    def on_probe(
        self,
        fired=beam.DoFn.TimestampParam,
        watermark=beam.DoFn.StateParam(WATERMARK),
        newest=beam.DoFn.StateParam(NEWEST),
        probe=beam.DoFn.TimerParam(PROBE),
    ):
        fired_ms = ts_ms(fired)
        watermark.write(max(fired_ms, watermark.read() or fired_ms))
        # Keep probing ahead (up to newest + allowed lateness) so the proof keeps up with the watermark
        # while this key is quiet; bounded, so a watermark at +inf ends the loop.
        step = max(1000, self.allowed_lateness_ms // 4)
        if fired_ms + step <= (newest.read() or fired_ms) + self.allowed_lateness_ms:
            probe.set(Timestamp(micros=(fired_ms + step) * 1000))


class DedupeEvents(KeyGroupStep):
    """Keyed by key group of the event id, on micro-batches; remembers an id for ``ttl_ms`` of event time
    after its event (see ``GroupStates.sweep``). ``applied_before``: ids a resumed run's checkpoints hold as
    applied (``model.checkpoint.unacked_event_ids``), refused when Pub/Sub redelivers them."""

    STEP = "DedupeEvents"

    def __init__(self, ttl_ms: int, applied_before: frozenset[str] = frozenset()):
        super().__init__(ttl_ms)
        self.applied_before = applied_before
        self.duplicates = Metrics.counter(NAMESPACE, "dead_letter_duplicate")

    def handle_batch(self, group, events, dead):
        seen, before, ttl_ms = GroupStates.seen, self.applied_before, self.ttl_ms
        kept = []
        for event in events:
            duplicate = seen(group, event["event_id"], event["event_time_ms"], ttl_ms)
            if duplicate or event["event_id"] in before:
                self.duplicates.inc()
                BOARD.note_dead()
                reason = "duplicate event_id" if duplicate else REDELIVERED
                dead.append(dead_letter(None, reason, self.STEP, event))
                continue
            kept.append(event)
        return kept


class CleanEvents(beam.PTransform):
    """Raw payloads -> valid, on-time, unique events (main output, as micro-batches: lists of events)
    + dead letters (``DEAD_LETTER``, one record each) + ``arrivals``: the decoded events one by one, in the order
    they arrived (before the late and duplicate ones are refused). ``applied_before``: see ``DedupeEvents``."""

    def __init__(self, shards: int, allowed_lateness_ms: int, dedupe_ttl_ms: int, cfg: CleanConfig = CleanConfig(),
                 key_groups: int = 1024, applied_before: frozenset[str] = frozenset()):
        super().__init__()
        self.shards, self.allowed_lateness_ms, self.dedupe_ttl_ms, self.cfg = shards, allowed_lateness_ms, dedupe_ttl_ms, cfg
        self.key_groups, self.applied_before = key_groups, applied_before

    def expand(self, payloads):
        decoded = payloads | "DecodeAndValidate" >> beam.ParDo(DecodeAndValidate(self.cfg)).with_outputs(
            DEAD_LETTER, main="events")
        shards, groups = self.shards, self.key_groups
        on_time = (
            decoded.events
            | "BatchByShard" >> batch_by(lambda e: shard_of(e["user_id"], shards), "BatchByShard")
            | "DropLateEvents" >> beam.ParDo(DropLateEvents(self.allowed_lateness_ms)).with_outputs(
                DEAD_LETTER, main="events")
        )
        unique = (
            on_time.events
            | "BatchByEventIdGroup" >> rebatch_by(lambda e: key_group(e["event_id"], groups), "BatchByEventIdGroup")
            | "DedupeEvents" >> beam.ParDo(DedupeEvents(self.dedupe_ttl_ms, self.applied_before)).with_outputs(DEAD_LETTER, main="events")
        )
        dead = (decoded[DEAD_LETTER], on_time[DEAD_LETTER], unique[DEAD_LETTER]) | "FlattenCleanDeadLetters" >> beam.Flatten()
        return {"events": unique.events, DEAD_LETTER: dead, "arrivals": decoded.events}
