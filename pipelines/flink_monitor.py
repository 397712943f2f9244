"""The PyFlink job's window statistics and drift alerts: the Beam pipeline's ``MonitorStream``, as Flink functions
over the same runner-free core (``monitoring.window_stats``, ``monitoring.drift``).

    events (after dedupe), flush reports (a side output of UpdateShardModel), dead letters
      -> key_by(window start)  WindowStatsFunction  (ListState of the window's inputs, in arrival order; an
                                                     event-time timer at the window's end emits its record)
      -> key_by(0)             DetectDriftFunction  (the run's DriftMonitor in ValueState; the newest window
                                                     waits for the next or for the end of the input)

Two streams of JSON lines: window_stats records and alert records (``schemas/``), which the job writes to
``stats/`` and ``alerts/`` and ``freshrec report`` reads.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pyflink.common import Types
from pyflink.datastream import OutputTag
from pyflink.datastream.functions import KeyedProcessFunction, ProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from monitoring.drift import DriftMonitor
from monitoring.window_stats import WindowStats
from pipelines.flink_io import END_OF_TIME

DRIFT_ALERTS = OutputTag("drift-alerts", Types.STRING())


class TagByWindow(ProcessFunction):
    """An event, report or dead letter -> (window start, (kind, value)), by its Flink timestamp (event time)."""

    def __init__(self, kind: str, window_ms: int):
        self.kind, self.window_ms = kind, window_ms

    def process_element(self, value, ctx):
        if self.kind == "report":
            t = int(value["max_event_time_ms"])
        elif self.kind == "event":
            t = int(value["event_time_ms"])
        else:
            value = json.loads(value)
            t = max(0, int(ctx.timestamp() or 0))
        yield t - t % self.window_ms, (self.kind, value)


class WindowStatsFunction(KeyedProcessFunction):
    """Keyed by window start: the window's inputs wait in ListState; at its end the ``window_stats`` record."""

    def __init__(self, window_ms: int):
        self.window_ms = window_ms

    def open(self, ctx: RuntimeContext):
        self.inputs = ctx.get_list_state(ListStateDescriptor("window_inputs", Types.PICKLED_BYTE_ARRAY()))
        self.timed: set[int] = set()  # windows whose timer this worker registered (Flink keeps the timers themselves)

    def process_element(self, item, ctx):
        self.inputs.add(item[1])
        if item[0] not in self.timed:  # a registration is a message to the JVM: once per window, not per input
            self.timed.add(item[0])
            ctx.timer_service().register_event_time_timer(item[0] + self.window_ms - 1)

    def on_timer(self, timestamp, ctx):
        start = ctx.get_current_key()
        self.timed.discard(start)
        stats, events = WindowStats(), []
        for kind, value in self.inputs.get() or []:
            if kind == "event":
                events.append(value)
            elif kind == "report":
                stats.add_report(value)
            else:
                stats.add_dead_letter(value)
        stats.add_events(events)  # in arrival order, in one call: the sketches take the window's events at once
        self.inputs.clear()
        yield stats.to_record(start, start + self.window_ms, int(time.time() * 1000))


class DetectDriftFunction(KeyedProcessFunction):
    """Keyed by 0: window records in event-time order through the run's ``DriftMonitor``."""

    def open(self, ctx: RuntimeContext):
        self.monitor = ctx.get_state(ValueStateDescriptor("drift_monitor", Types.PICKLED_BYTE_ARRAY()))
        self.newest = ctx.get_state(ValueStateDescriptor("newest_window", Types.PICKLED_BYTE_ARRAY()))

    def _judge(self, record: dict[str, Any], last: bool):
        drift = self.monitor.value() or DriftMonitor()
        now_ms = int(time.time() * 1000)
        for alert in drift.update(record, last=last):
            yield DRIFT_ALERTS, json.dumps(alert.to_record(now_ms))
        self.monitor.update(drift)

    def process_element(self, record, ctx):
        waiting = self.newest.value()
        if waiting is not None:
            yield from self._judge(waiting, last=False)
        self.newest.update(record)
        yield json.dumps(record)
        ctx.timer_service().register_event_time_timer(END_OF_TIME)

    def on_timer(self, timestamp, ctx):
        waiting = self.newest.value()
        if waiting is not None:
            yield from self._judge(waiting, last=True)
            self.newest.clear()


def monitor_stream(events, reports, dead, window_s: int):
    """The job's streams -> (JSON lines of window statistics, JSON lines of drift alerts)."""
    window_ms = window_s * 1000
    tagged = [s.process(TagByWindow(kind, window_ms), output_type=Types.PICKLED_BYTE_ARRAY()).uid(f"window-{kind}")
              for kind, s in (("event", events), ("report", reports), ("dead", dead))]
    merged = tagged[0].union(tagged[1], tagged[2])
    stats = (merged.key_by(lambda kv: kv[0], key_type=Types.LONG())
             .process(WindowStatsFunction(window_ms), output_type=Types.PICKLED_BYTE_ARRAY()).uid("window-stats"))
    judged = (stats.key_by(lambda r: 0, key_type=Types.INT())
              .process(DetectDriftFunction(), output_type=Types.STRING()).uid("detect-drift").name("DetectDrift"))
    return judged, judged.get_side_output(DRIFT_ALERTS)
