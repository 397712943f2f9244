"""How the DirectRunner reads Pub/Sub here: large pulls, acknowledgement after accounting, an event-time
watermark, and a drain.

Beam Python's streaming DirectRunner reads ``ReadFromPubSub`` with one ``pull(max_messages=10, timeout=30)``
per bundle, acknowledges the messages before they are processed, and holds the watermark at the wall clock.
So it falls behind from about 40 events/s, an empty pull blocks its only worker for up to 30 s, a crash
loses what was acknowledged, and reports stamped with their events' time arrive behind the watermark.
``use_batched_pubsub_reads()`` registers ``PullInBatchesEvaluator`` in its place (through the runner's own
evaluator-override hook), for every ``ReadFromPubSub`` of the process:

* **Large pulls.** Each bundle pulls up to ``MAX_MESSAGES`` messages, and pulls again (up to ``CHUNK``,
  within ``PULL_TIMEOUT_S``) only while full pulls show a backlog: the runner has one worker thread, which
  the downstream steps wait for. "Full" is the largest pull seen so far, not ``MAX_MESSAGES``: a server
  may return less however long the backlog (the emulator returns at most 100 messages a pull, and
  stopping at its first pull capped the read at about 200 events/s). A pulling bundle starts at most every ``PULL_INTERVAL_S``: on the
  DirectRunner a bundle costs every downstream step a fixed overhead, so fewer, larger bundles keep up
  with more events. It pulls only while the run holds fewer than ``FlowControl.max_in_flight``
  unaccounted events.
* **Event time.** Each message is stamped with its ``event_time_ms`` attribute (its publish time where that
  is missing or bad: the parse step dead-letters it), and the watermark trails the newest event time by
  ``MAX_OUT_OF_ORDERNESS_S``. While the subscription is idle it advances with the wall clock from the
  newest event, so windows and flushes still fire when traffic pauses.
* **Acknowledge what is durable.** Pulls' ack ids are held, their ack deadlines extended, until every event
  the run has read is durable or dead-lettered (``core.progress.BOARD.settled``: durable means in a
  checkpoint on disk with ``--checkpoint_dir``, else applied); then all of them are acknowledged at once,
  at most every ``ACK_EVERY_S`` (``--ack_every_s``). The board counts events, not identities, so only
  "everything read" is a safe point: with several shards one may still buffer an event of an early pull
  while another has applied later ones. A pull held ``ACK_EVERY_S`` pauses the reading until the shards'
  interval flushes reach that point (at most ``FlowControl.max_wait_s``: a shard that accumulates gradients
  checkpoints only after its step, and then only the next safe point acknowledges). From ``ACK_LEAD_S`` before
  the pause until the acknowledgement the shards flush every input as it arrives
  (``core.progress.BOARD.request_flush``), so the pause lasts one pass of the last pulls through the pipeline,
  not a flush interval (0.2 s measured at 2,000 events/s; waiting for the interval flushes had raised p99
  publish -> score from 1.8 s to 2.5-3.0 s). A crash before it leaves the held pulls unacknowledged and Pub/Sub
  redelivers them: the dedupe step refuses the ids a resumed run's checkpoints list as applied
  (``model.checkpoint.remember_unacked``) and the rest are applied, so each event is applied once.
* **Drain.** Once ``DRAIN`` is set (the command line sets it on SIGTERM or SIGINT) the reader stops
  pulling, waits (at most ``FlowControl.max_wait_s``) until all it read is durable or dead-lettered,
  acknowledges it and ends: the watermark reaches the end of time, open windows fire and the run prints its totals.

Dataflow implements ``ReadFromPubSub`` itself and is not affected; Beam's portable runners (Flink) have no
Python ``ReadFromPubSub``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp

from core.progress import BOARD
from schemas.messages import EVENT_TIME_ATTR
from transforms.sources import FlowControl

DRAIN = threading.Event()  # set: every reader of this process acknowledges what is accounted for and ends
CHUNK = 2_000
MAX_MESSAGES = 1_000
PULL_TIMEOUT_S = 0.5
PULL_INTERVAL_S = 0.5  # at most one pulling bundle per interval: each bundle costs every downstream step
ACK_EXTENSION_S = 30
ACK_EVERY_S = 30.0  # --ack_every_s (use_batched_pubsub_reads)
ACK_LEAD_S = 2 * PULL_INTERVAL_S  # from this long before the pause for an acknowledgement, the shards flush at once
MAX_OUT_OF_ORDERNESS_S = 60.0  # as the file replay's
FLOW = FlowControl()


@dataclass
class _Reader:
    """What one subscription's reader keeps between bundles."""

    pending: list[tuple[float, list[str]]] = field(default_factory=list)  # (pulled at, monotonic; its ack ids)
    extended: float = field(default_factory=time.monotonic)
    newest: Timestamp | None = None  # the newest event time read
    newest_at: float = 0.0  # when it was read (wall clock)
    watermark: Timestamp = MIN_TIMESTAMP
    pulled_at: float = 0.0  # when the last pulling bundle began (monotonic)
    page: int = 1  # the most messages one pull has returned: a pull of fewer means no backlog
    drain_deadline: float | None = None

    def hold(self, ack_ids: list[str]) -> None:
        self.pending.append((time.monotonic(), ack_ids))

    def held_s(self) -> float:
        """How long the oldest held pull has waited for its acknowledgement (0: none held)."""
        return time.monotonic() - self.pending[0][0] if self.pending else 0.0

    def release(self, settled: bool, draining: bool) -> list[str]:
        """Every held ack id, once everything read is ``settled`` and the oldest was held ``ACK_EVERY_S`` (or
        the run drains); else none."""
        if not (self.pending and settled and (draining or self.held_s() >= ACK_EVERY_S)):
            return []
        done, self.pending = self.pending, []
        return [i for _, ids in done for i in ids]

    def waiting(self) -> list[str]:
        return [i for _, ids in self.pending for i in ids]

    def stamp(self, ts: Timestamp) -> None:
        if self.newest is None or ts > self.newest:
            self.newest, self.newest_at = ts, time.time()

    def advance(self, idle: bool) -> Timestamp:
        """The watermark after a pull: the newest event time less the out-of-orderness, plus the idle time."""
        if self.newest is not None:
            ahead = (time.time() - self.newest_at) if idle else 0.0
            self.watermark = max(self.watermark, self.newest + Duration.of(ahead - MAX_OUT_OF_ORDERNESS_S))
        return self.watermark


