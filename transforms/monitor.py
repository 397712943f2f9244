"""MonitorStream: per-window stream statistics and the drift alerts they raise.

    events (clean, in micro-batches), arrivals (decoded events as they arrived), flush reports, dead letters
      -> SplitEventsByWindow (each micro-batch into its --stats_window_s event-time windows)
      -> BatchArrivalsByWindow (a bundle's arrivals per window, in arrival order: event-time gaps and lateness)
      -> WindowStats (FixedWindows; a CombineFn over monitoring.window_stats.WindowStats: tfx-bsl sketches,
         dead letters by reason, the shards' prequential quality, tables and freshness lag)
      -> stats records (schemas/window_stats.avsc)
      -> DetectDrift (one key; windows put in event-time order; monitoring.drift.DriftMonitor, River's
         detectors) -> alert records (schemas/alert.avsc)

The statistics of a window come out when the watermark passes its end, so a bounded run writes them at
the end and a streaming run as it goes; the detectors see the windows in event-time order either way
(``DetectDrift`` buffers them and works through them when the watermark passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.coders.coders import FastPrimitivesCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from monitoring.drift import DriftMonitor
from monitoring.window_stats import WindowStats, split_by_window
from transforms.batching import batch_by

NAMESPACE = "freshrec"


class _SplitByWindow(beam.DoFn):
    """A micro-batch of events -> one (``kind``, batch) per stats window it spans, stamped inside it."""

    def __init__(self, window_ms: int, kind: str = "events"):
        self.window_ms, self.kind = window_ms, kind

    def process(self, batch):
        if isinstance(batch, tuple):  # (window key, batch) from BatchArrivalsByWindow
            batch = batch[1]
        for _start, part in split_by_window(batch, self.window_ms):
            yield TimestampedValue((self.kind, part), min(e["event_time_ms"] for e in part) / 1000)


class WindowStatsFn(beam.CombineFn):
    """("events", [events]) | ("arrivals", [events]) | ("report", report) | ("dead_letter", record) -> a
    ``WindowStats``."""

    def create_accumulator(self) -> WindowStats:
        return WindowStats()

    def add_input(self, acc: WindowStats, item: tuple[str, Any]) -> WindowStats:
        kind, value = item
        if kind == "events":
            return acc.add_events(value, timing=False)
        if kind == "arrivals":
            return acc.add_arrivals(value)
        if kind == "report":
            return acc.add_report(value)
        return acc.add_dead_letter(value)

    def merge_accumulators(self, accs):
        accs = iter(accs)
        first = next(accs)
        for other in accs:
            first.merge(other)
        return first

    def extract_output(self, acc: WindowStats) -> WindowStats:
        return acc


class _ToRecord(beam.DoFn):
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock

    def process(self, stats: WindowStats, w=beam.DoFn.WindowParam):
        start, end = int(w.start.micros // 1000), int(w.end.micros // 1000)
        yield TimestampedValue(stats.to_record(start, end, int(self.clock() * 1000)), (end - 1) / 1000)


class ComputeWindowStats(beam.PTransform):
    """(events, reports, dead letters, arrivals) -> one ``window_stats`` record per event-time window of
    ``window_s``. ``events`` are micro-batches of clean events; ``arrivals`` the decoded events one by one, in
    the order they arrived (their gaps and lateness)."""

    def __init__(self, window_s: int, clock: Callable[[], float] = time.time):
        super().__init__()
        if window_s < 1:
            raise ValueError(f"ComputeWindowStats: window_s must be >= 1, got {window_s}")
        self.window_s, self.clock = window_s, clock

    def expand(self, pcolls):
        events, reports, dead, arrivals = pcolls
        window_ms = self.window_s * 1000
        tagged = (
            (events | "SplitEventsByWindow" >> beam.ParDo(_SplitByWindow(window_ms)),
             arrivals
             | "BatchArrivalsByWindow" >> batch_by(lambda e: e["event_time_ms"] // window_ms, "BatchArrivalsByWindow")
             | "DropWindowKey" >> beam.ParDo(_SplitByWindow(window_ms, "arrivals")).with_input_types(tuple[int, list[Any]]),
             reports | "TagReports" >> beam.Map(lambda r: ("report", r)),
             dead | "TagDeadLetters" >> beam.Map(lambda r: ("dead_letter", r)))
            | "FlattenWindowInputs" >> beam.Flatten()
        )
        return (
            tagged
            | "IntoStatsWindows" >> beam.WindowInto(window.FixedWindows(self.window_s))
            | "CombineWindowStats" >> beam.CombineGlobally(WindowStatsFn()).without_defaults()
            | "ToWindowStatsRecord" >> beam.ParDo(_ToRecord(self.clock))
        )


class DetectDriftFn(beam.DoFn):
    """One key: window records wait in PENDING until the watermark passes them, then go through the
    run's ``DriftMonitor`` (kept in MONITOR) in event-time order.

    With ``bounded`` (a replay, in batch or as a stream) the newest window waits for the next one or for the end
    of the input (END): the last window of a bounded input ends where the input does, so its traffic is not
    compared (``DriftMonitor.update(last=True)``)."""

    PENDING = BagStateSpec("pending", FastPrimitivesCoder())
    MONITOR = ReadModifyWriteStateSpec("monitor", PickleCoder())  # River's detectors: our own state, never input
    DUE = TimerSpec("due", TimeDomain.WATERMARK)
    END = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def __init__(self, clock: Callable[[], float] = time.time, bounded: bool = False, **watch_args: Any):
        self.clock, self.bounded, self.watch_args = clock, bounded, watch_args
        self.fired = Metrics.counter(NAMESPACE, "drift_alerts")

    def process(self, element, pending=beam.DoFn.StateParam(PENDING), due=beam.DoFn.TimerParam(DUE),
                end=beam.DoFn.TimerParam(END), w=beam.DoFn.WindowParam):
        record = element[1]
        pending.add(record)
        due.set(Timestamp(micros=(record["window_end_ms"] - 1) * 1000))
        if self.bounded:
            end.set(w.max_timestamp())

    def _work_through(self, pending, monitor, at_end: bool):
        records = sorted(pending.read(), key=lambda r: r["window_start_ms"])
        pending.clear()
        if self.bounded and not at_end and records:
            pending.add(records.pop())  # the newest waits: it may be the input's last
        drift = monitor.read() or DriftMonitor(**self.watch_args)
        now_ms = int(self.clock() * 1000)
        for i, record in enumerate(records):
            for alert in drift.update(record, last=at_end and i == len(records) - 1):
                self.fired.inc()
                yield TimestampedValue(alert.to_record(now_ms), alert.window_end_ms / 1000)
        monitor.write(drift)

    @on_timer(DUE)
    def on_due(self, pending=beam.DoFn.StateParam(PENDING), monitor=beam.DoFn.StateParam(MONITOR)):
        yield from self._work_through(pending, monitor, at_end=False)

    @on_timer(END)
    def on_end(self, pending=beam.DoFn.StateParam(PENDING), monitor=beam.DoFn.StateParam(MONITOR)):
        yield from self._work_through(pending, monitor, at_end=True)


class MonitorStream(beam.PTransform):
    """(events, reports, dead letters, arrivals) -> {"stats": window_stats records, "alerts": drift alert records}."""

    def __init__(self, window_s: int, clock: Callable[[], float] = time.time, bounded: bool = False, **watch_args: Any):
        super().__init__()
        self.window_s, self.clock, self.bounded, self.watch_args = window_s, clock, bounded, watch_args

    def expand(self, pcolls):
        stats = pcolls | "ComputeWindowStats" >> ComputeWindowStats(self.window_s, self.clock)
        alerts = (
            stats
            | "KeyForDrift" >> beam.Map(lambda r: (0, r))
            | "IntoGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
            | "DetectDrift" >> beam.ParDo(DetectDriftFn(self.clock, self.bounded, **self.watch_args))
        )
        return {"stats": stats, "alerts": alerts}
