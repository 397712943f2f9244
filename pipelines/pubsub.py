"""Pub/Sub in production shape: Avro messages in, scored-output, delta and dead-letter topics out.

The messages' data and attributes are ``schemas.messages``; these are the Beam transforms over them.
"""

from __future__ import annotations

import time

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


class PublishRecords(beam.PTransform):
    """Records of ``schema_name`` -> Avro messages with fingerprint/shard/version/sequence attributes."""

    def __init__(self, topic: str, schema_name: str):
        super().__init__()
        self.topic, self.schema_name = topic, schema_name

    def expand(self, records):
        name = self.schema_name
        return (
            records
            | "EncodeAvroMessages" >> beam.Map(
                lambda r: PubsubMessage(schemas.encode(name, r), output_attributes(name, r)))
            | "WriteToPubSub" >> WriteToPubSub(self.topic, with_attributes=True)
        )


def now_ms() -> int:
    return int(time.time() * 1000)
