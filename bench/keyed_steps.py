"""Cost of one keyed, stateful step on the DirectRunner: per element keyed by the id (one state cell
and one TTL timer per event id, as a textbook dedupe) against micro-batches keyed by key group
(``BatchByKey`` + ``DedupeEvents``, what the pipeline runs). Same events, same dedupe result; the
time of the source and counting alone (measured in the same run) is subtracted from both.

    python -m bench.keyed_steps                 # 100,000 events
    python -m bench.keyed_steps --events 20000 --key_groups 256
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue

from core.keyed_state import key_group
from core.settings import HelpFormatter, add_flags
from transforms.batching import batch_by
from transforms.clean import DedupeEvents
from transforms.runtime import tune_worker

BASE_MS = 1_700_000_000_000
TTL_MS = 86_400_000


class PerElementDedupe(beam.DoFn):
    """The baseline: keyed by event id, one state cell and one expiry timer per id."""

    SEEN = ReadModifyWriteStateSpec("seen", VarIntCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def setup(self):
        tune_worker()  # the same worker tuning as DedupeEvents, whichever variant runs first

    def process(self, element, timestamp=beam.DoFn.TimestampParam, seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, event = element
        if seen.read():
            return
        seen.write(1)
        expiry.set(timestamp + TTL_MS / 1000.0)
        yield event

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


def events(n: int) -> Iterator[TimestampedValue]:
    """n events, every 50th id repeated later (a duplicate), 100 ms apart."""
    for i in range(n):
        e = {"event_id": f"e{i % (n - n // 50)}", "user_id": f"u{i % 5000}", "item_id": f"i{i % 2000}",
             "event_type": "click", "event_time_ms": BASE_MS + i * 100, "value": None, "context": {}}
        yield TimestampedValue(e, e["event_time_ms"] / 1000)


def run(kind: str, n: int, groups: int) -> tuple[float, int]:
    t = time.perf_counter()
    p = beam.Pipeline()
    src = p | beam.Impulse() | "GenerateEvents" >> beam.FlatMap(lambda _: events(n))
    if kind == "source_only":
        kept = src
    elif kind == "per_element":
        kept = (src | "KeyByEventId" >> beam.Map(lambda e: (e["event_id"], e)).with_output_types(tuple[str, dict])
                | beam.ParDo(PerElementDedupe()))
    else:
        kept = (src | "BatchByEventIdGroup" >> batch_by(lambda e: key_group(e["event_id"], groups))
                | beam.ParDo(DedupeEvents(TTL_MS)).with_outputs("dead_letter", main="events")).events
    if kind == "key_groups":  # the keyed step emits its kept events as one list per batch
        kept | "CountKept" >> beam.Map(lambda batch: Metrics.counter("bench", "kept").inc(len(batch)))
    else:
        kept | "CountKept" >> beam.Map(lambda e: Metrics.counter("bench", "kept").inc())
    result = p.run()
    result.wait_until_finish()
    elapsed = time.perf_counter() - t
    counters = result.metrics().query(MetricsFilter().with_name("kept"))["counters"]
    return elapsed, sum(c.committed for c in counters)


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    add_flags(ap, ("sharding",), only=("key_groups",))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    source, _ = run("source_only", args.events, args.key_groups)
    base, kept_base = run("per_element", args.events, args.key_groups)
    grouped, kept_grouped = run("key_groups", args.events, args.key_groups)
    step_base, step_grouped = base - source, grouped - source
    print(f"{args.events} events ({args.events - kept_base} duplicates), one dedupe step, DirectRunner "
          f"(source and counting alone: {source:.1f} s, subtracted below):")
    print(f"  per element, keyed by event id : {step_base / args.events * 1e6:7.1f} us/event ({base:.1f} s in all, "
          f"kept {kept_base})")
    print(f"  micro-batches by {args.key_groups} key groups: {step_grouped / args.events * 1e6:7.1f} us/event "
          f"({grouped:.1f} s in all, kept {kept_grouped}) | {step_base / max(1e-9, step_grouped):.1f}x cheaper")
    return 0 if kept_base == kept_grouped else 1


if __name__ == "__main__":
    sys.exit(main())
