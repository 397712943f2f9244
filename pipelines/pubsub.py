"""Pub/Sub in production shape: Avro messages in, scored-output, delta and dead-letter topics out.

The messages' data and attributes are ``schemas.messages``; these are the Beam transforms over them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

import schemas
from core.progress import BOARD
from schemas.messages import EVENT_TIME_ATTR, FINGERPRINT_ATTR, output_attributes
from transforms.clean import DEAD_LETTER, dead_letter


class ParseEventMessages(beam.DoFn):
    """PubsubMessage -> Avro payload stamped with its event time; wrong schema or time -> dead letter."""

    STEP = "ParseEventMessages"

    def __init__(self):
        self.bad = Metrics.counter("freshrec", "dead_letter_bad_message")
        self.events_in = Metrics.counter("freshrec", "messages_in")

    def process(self, message: PubsubMessage):
        self.events_in.inc()
        attrs = message.attributes or {}
        fp = attrs.get(FINGERPRINT_ATTR)
        expected = schemas.schema_fingerprint(schemas.RAW_EVENT)
        if fp != expected:
            self.bad.inc()
            BOARD.note_read()
            BOARD.note_dead()
            yield TaggedOutput(DEAD_LETTER, dead_letter(
                message.data, f"malformed: schema fingerprint {fp!r} is not raw_event's {expected}", self.STEP))
            return
        try:
            event_ms = int(attrs[EVENT_TIME_ATTR])
        except (KeyError, ValueError):
            self.bad.inc()
            BOARD.note_read()
            BOARD.note_dead()
            yield TaggedOutput(DEAD_LETTER, dead_letter(
                message.data, f"malformed: attribute {EVENT_TIME_ATTR!r} missing or not an integer", self.STEP))
            return
        yield TimestampedValue(message.data, Timestamp(micros=event_ms * 1000))


class ReadEventsFromPubSub(beam.PTransform):
    """Messages of a subscription -> (payloads, dead letters). The event time comes from the
    ``event_time_ms`` attribute, checked here so that a bad message is dead-lettered, not fatal.

    Dataflow implements Beam's ``ReadFromPubSub`` itself; on the DirectRunner it runs as
    ``pipelines.pubsub_read`` makes it (large pulls, acknowledgement after accounting, event-time
    watermark, drain)."""

    def __init__(self, subscription: str):
        super().__init__()
        self.subscription = subscription

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "ReadEventMessages" >> ReadFromPubSub(subscription=self.subscription, with_attributes=True)
            | "ParseEventMessages" >> beam.ParDo(ParseEventMessages()).with_outputs(DEAD_LETTER, main="payloads")
        )
        return parsed.payloads, parsed[DEAD_LETTER]


MAX_REQUEST_MESSAGES = 1_000  # Pub/Sub's limit per publish request
MAX_REQUEST_BYTES = 9_000_000  # under its 10 MB limit per request
MESSAGE_OVERHEAD_BYTES = 100  # what a message's attributes and framing add to its data, at most, for the count above


def publish_batch(client: Any, topic: str, messages: Iterable[tuple[bytes, dict[str, str]]],
                  timeout_s: float = 60.0) -> int:
    """Publish ``(data, attributes)`` messages to ``topic`` in as few requests as Pub/Sub allows and wait for
    each; returns how many were published.

    It calls the generated API of ``client`` (a ``pubsub_v1.PublisherClient``: its retries and deadlines)
    with raw protobufs. ``PublisherClient.publish`` costs 50-80 us of CPU a message (a proto-plus wrapper,
    a future and its batching thread's locks); this about 6 us (10,000 messages of 200 bytes to the
    emulator), which on one core shared by the runner matters at thousands of messages a second."""
    from google.pubsub_v1.types import pubsub as types

    message, request = types.PubsubMessage.pb(), types.PublishRequest.pb()

    def send(batch: list[Any]) -> None:
        client.api.publish(request=types.PublishRequest.wrap(request(topic=topic, messages=batch)), timeout=timeout_s)

    batch: list[Any] = []
    size = n = 0
    for data, attrs in messages:
        if batch and (len(batch) >= MAX_REQUEST_MESSAGES or size + len(data) > MAX_REQUEST_BYTES):
            send(batch)
            batch, size = [], 0
        batch.append(message(data=data, attributes=attrs))
        size += len(data) + MESSAGE_OVERHEAD_BYTES
        n += 1
    if batch:
        send(batch)
    return n


class PublishAvroMessages(beam.DoFn):
    """Records of ``schema_name`` -> Avro messages on ``topic`` (``publish_batch``): a bundle's messages are
    published before it finishes, so before the runner commits it (at least once, as ``WriteToPubSub``)."""

    def __init__(self, topic: str, schema_name: str):
        self.topic, self.schema_name = topic, schema_name
        self.published = Metrics.counter("freshrec", f"published_{schema_name}")

    def setup(self):
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.PublisherClient()

    def start_bundle(self):
        self._buffer: list[tuple[bytes, dict[str, str]]] = []

    def process(self, record: dict[str, Any]):
        name = self.schema_name
        self._buffer.append((schemas.encode(name, record), output_attributes(name, record)))
        if len(self._buffer) >= MAX_REQUEST_MESSAGES:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self.published.inc(publish_batch(self._client, self.topic, self._buffer))
            self._buffer = []


class PublishRecords(beam.PTransform):
    """Records of ``schema_name`` -> Avro messages with fingerprint/shard/version/sequence attributes.

    Dataflow publishes through Beam's ``WriteToPubSub``, which it implements natively; every other runner
    through ``PublishAvroMessages`` (Beam Python's own ``WriteToPubSub`` converts each message to a
    protobuf and back and waits for the server every 100 messages: a sixth of a 2,000 events/s run)."""

    def __init__(self, topic: str, schema_name: str):
        super().__init__()
        self.topic, self.schema_name = topic, schema_name

    def expand(self, records):
        name = self.schema_name
        options = records.pipeline.options
        if "Dataflow" not in str(options.get_all_options().get("runner") if options else ""):
            return records | "PublishAvroMessages" >> beam.ParDo(PublishAvroMessages(self.topic, name))
        return (
            records
            | "EncodeAvroMessages" >> beam.Map(
                lambda r: PubsubMessage(schemas.encode(name, r), output_attributes(name, r)))
            | "WriteToPubSub" >> WriteToPubSub(self.topic, with_attributes=True)
        )


def now_ms() -> int:
    return int(time.time() * 1000)