_READERS: dict[str, _Reader] = {}


def event_timestamp(attributes: dict[str, str], publish_time: Any) -> Timestamp:
    """A received message's event time: its ``event_time_ms`` attribute, else its publish time (a protobuf
    ``Timestamp``)."""
    try:
        return Timestamp(micros=int(attributes[EVENT_TIME_ATTR]) * 1000)
    except (KeyError, ValueError):
        return Timestamp(seconds=publish_time.seconds, micros=publish_time.nanos // 1000)


def _chunked(ids: list[str], n: int = 2_000) -> list[list[str]]:
    return [ids[i:i + n] for i in range(0, len(ids), n)]


def _evaluator_class() -> type:
    from apache_beam import pvalue
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.metrics import Metrics
    from apache_beam.runners.direct.transform_evaluator import (
        TransformResult,
        _PubSubReadEvaluator,
        _TransformEvaluator,
    )
    from apache_beam.transforms.window import GlobalWindows

    pulled = Metrics.counter("freshrec", "pubsub_messages_pulled")
    acked = Metrics.counter("freshrec", "pubsub_messages_acked")

    class PullInBatchesEvaluator(_PubSubReadEvaluator):
        """``ReadFromPubSub`` on the DirectRunner, as the module docstring says."""

        # subscription path by transform: Beam's resolves it (options parsed) per bundle
        _names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

        def __init__(self, evaluation_context: Any, applied_ptransform: Any, input_committed_bundle: Any,
                     side_inputs: Any) -> None:
            name = self._names.get(applied_ptransform)
            if name is None:
                super().__init__(evaluation_context, applied_ptransform, input_committed_bundle, side_inputs)
                self._names[applied_ptransform] = self._sub_name
                return
            _TransformEvaluator.__init__(self, evaluation_context, applied_ptransform, input_committed_bundle, side_inputs)
            self.source, self._sub_name = applied_ptransform.transform._source, name

        def _settle(self, client: Any, reader: _Reader) -> None:
            from google.pubsub_v1.types import pubsub as types  # raw protobufs: proto-plus lists cost ~1 us an id

            ready = reader.release(BOARD.settled(), DRAIN.is_set())
            for ids in _chunked(ready):
                request = types.AcknowledgeRequest.pb()(subscription=self._sub_name, ack_ids=ids)
                client.api.acknowledge(request=types.AcknowledgeRequest.wrap(request))
            if ready:
                BOARD.note_acked()
                acked.inc(len(ready))
            waiting = reader.waiting()
            if waiting and time.monotonic() - reader.extended > ACK_EXTENSION_S / 4:
                for ids in _chunked(waiting):
                    request = types.ModifyAckDeadlineRequest.pb()(subscription=self._sub_name, ack_ids=ids,
                                                                  ack_deadline_seconds=ACK_EXTENSION_S)
                    client.api.modify_ack_deadline(request=types.ModifyAckDeadlineRequest.wrap(request))
                reader.extended = time.monotonic()

        def _pull(self, client: Any, reader: _Reader) -> list[tuple[Timestamp, Any]]:
            from google.api_core.exceptions import DeadlineExceeded

            held = reader.held_s()
            if ACK_EVERY_S - ACK_LEAD_S <= held < ACK_EVERY_S + FLOW.max_wait_s:
                BOARD.request_flush()  # the shards flush what they get: the pause below lasts one pass, not an interval
            elif BOARD.flush_requested:
                BOARD.request_flush(False)
            if BOARD.in_flight() > FLOW.max_in_flight or time.monotonic() - reader.pulled_at < PULL_INTERVAL_S \
                    or ACK_EVERY_S <= held < ACK_EVERY_S + FLOW.max_wait_s:  # pause until all read is durable (a while)
                time.sleep(0.005)
                return []
            reader.pulled_at = time.monotonic()
            out: list[tuple[Timestamp, Any]] = []
            while len(out) < CHUNK and time.monotonic() - reader.pulled_at < PULL_TIMEOUT_S:
                try:
                    resp = client.pull(subscription=self._sub_name, max_messages=MAX_MESSAGES, timeout=PULL_TIMEOUT_S)
                except DeadlineExceeded:
                    break
                received = resp._pb.received_messages  # the raw protobuf: proto-plus wrappers cost ~10% here
                if not received:
                    break
                for rm in received:
                    msg = rm.message
                    attrs = dict(msg.attributes)
                    ts = event_timestamp(attrs, msg.publish_time)
                    reader.stamp(ts)
                    out.append((ts, PubsubMessage(msg.data, attrs, msg.message_id)))
                BOARD.note_emitted(len(received))
                reader.hold([rm.ack_id for rm in received])
                reader.page = max(reader.page, len(received))
                if len(received) < reader.page:  # no backlog: hand the runner's one worker thread back
                    break
            pulled.inc(len(out))
            return out

        def finish_bundle(self) -> TransformResult:
            client = self._get_subscriber_client(self._applied_ptransform)
            reader = _READERS.setdefault(self._sub_name, _Reader())
            self._settle(client, reader)
            data = [] if DRAIN.is_set() else self._pull(client, reader)
            bundles = []
            if data:
                bundle = self._evaluation_context.create_bundle(list(self._outputs)[0])
                for ts, message in data:
                    bundle.output(GlobalWindows.windowed_value(
                        message if self.source.with_attributes else message.data, timestamp=ts))
                bundles = [bundle]
            if DRAIN.is_set():
                if reader.drain_deadline is None:
                    reader.drain_deadline = time.monotonic() + FLOW.max_wait_s
                    BOARD.request_flush()
                if BOARD.settled() or time.monotonic() > reader.drain_deadline:
                    self._settle(client, reader)
                    _READERS.pop(self._sub_name, None)
                    return TransformResult(self, bundles, [], None, {None: MAX_TIMESTAMP})
                time.sleep(0.01)
            watermark = reader.advance(idle=not data)
            inputs = self._applied_ptransform.inputs
            source = inputs[0] if inputs else pvalue.PBegin(self._applied_ptransform.transform.pipeline)
            return TransformResult(self, bundles, [self._evaluation_context.create_bundle(source)], None,
                                   {None: watermark})

    return PullInBatchesEvaluator


def use_batched_pubsub_reads(ack_every_s: float = ACK_EVERY_S) -> None:
    """Register ``PullInBatchesEvaluator`` for the DirectRunner's Pub/Sub reads, acknowledging at most every
    ``ack_every_s``. Idempotent; per process."""
    global ACK_EVERY_S
    ACK_EVERY_S = ack_every_s
    from apache_beam.runners.direct.direct_runner import _DirectReadFromPubSub
    from apache_beam.runners.direct.transform_evaluator import TransformEvaluatorRegistry

    overrides = TransformEvaluatorRegistry._test_evaluators_overrides
    if _DirectReadFromPubSub not in overrides:
        overrides[_DirectReadFromPubSub] = _evaluator_class()
    DRAIN.clear()


def drain_on_signals() -> Callable[[], None]:
    """SIGTERM or SIGINT drains a Pub/Sub run (``pipelines.pubsub_read.DRAIN``: stop pulling, account for and
    acknowledge what was read, fire open windows, print the totals); a second SIGINT stops it at once.
    Returns what restores the previous handlers."""
    def drain(signum: int, _frame: Any) -> None:
        if DRAIN.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"freshrec: {signal.Signals(signum).name}: draining (stop pulling, finish what was read)", file=sys.stderr)
        DRAIN.set()

    previous = {s: signal.signal(s, drain) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
