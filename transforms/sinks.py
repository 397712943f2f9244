"""Sinks: Avro files (windowed writes) for scores, deltas, rollbacks and dead letters; the run summary."""

from __future__ import annotations

import os
from typing import Any

import apache_beam as beam
import fastavro
from apache_beam.coders.coders import FastPrimitivesCoder
from apache_beam.io import fileio
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import schemas
from core import run_summary
from core.run_summary import write_summary


class AvroFileSink(fileio.FileSink):
    """One Avro container file per (window, pane, shard). fastavro's writer refuses a missing field or a
    value of the wrong kind; its full per-record validator (2x the cost of writing) is left off: the
    records are ours, and the tests validate every kind of output record against its schema."""

    def __init__(self, schema_name: str):
        self.schema_name = schema_name
        self._writer: Any = None

    def open(self, fh):
        self._writer = fastavro.write.Writer(fh, schemas.load_schema(self.schema_name))

    def write(self, record):
        self._writer.write(record)

    def flush(self):
        self._writer.flush()


class WriteAvroRecords(beam.PTransform):
    """Write records of ``schema_name`` under ``directory``; fixed windows of ``window_s`` seconds
    (0 = one global window, for bounded runs)."""

    def __init__(self, directory: str, schema_name: str, window_s: int = 0):
        super().__init__()
        self.directory, self.schema_name, self.window_s = directory, schema_name, window_s

    def expand(self, records):
        if self.window_s:
            records = records | "WindowForFiles" >> beam.WindowInto(window.FixedWindows(self.window_s))
        name = self.schema_name
        return records | "WriteAvroFiles" >> fileio.WriteToFiles(
            path=self.directory,
            file_naming=fileio.default_file_naming(prefix=name, suffix=".avro"),
            sink=lambda _dest: AvroFileSink(name),
            shards=1,
        )


class SummaryFn(beam.CombineFn):
    """Merges flush reports and dead letters into the run summary (``core.run_summary``: counts and histograms)."""

    def create_accumulator(self):
        return run_summary.new()

    def add_input(self, acc, item):
        return run_summary.add(acc, item)

    def merge_accumulators(self, accs):
        return run_summary.merge(accs)

    def extract_output(self, acc):
        return run_summary.extract(acc)


