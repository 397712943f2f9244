"""Freshness latency: from an event's publication to the emission of its user's refreshed score.

Runs the streaming pipeline (DirectRunner) against the local Pub/Sub emulator, publishes events at
``--rate`` per second for ``--seconds`` (each stamped with its publish time as event time), reads the
scored outputs and reports p50/p90/p99 of emit_time_ms - event_time_ms, i.e. publication to refreshed
score, per micro-batch setting. Needs the emulator (``gcloud beta emulators pubsub start``).

    python -m bench.freshness --rate 5 --seconds 20 --batch_sizes 1,16 --flush_interval_s 0.5
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

import schemas
from core.settings import HelpFormatter, add_flags
from pipelines.emulator import EmulatorUnavailable, start_emulator
from schemas.messages import event_message

PROJECT = "freshrec-bench"


def run_once(batch_size: int, flush_s: float, rate: float, seconds: float, tag: str) -> dict[str, float]:
    """One streaming run at ``batch_size``; ``flush_s`` 0 leaves the pipeline's streaming default."""
    import apache_beam as beam
    from google.cloud import pubsub_v1

    from pipelines.freshrec_pipeline import build_pipeline, make_options

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = lambda n: f"projects/{PROJECT}/topics/{tag}-{n}"  # noqa: E731
    sub = lambda n: f"projects/{PROJECT}/subscriptions/{tag}-{n}"  # noqa: E731
    for n in ("events", "scores", "deltas", "dead"):
        publisher.create_topic(request={"name": topic(n)})
    for n in ("events", "scores"):
        subscriber.create_subscription(request={"name": sub(n), "topic": topic(n)})
    opts = make_options(["--events_subscription", sub("events"), "--scores_topic", topic("scores"),
                         "--deltas_topic", topic("deltas"), "--dead_letter_topic", topic("dead"),
                         "--shards", "2", "--batch_size", str(batch_size)]
                        + (["--flush_interval_s", str(flush_s)] if flush_s else []))
    p = beam.Pipeline(options=opts)
    build_pipeline(p, opts)
    result = p.run()
    threading.Thread(target=lambda: result.wait_until_finish(), daemon=True).start()

    sent = 0
    start = time.monotonic()
    n_total = int(rate * seconds)
    while sent < n_total:
        now_ms = int(time.time() * 1000)
        data, attrs = event_message({"event_id": f"{tag}-{sent}", "user_id": f"u{sent % 200}", "item_id": f"i{sent % 97}",
                                     "event_type": "click", "event_time_ms": now_ms, "value": None, "context": {}})
        publisher.publish(topic("events"), data, **attrs)
        sent += 1
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    latencies: list[int] = []
    users_seen = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        resp = subscriber.pull(request={"subscription": sub("scores"), "max_messages": 1000}, timeout=10)
        if resp.received_messages:
            subscriber.acknowledge(request={"subscription": sub("scores"), "ack_ids": [m.ack_id for m in resp.received_messages]})
            for m in resp.received_messages:
                rec = schemas.decode(schemas.SCORED_OUTPUT, m.message.data)
                latencies.append(rec["emit_time_ms"] - rec["event_time_ms"])
                users_seen += 1
        elif latencies and time.time() - start > seconds + 15:
            break
    result.cancel()
    lat = np.asarray(latencies)
    return {"events": sent, "scores": users_seen, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p90_ms": float(np.percentile(lat, 90)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch_sizes", default="1,16")
    add_flags(ap, ("model",), only=("flush_interval_s",))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    try:
        emu = start_emulator(PROJECT)
    except EmulatorUnavailable as exc:
        print(f"freshness benchmark needs the Pub/Sub emulator: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"publish -> refreshed score latency, DirectRunner + Pub/Sub emulator, {args.rate:.0f} events/s for "
              f"{args.seconds:.0f} s, flush interval {args.flush_interval_s} s")
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            r = run_once(b, args.flush_interval_s, args.rate, args.seconds, f"b{b}")
            print(f"  batch {b:4d}: {r['events']} events, {r['scores']} scores, p50 {r['p50_ms']:.0f} ms, "
                  f"p90 {r['p90_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
