"""Sinks: Avro files (windowed writes) for scores, deltas, rollbacks and dead letters; the run summary."""

from __future__ import annotations

import json
import math
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
from model.metrics import BinaryStats
from monitoring.alerts import SkippedStepsAlarm

SKIPPED_SIGNAL = SkippedStepsAlarm.SIGNAL


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
    """Merges flush reports and dead letters into the run summary (mergeable: counts and histograms)."""

    def create_accumulator(self):
        return {"applied": 0, "dead_letter": {}, "stats": BinaryStats().to_dict(), "versions": {},
                "steps": 0, "skipped_nonfinite": 0, "rollbacks": 0, "flushes": 0, "table_rows": {},
                "scores": 0, "deltas": 0, "alerts": 0, "alerts_by_signal": {}, "not_learned": {}, "sync": {"merged": 0, "published": 0, "bytes_out": 0, "max_lag_epochs": 0},
                "probe": {"hits": 0.0, "probes": 0}}

    def add_input(self, acc, item):
        kind, rec = item
        if kind == "dead_letter":
            reason = rec["reason"].split(":")[0]
            acc["dead_letter"][reason] = acc["dead_letter"].get(reason, 0) + 1
            return acc
        if kind == "alert":  # a drift alert (transforms.monitor); a shard's own alerts are counted in its reports
            acc["alerts"] += 1
            acc["alerts_by_signal"][rec["signal"]] = acc["alerts_by_signal"].get(rec["signal"], 0) + 1
            return acc
        acc["applied"] += rec["events"]
        acc["steps"] += rec["steps"]
        acc["skipped_nonfinite"] += rec["skipped_nonfinite"]
        acc["rollbacks"] += rec["rollbacks"]
        acc["scores"] += rec.get("scores", 0)
        acc["deltas"] += rec.get("deltas", 0)
        acc["alerts"] += rec.get("alerts", 0)
        if rec.get("alerts"):
            acc["alerts_by_signal"][SKIPPED_SIGNAL] = acc["alerts_by_signal"].get(SKIPPED_SIGNAL, 0) + rec["alerts"]
        if rec.get("not_learned"):
            shard_key = str(rec["shard"])
            acc["not_learned"][shard_key] = acc["not_learned"].get(shard_key, 0) + rec["not_learned"]
        for part in ("sync", "probe"):
            for k, n in (rec.get(part) or {}).items():
                if k == "lag_epochs":  # a level, not a count: the run's worst
                    acc[part]["max_lag_epochs"] = max(acc[part]["max_lag_epochs"], n)
                else:
                    acc[part][k] += n
        acc["flushes"] += 1
        acc["stats"] = BinaryStats.from_dict(acc["stats"]).merge(BinaryStats.from_dict(rec["stats"])).to_dict()
        shard = str(rec["shard"])
        if rec["version"] >= acc["versions"].get(shard, -1):
            acc["versions"][shard] = rec["version"]
            acc["table_rows"][shard] = rec["table_rows"]
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = self.create_accumulator()
        for a in accs:
            out["applied"] += a["applied"]
            for k in ("steps", "skipped_nonfinite", "rollbacks", "flushes", "scores", "deltas", "alerts"):
                out[k] += a[k]
            for part in ("sync", "probe"):
                for k, n in a[part].items():
                    out[part][k] = max(out[part][k], n) if k == "max_lag_epochs" else out[part][k] + n
            for part in ("dead_letter", "alerts_by_signal"):
                for r, n in a[part].items():
                    out[part][r] = out[part].get(r, 0) + n
            out["stats"] = BinaryStats.from_dict(out["stats"]).merge(BinaryStats.from_dict(a["stats"])).to_dict()
            for s, n in a["not_learned"].items():
                out["not_learned"][s] = out["not_learned"].get(s, 0) + n
            for s, v in a["versions"].items():
                if v >= out["versions"].get(s, -1):
                    out["versions"][s] = v
                    out["table_rows"][s] = a["table_rows"][s]
        return out

    def extract_output(self, acc):
        stats = BinaryStats.from_dict(acc["stats"])
        dead = sum(acc["dead_letter"].values())
        auc, ll = stats.auc(), stats.logloss()
        return {
            "events_applied": acc["applied"],
            "events_dead_lettered": dead,
            "events_accounted": acc["applied"] + dead,
            "dead_letter_by_reason": dict(sorted(acc["dead_letter"].items())),
            "prequential": {"examples": stats.count, "nonfinite_predictions": stats.nonfinite,
                            "auc": None if math.isnan(auc) else round(auc, 5),
                            "logloss": None if math.isnan(ll) else round(ll, 5),
                            **({"recall_probes": acc["probe"]["probes"],
                                "recall": round(acc["probe"]["hits"] / acc["probe"]["probes"], 5)}
                               if acc["probe"]["probes"] else {})},
            "model_versions": dict(sorted(acc["versions"].items(), key=lambda kv: int(kv[0]))),
            "table_rows": acc["table_rows"],
            "flushes": acc["flushes"],
            "optimizer_steps": acc["steps"],
            "steps_skipped_nonfinite": acc["skipped_nonfinite"],
            "rollbacks": acc["rollbacks"],
            "scores_written": acc["scores"],
            "deltas_written": acc["deltas"],
            "alerts": acc["alerts"],
            "alerts_by_signal": dict(sorted(acc["alerts_by_signal"].items())),
            "events_not_learned": sum(acc["not_learned"].values()),
            "events_not_learned_by_shard": dict(sorted(acc["not_learned"].items())),
            "sync": {"epochs_applied": acc["sync"]["merged"], "publications": acc["sync"]["published"],
                     "bytes_published": acc["sync"]["bytes_out"], "max_lag_epochs": acc["sync"]["max_lag_epochs"]},
        }


