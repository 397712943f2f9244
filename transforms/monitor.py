"""MonitorStream: per-window stream statistics and the drift alerts they raise.

    events (clean, in micro-batches), arrivals (decoded events as they arrived), flush reports, dead letters
      -> Partial*WindowStats (per input, bundle and --stats_window_s event-time window: a monitoring.window_stats.WindowStats
         of tfx-bsl sketches, dead letters by reason, the shards' prequential quality, tables and freshness lag;
         the arrivals in arrival order give the event-time gaps and lateness)
      -> MergeWindowStats (FixedWindows; a CombineFn that merges the partials)
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
from apache_beam.utils.windowed_value import WindowedValue

from monitoring.drift import DriftMonitor
from monitoring.window_stats import WindowStats, split_by_window

NAMESPACE = "freshrec"


class _PartialWindowStats(beam.DoFn):
    """Inputs of one ``kind`` (events: micro-batches; arrivals, reports, dead letters: one by one) -> one partial
    ``WindowStats`` per bundle and stats window, emitted at the end of the
    bundle at the earliest timestamp of its inputs: the sketches take each window's events of a bundle in one call,
    and the combine downstream merges a few partials per window instead of adding every event."""

    def __init__(self, window_ms: int, kind: str):
        self.window_ms, self.kind = window_ms, kind

    def start_bundle(self) -> None:
        self._parts: dict[tuple[Any, int], dict[str, Any]] = {}

    FOLD_AT = 2_000  # events waiting for a window's sketches before they are folded in

    def _part(self, w: Any, start: int, ts: Timestamp) -> dict[str, Any]:
        part = self._parts.get((w, start))
        if part is None:
            part = self._parts[(w, start)] = {"stats": WindowStats(), "events": [], "arrivals": [], "ts": ts}
        part["ts"] = min(part["ts"], ts)
        return part

    @staticmethod
    def _fold(part: dict[str, Any]) -> None:
        part["stats"].add_events(part["events"], timing=False).add_arrivals(part["arrivals"])
        part["events"], part["arrivals"] = [], []

    def process(self, value, windowed=beam.DoFn.WindowedValueParam):
        kind = self.kind
        w, ts = windowed.windows[0], windowed.timestamp
        if kind == "events":  # a micro-batch of clean events: split by the windows it spans
            for start, events in split_by_window(value, self.window_ms):
                part = self._part(w, start, Timestamp(micros=min(e["event_time_ms"] for e in events) * 1000))
                part["events"] += events
                if len(part["events"]) >= self.FOLD_AT:
                    self._fold(part)
            return
        ms = int(value["event_time_ms"]) if kind == "arrivals" else int(ts.micros // 1000)
        part = self._part(w, ms - ms % self.window_ms, ts)
        if kind == "arrivals":
            part["arrivals"].append(value)
            if len(part["arrivals"]) >= self.FOLD_AT:
                self._fold(part)
        elif kind == "reports":
            part["stats"].add_report(value)
        else:
            part["stats"].add_dead_letter(value)

    def finish_bundle(self):
        parts, self._parts = self._parts, {}
        for (w, _start), part in parts.items():
            self._fold(part)
            yield WindowedValue(part["stats"], part["ts"], [w])


class MergeWindowStatsFn(beam.CombineFn):
    """Partial ``WindowStats`` of a window -> their merge."""

    def create_accumulator(self) -> WindowStats:
        return WindowStats()

    def add_input(self, acc: WindowStats, part: WindowStats) -> WindowStats:
        return acc.merge(part)

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
        partials = [pcoll | f"Partial{label}WindowStats" >> beam.ParDo(_PartialWindowStats(window_ms, kind))
                    for pcoll, label, kind in ((events, "Event", "events"), (arrivals, "Arrival", "arrivals"),
                                               (reports, "Report", "reports"), (dead, "DeadLetter", "dead_letter"))]
        return (
            tuple(partials)
            | "FlattenPartials" >> beam.Flatten()
            | "IntoStatsWindows" >> beam.WindowInto(window.FixedWindows(self.window_s))
            | "MergeWindowStats" >> beam.CombineGlobally(MergeWindowStatsFn()).without_defaults()
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