class WriteWindowSummary(beam.DoFn):
    """One JSON file per event-time window (``window-<start ms>.json``): the ledger of an unbounded run."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, summary, window=beam.DoFn.WindowParam):
        start_ms, end_ms = int(window.start.micros // 1000), int(window.end.micros // 1000)
        record = {**summary, "window_start_ms": start_ms, "window_end_ms": end_ms}
        yield write_summary(record, os.path.join(self.directory, f"window-{start_ms}.json"))


class _SummarizeBundle(beam.DoFn):
    """Ledger items of one ``kind`` ("report", "dead_letter", "alert") -> one partial ``SummaryFn`` accumulator
    per bundle and window, keyed for ``_Ledger``. Applied to each input before they are flattened, so what
    leaves the step that produced the items is one accumulator per bundle, not the items: the batch engine
    (Beam's ``FnApiRunner``) runs the steps after a flatten of several steps' outputs only when its input
    ends, holding what crosses until then (a flow-controlled stream's reports, 76 bytes an event, did)."""

    def __init__(self, kind: str):
        self.kind = kind

    def start_bundle(self) -> None:
        self._partial: dict[Any, tuple[Any, Timestamp]] = {}

    def process(self, item, windowed=beam.DoFn.WindowedValueParam):
        w = windowed.windows[0]
        acc, ts = self._partial.get(w, (None, windowed.timestamp))
        self._partial[w] = (run_summary.add(acc or run_summary.new(), (self.kind, item)), min(ts, windowed.timestamp))

    def finish_bundle(self):
        partial, self._partial = self._partial, {}
        for w, (acc, ts) in partial.items():
            yield WindowedValue((0, acc), ts, [w])


class MergeSummariesFn(SummaryFn):
    """``SummaryFn`` over partial accumulators (``_SummarizeBundle``'s) instead of ledger items."""

    def add_input(self, acc, part):
        return run_summary.merge([acc, part])


class _Ledger(beam.DoFn):
    """The run's one summary accumulator in keyed state (one key), in the global window: a streaming run's
    summary holds one accumulator, however long it runs (a global combine would keep every bundle's partial
    until the end), and counts every report and dead letter whenever it comes (no event-time window closes
    on it). Emitted when the watermark passes the end of the window (the input ended, or the run drained)."""

    ACC = ReadModifyWriteStateSpec("summary", FastPrimitivesCoder())
    END = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def process(self, element, acc=beam.DoFn.StateParam(ACC), end=beam.DoFn.TimerParam(END),
                window=beam.DoFn.WindowParam):
        fn = SummaryFn()
        current = acc.read()
        acc.write(element[1] if current is None else fn.merge_accumulators([current, element[1]]))
        end.set(window.max_timestamp())

    @on_timer(END)
    def emit(self, acc=beam.DoFn.StateParam(ACC)):
        current = acc.read()
        if current is not None:
            yield SummaryFn().extract_output(current)
        acc.clear()


class _RunningLedger(_Ledger):
    """Also emitted, marked ``"running": true``, every ``every_s`` of processing time while the run goes on (after
    the end of input it finds the accumulator cleared and emits nothing). Processing-time timers keep the
    DirectRunner off its faster engine: for runs that are on the other anyway (Pub/Sub)."""

    ARMED = ReadModifyWriteStateSpec("armed", FastPrimitivesCoder())
    EVERY = TimerSpec("every", TimeDomain.REAL_TIME)

    def __init__(self, every_s: float):
        self.every_s = every_s

    def process(self, element, acc=beam.DoFn.StateParam(_Ledger.ACC), end=beam.DoFn.TimerParam(_Ledger.END),
                window=beam.DoFn.WindowParam, armed=beam.DoFn.StateParam(ARMED), every=beam.DoFn.TimerParam(EVERY)):
        super().process(element, acc, end, window)
        if not armed.read():  # set once a period: reset on each element, it would never fire
            every.set(Timestamp.now() + self.every_s)
            armed.write(True)

    @on_timer(EVERY)
    def emit_running(self, acc=beam.DoFn.StateParam(_Ledger.ACC), armed=beam.DoFn.StateParam(ARMED)):
        armed.clear()
        current = acc.read()
        if current is not None:
            yield {**SummaryFn().extract_output(current), "running": True}


class SummarizeRun(beam.PTransform):
    """Reports + dead letters (+ drift alerts) -> the run summary at ``path``, and with ``window_s`` also one per
    fixed event-time window under ``window_dir`` (what arrives after its window closed is in the run summary
    only). With ``ledger`` (streaming runs) the run summary is kept in one keyed accumulator (``_Ledger``,
    written every ``ledger_every_s`` while the run goes on) instead of a global combine, and written even
    with windows."""

    def __init__(self, path: str | None, window_s: int = 0, window_dir: str | None = None, ledger: bool = False,
                 ledger_every_s: float = 0.0):
        super().__init__()
        self.path, self.window_s, self.window_dir, self.ledger = path, window_s, window_dir, ledger
        self.ledger_every_s = ledger_every_s

    def expand(self, pcolls):
        reports, dead, *alerts = pcolls  # alerts: the drift alerts, when the run watches for drift
        inputs = [(reports, "report", "Reports"), (dead, "dead_letter", "DeadLetters")]
        if alerts:
            inputs.append((alerts[0], "alert", "Alerts"))
        windowed = total = None
        if self.window_s:
            tagged = (tuple(pcoll | f"Tag{label}" >> beam.Map(lambda r, k=kind: (k, r)) for pcoll, kind, label in inputs)
                      | "FlattenLedger" >> beam.Flatten())
            windowed = (tagged | "WindowSummary" >> beam.WindowInto(window.FixedWindows(self.window_s))
                        | "CombineSummary" >> beam.CombineGlobally(SummaryFn()).without_defaults())
            if self.window_dir:
                windowed | "WriteWindowSummaries" >> beam.ParDo(WriteWindowSummary(self.window_dir))
        if self.ledger or not self.window_s:
            partials = (tuple(pcoll | f"Summarize{label}" >> beam.ParDo(_SummarizeBundle(kind)).with_output_types(tuple[int, Any])
                              for pcoll, kind, label in inputs)
                        | "FlattenPartialSummaries" >> beam.Flatten())
            if self.ledger:
                total = partials | "KeepLedger" >> beam.ParDo(_RunningLedger(self.ledger_every_s) if self.ledger_every_s else _Ledger())
            else:
                total = (partials | "DropLedgerKey" >> beam.Values()
                         | "CombineSummary" >> beam.CombineGlobally(MergeSummariesFn()))
        if self.path and total is not None:
            total | "WriteSummary" >> beam.Map(write_summary, self.path)
        return total if total is not None else windowed