def write_summary(summary: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


class WriteWindowSummary(beam.DoFn):
    """One JSON file per event-time window (``window-<start ms>.json``): the ledger of an unbounded run."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, summary, window=beam.DoFn.WindowParam):
        start_ms, end_ms = int(window.start.micros // 1000), int(window.end.micros // 1000)
        record = {**summary, "window_start_ms": start_ms, "window_end_ms": end_ms}
        yield write_summary(record, os.path.join(self.directory, f"window-{start_ms}.json"))


class _SummarizeBundle(beam.DoFn):
    """Ledger items -> one partial ``SummaryFn`` accumulator per bundle and window, keyed for ``_Ledger``."""

    def start_bundle(self) -> None:
        self._partial: dict[Any, tuple[Any, Timestamp]] = {}

    def process(self, item, windowed=beam.DoFn.WindowedValueParam):
        fn = SummaryFn()
        w = windowed.windows[0]
        acc, ts = self._partial.get(w, (None, windowed.timestamp))
        self._partial[w] = (fn.add_input(acc or fn.create_accumulator(), item), min(ts, windowed.timestamp))

    def finish_bundle(self):
        partial, self._partial = self._partial, {}
        for w, (acc, ts) in partial.items():
            yield WindowedValue((0, acc), ts, [w])


class _Ledger(beam.DoFn):
    """The run's one summary accumulator in keyed state (one key), emitted when the watermark passes the end
    of the global window: a streaming run's summary holds one accumulator, however long it runs (a global
    combine would keep every bundle's partial until the end)."""

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


class SummarizeRun(beam.PTransform):
    """Reports + dead letters (+ drift alerts) -> the run summary: one file at ``path`` for a bounded run, or with
    ``window_s`` one per fixed event-time window under ``window_dir``. With ``ledger`` (streaming runs
    without windows) the summary is kept in one keyed accumulator (``_Ledger``) instead of a global combine."""

    def __init__(self, path: str | None, window_s: int = 0, window_dir: str | None = None, ledger: bool = False):
        super().__init__()
        self.path, self.window_s, self.window_dir, self.ledger = path, window_s, window_dir, ledger

    def expand(self, pcolls):
        reports, dead, *alerts = pcolls  # alerts: the drift alerts, when the run watches for drift
        parts = [reports | "TagReports" >> beam.Map(lambda r: ("report", r)),
                 dead | "TagDeadLetters" >> beam.Map(lambda r: ("dead_letter", r))]
        if alerts:
            parts.append(alerts[0] | "TagAlerts" >> beam.Map(lambda r: ("alert", r)))
        tagged = tuple(parts) | "FlattenLedger" >> beam.Flatten()
        if self.window_s:
            tagged = tagged | "WindowSummary" >> beam.WindowInto(window.FixedWindows(self.window_s))
            summary = tagged | "CombineSummary" >> beam.CombineGlobally(SummaryFn()).without_defaults()
        elif self.ledger:
            summary = (tagged | "SummarizeBundles" >> beam.ParDo(_SummarizeBundle()).with_output_types(tuple[int, Any])
                       | "KeepLedger" >> beam.ParDo(_Ledger()))
        else:
            summary = tagged | "CombineSummary" >> beam.CombineGlobally(SummaryFn())
        if self.path:
            path = self.path
            summary | "WriteSummary" >> beam.Map(write_summary, path)
        if self.window_s and self.window_dir:
            summary | "WriteWindowSummaries" >> beam.ParDo(WriteWindowSummary(self.window_dir))
        return summary
