"""Replay a dataset into a Pub/Sub events topic at a chosen rate, like production traffic.

    python -m pipelines.publisher --topic projects/P/topics/events --data ../shared/datasets/movielens-100k --rate 200

Each message is a schemaless-Avro raw event (``schemas/raw_event.avsc``) with attributes
``schema_fingerprint`` and ``event_time_ms``. ``--retime`` (default on) shifts event times so the
first event is "now" while keeping the gaps between events divided by ``--speedup``: the stream is
then on time for a pipeline whose watermark follows the wall clock. Rows that do not fit the
schema are published as JSON bytes without a fingerprint, so the pipeline dead-letters them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from core.cleaning import InvalidEvent, validate_event
from core.layout import LayoutError
from core.readers import DATA_ENV, read_replay
from core.settings import HelpFormatter, add_flags, input_layout
from schemas.messages import event_message


def prepare(records: Iterable[dict[str, Any]], retime: bool, speedup: float, start_ms: int) -> Iterable[tuple[bytes, dict[str, str]]]:
    first: int | None = None
    for rec in records:
        try:
            event = validate_event(rec)
        except InvalidEvent:
            yield json.dumps(rec, default=str).encode(), {}
            continue
        if retime:
            first = event["event_time_ms"] if first is None else first
            event["event_time_ms"] = start_ms + int((event["event_time_ms"] - first) / speedup)
        yield event_message(event)


PUBLISH_TICK_S = 0.01  # a throttled publisher sends what is due at most this often, in one request


def publish(topic: str, messages: Iterable[tuple[bytes, dict[str, str]]], rate: float, publisher: Any = None) -> int:
    """Publish at ``rate`` messages/s (0 = as fast as possible); returns the count published. Messages due
    within ``PUBLISH_TICK_S`` of each other go in one request (``pipelines.pubsub.publish_batch``), and each
    is taken from ``messages`` when it is due, so a stamp made there is its publication time (to a tick)."""
    from google.cloud import pubsub_v1

    from pipelines.pubsub import MAX_REQUEST_MESSAGES, publish_batch

    client = publisher or pubsub_v1.PublisherClient()
    batch: list[tuple[bytes, dict[str, str]]] = []
    published = 0
    for message in _when_due(messages, rate, time.monotonic()):
        if message is None:  # the next one is not due yet
            published += publish_batch(client, topic, batch)
            batch = []
            continue
        batch.append(message)
        if len(batch) >= MAX_REQUEST_MESSAGES:
            published += publish_batch(client, topic, batch)
            batch = []
    return published + publish_batch(client, topic, batch)


def _when_due(messages: Iterable[tuple[bytes, dict[str, str]]], rate: float, started: float
              ) -> Iterable[tuple[bytes, dict[str, str]] | None]:
    """``messages``, each taken when it is due at ``rate``; None (then a sleep) before one that is not due yet."""
    it = iter(messages)
    n = 0
    while True:
        if rate > 0:
            wait = n / rate - (time.monotonic() - started)
            if wait > 0:
                yield None
                time.sleep(max(wait, PUBLISH_TICK_S))
        try:
            message = next(it)
        except StopIteration:
            return
        n += 1
        yield message


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--topic", required=True, help="projects/PROJECT/topics/TOPIC")
    ap.add_argument("--rate", type=float, default=100.0, help="messages per second (0 = unthrottled)")
    ap.add_argument("--no_retime", action="store_true", help="keep the dataset's own event times")
    ap.add_argument("--speedup", type=float, default=1000.0, help="divide gaps between events by this when retiming")
    add_flags(ap, ("input",), only=("data", "data_format", "columns", "time_unit", "limit"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    if not args.data:
        ap.error(f"--data or ${DATA_ENV} is required")
    try:
        layout = input_layout(args)
    except LayoutError as exc:
        ap.error(str(exc))
    assert layout is not None
    print(f"reading {args.data} as {layout.described}", file=sys.stderr)
    records = read_replay(args.data, layout.mapping, args.limit)
    n = publish(args.topic, prepare(records, not args.no_retime, args.speedup, int(time.time() * 1000)), args.rate)
    print(f"published {n} messages to {args.topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
