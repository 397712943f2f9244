"""The PyFlink job's learning step: ``UpdateShardModel``, keyed by shard, a thin adapter over
``model.journal`` (the Beam pipeline's ``transforms/update.py`` runs the same core).

Its partition is a snapshot plus a journal of micro-batches in Flink state. On a bounded input (``ordered``) a
shard's micro-batches are its events in event-time order (ties in arrival order), each cut once the watermark
has passed it or, where the watermark lags, once ``order_window`` events wait (a bundle's worth: arrivals out
of order by less still land in order). So, ties aside, they do not depend on the parallelism, and for an input
in time order (the readers replay datasets so) they are a bounded DirectRunner run's (at parallelism 1, ties
included). At parallelism 2 a keyed step takes events from two upstream subtasks in bursts, and micro-batches
cut in arrival order vary from run to run, and so does the AUC (docs/benchmarks.md, "Engines"). A watched
folder's (or, ``--arrival_order``, any input's) are cut in arrival order: waiting for the watermark would hold
every event back by the allowed out-of-orderness.
Main output: score records; side outputs: deltas, rollbacks and the shard's alerts (JSON lines of the Avro
records; a flush's scores, and its deltas, in one element), flush reports (dicts).
Every side output must be read downstream: PyFlink joins an unread one to the main output.
"""

from __future__ import annotations

import json
import time

from pyflink.common import Types
from pyflink.datastream import OutputTag, TimeDomain
from pyflink.datastream.functions import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from core import progress  # by module: the worker's own board, not a pickled copy
from core.featurizers import featurized_record
from core.medium import FolderMedium
from model.batch import time_order
from model.config import LearnerConfig
from model.journal import flush_micro_batch, flush_report, new_meta, sync_on_time
from model.learner import IncrementalLearner
from model.metrics import BinaryStats
from model.shard_sync import ShardSync
from model.sync import SyncConfig
from monitoring.alerts import SkippedStepsAlarm
from pipelines.flink_io import END_OF_TIME
from pipelines.results import ALERTS, DELTAS, ROLLBACKS

REPORTS = OutputTag("flush-reports", Types.PICKLED_BYTE_ARRAY())
DELTA_RECORDS, ROLLBACK_RECORDS, ALERT_RECORDS = (OutputTag(name, Types.STRING()) for name in (DELTAS, ROLLBACKS, ALERTS))


def metric_group(ctx: RuntimeContext):
    """The job's metrics, under the Beam pipeline's namespace and names (transforms/clean.py, transforms/update.py),
    so Flink's UI and its Prometheus reporter show what Beam's runners show."""
    return ctx.get_metrics_group().add_group("freshrec")


class UpdateShardModel(KeyedProcessFunction):
    """Keyed by shard; the partition is a snapshot plus a journal of micro-batches in Flink state."""

    def __init__(self, cfg: LearnerConfig, batch_size: int, top_k: int, snapshot_every: int, progress_s: float = 0.0,
                 sync: SyncConfig | None = None, sync_location: str | None = None, alert_after: int = 3,
                 flush_interval_ms: int = 0, ordered: bool = False, order_window: int = 0):
        self.flush_interval_ms = flush_interval_ms  # also flush this long (processing time) after a buffer's first event
        self.ordered = ordered  # micro-batches in event-time order, cut as the watermark passes them (module doc)
        # ... or, where the watermark lags (it passes a Python step as its bundles end), the oldest whole
        # micro-batch once this many events wait: arrivals out of order by less than the rest still land in order
        self.order_window = max(order_window, 2 * batch_size)
        self.cfg, self.batch_size, self.top_k, self.snapshot_every = cfg, batch_size, top_k, snapshot_every
        self.progress_s, self.sync_cfg, self.sync_location = progress_s, sync, sync_location
        self.alarm = SkippedStepsAlarm(alert_after)

    def close(self):
        self.printer.stop()

    def open(self, ctx: RuntimeContext):
        # one printer per Python worker: the steps of a worker share its board (core.progress)
        self.printer = progress.ProgressPrinter(self.progress_s, prefix="freshrec-flink: ").start()
        self.buffer = ctx.get_list_state(ListStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY()))
        self.snapshot = ctx.get_state(ValueStateDescriptor("snapshot", Types.PICKLED_BYTE_ARRAY()))
        self.journal = ctx.get_list_state(ListStateDescriptor("journal", Types.PICKLED_BYTE_ARRAY()))
        self.meta = ctx.get_state(ValueStateDescriptor("meta", Types.PICKLED_BYTE_ARRAY()))
        self.live: dict[int, tuple[IncrementalLearner, int]] = {}
        self.newest_ms = 0  # the newest event time this subtask has seen (where ticks stop at the end of input)
        group = metric_group(ctx)
        self.counters = {name: group.counter(name) for name in (
            "events_applied", "flushes", "rollbacks", "learner_restores", "steps_skipped_nonfinite",
            "sync_epochs_applied", "sync_publications", "alerts")}
        self.distributions = {name: group.distribution(name)
                              for name in ("flush_events", "prequential_logloss_micro", "freshness_lag_ms")}
        self.group, self.gauged = group, {}  # the shards' gauges, registered at their first flush here
        medium = FolderMedium(self.sync_location) if self.sync_location else None
        self.syncs = {} if medium is None or self.sync_cfg is None else \
            {s: ShardSync(self.sync_cfg, medium, s) for s in range(self.sync_cfg.shards)}

    def process_element(self, event, ctx):
        record = featurized_record(event)
        self.buffer.add(record)
        meta = self.meta.value() or {**new_meta(), "buffered": 0}
        meta["buffered"] += 1
        sync, event_ms = self.syncs.get(ctx.get_current_key()), ctx.timestamp()
        meta["newest_ms"] = max(meta.get("newest_ms", 0), event_ms)  # the shard's own, kept by its checkpoints
        self.newest_ms = max(self.newest_ms, meta["newest_ms"])
        if sync is not None and meta.get("tick_ms") is None:  # the shard's first event: start its epoch ticks
            meta["tick_ms"] = sync.cfg.end_of_epoch(event_ms)
            ctx.timer_service().register_event_time_timer(meta["tick_ms"])
        if self.ordered:  # a micro-batch is due once the watermark passes its newest event: a timer then
            meta["buffered_max_ms"] = max(meta.get("buffered_max_ms") or event_ms, event_ms)
            if meta["buffered"] >= self.batch_size and meta.get("ready_ms") is None:
                meta["ready_ms"] = meta["buffered_max_ms"]
                ctx.timer_service().register_event_time_timer(meta["ready_ms"])
        self.meta.update(meta)
        if self.ordered and meta["buffered"] >= self.order_window:
            yield from self._flush(ctx.get_current_key(), ctx.timer_service().current_watermark(), ctx)
        elif not self.ordered and meta["buffered"] >= self.batch_size:
            yield from self._flush(ctx.get_current_key())
        elif meta["buffered"] == 1:  # a timer registration is a message to the JVM: one per buffer, not per event
            ctx.timer_service().register_event_time_timer(END_OF_TIME)
            if self.flush_interval_ms:
                ctx.timer_service().register_processing_time_timer(int(time.time() * 1000) + self.flush_interval_ms)

    def on_timer(self, timestamp, ctx):
        if timestamp >= END_OF_TIME and ctx.time_domain() == TimeDomain.EVENT_TIME:
            if self.ordered:  # the whole micro-batches before the last tick, as they would have been learned
                yield from self._flush(ctx.get_current_key(), upto_ms=END_OF_TIME, ctx=ctx)
            self._last_tick(ctx.get_current_key())
            yield from self._flush(ctx.get_current_key())
        elif ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            yield from self._flush(ctx.get_current_key())
        else:  # an epoch's tick or (ordered) a micro-batch due; what is due is learned before a tick publishes
            meta = self.meta.value() or {}
            # synced shards: up to this timer's time only, so that their micro-batches and ticks take turns in
            # event-time order (one shard learning far ahead of the others' publications would wait on them);
            # otherwise, or at the end of the input, every whole micro-batch the watermark passed
            watermark = ctx.timer_service().current_watermark()
            upto = timestamp if self.syncs and watermark < END_OF_TIME else max(timestamp, watermark)
            if meta.get("ready_ms") is not None and upto >= meta["ready_ms"]:
                yield from self._flush(ctx.get_current_key(), upto_ms=upto, ctx=ctx)
            if not self.ordered or timestamp == meta.get("tick_ms"):
                self._on_time(ctx.get_current_key(), timestamp, ctx)

    def _on_time(self, shard: int, now_ms: int, ctx) -> None:
        """Event time left an epoch (the Beam steps' ticks, ``ShardSync.on_time``): the shard publishes what it
        has pending, or that it has nothing, so a quiet shard does not hold back the others' merges; then it
        ticks again at the end of the watermark's epoch (at the end of the input: of the newest event's, at once)."""
        sync, meta = self.syncs.get(shard), self.meta.value()
        if sync is None or meta is None:
            return
        watermark, ticks = ctx.timer_service().current_watermark(), [now_ms]
        if watermark < END_OF_TIME:
            meta["tick_ms"] = sync.cfg.end_of_epoch(max(now_ms, watermark))
            ctx.timer_service().register_event_time_timer(meta["tick_ms"])
        else:  # the input ended: the last tick at once, not by a timer (one set while the final watermark fires
            # the others may never fire: tests/test_flink_job.py failed on that now and then)
            self.newest_ms = max(self.newest_ms, meta.get("newest_ms", 0))
            if now_ms <= self.newest_ms:
                ticks.append(sync.cfg.end_of_epoch(self.newest_ms))
        self._tick(shard, sync, meta, ticks)

    def _last_tick(self, shard: int) -> None:
        """The input ended and this subtask's epoch ticks have all fired (their timers come first): tick at the
        end of the newest event's epoch, if this shard's last tick stopped short of it. It can after a restore
        with no event since: ``self.newest_ms`` does not survive one, and is gathered again, tick by tick, from
        the newest event time each shard keeps in its meta. A shard that stopped short would hold back every
        other shard's last merges (tests/flink_fakes.py)."""
        sync, meta = self.syncs.get(shard), self.meta.value()
        if sync is None or meta is None or meta.get("tick_ms") is None:
            return
        self._tick(shard, sync, meta, [sync.cfg.end_of_epoch(max(self.newest_ms, meta.get("newest_ms", 0)))])

    def _tick(self, shard: int, sync: ShardSync, meta: dict, ticks: list[int]) -> None:
        meta["tick_ms"] = max(meta.get("tick_ms") or 0, ticks[-1])
        for tick_ms in ticks:
            entry = sync_on_time(self.cfg, shard, tick_ms, meta, self._stored, self.live, shard, sync)
            if entry is not None:
                self.journal.add(entry)
                self.counters["sync_publications"].inc()
        self.meta.update(meta)

    def _stored(self) -> tuple[bytes | None, list[bytes]]:
        """The current shard's partition as Flink keeps it: its snapshot and journal (``model.journal`` loads a
        learner from them when this worker has none live)."""
        return self.snapshot.value(), list(self.journal.get() or [])

    def _gauge_shard(self, shard: int, learner: IncrementalLearner) -> None:
        """The shard's gauges under the Beam pipeline's names (transforms/update.py): its model version and
        table rows as of its last flush on this subtask, read by Flink at the end of each bundle."""
        if shard not in self.gauged:
            for name in ("model_version", "table_rows_item", "table_rows_user"):
                self.group.gauge(f"{name}_shard_{shard}", lambda shard=shard, name=name: self.gauged[shard][name])
        self.gauged[shard] = {"model_version": int(learner.version), "table_rows_item": len(learner.items),
                              "table_rows_user": len(learner.users)}

    def _flush(self, shard: int, upto_ms: int | None = None, ctx=None):
        """Flush the shard's buffer: all of it (no ``ctx``), or, ordered, in event-time order, the whole
        micro-batches of its events at or before ``upto_ms`` (a timer's time, the watermark) and those past the
        order window, keeping the rest buffered, with a timer for when its next micro-batch is due."""
        events = list(self.buffer.get() or [])
        if not events:
            return
        meta = self.meta.value()
        batches, rest = [events], []
        if self.ordered:
            events.sort(key=time_order)  # ties by their position in the input, else in arrival order
            due = len(events)
            if ctx is not None:
                due = max(sum(1 for e in events if e["event_time_ms"] <= upto_ms), due - self.order_window + self.batch_size)
                due -= due % self.batch_size
            batches = [events[i:i + self.batch_size] for i in range(0, due, self.batch_size)]
            rest = events[due:]
            # the next micro-batch is due once the watermark passes its newest event: the rest's batch_size-th
            meta["ready_ms"] = rest[self.batch_size - 1]["event_time_ms"] if len(rest) >= self.batch_size else None
            meta["buffered_max_ms"] = rest[-1]["event_time_ms"] if rest else None
            if ctx is not None and meta["ready_ms"] is not None:
                ctx.timer_service().register_event_time_timer(meta["ready_ms"])
        if rest:
            self.buffer.update(rest)
        else:
            self.buffer.clear()
        for batch in batches:
            yield from self._flush_batch(shard, batch, meta)
        meta["buffered"] = len(rest)
        self.meta.update(meta)

    def _flush_batch(self, shard: int, events: list[dict], meta: dict):
        now_ms = int(time.time() * 1000)
        done = flush_micro_batch(self.cfg, shard, events, meta, self._stored, self.live, shard, self.top_k,
                                 self.snapshot_every, emit_time_ms=now_ms, sync=self.syncs.get(shard), alarm=self.alarm)
        report = flush_report(shard, events, done, now_ms)
        self._gauge_shard(shard, done.learner)
        self.distributions["freshness_lag_ms"].update(max(0, now_ms - report["max_event_time_ms"]))
        for name, n in (("events_applied", len(events)), ("flushes", 1), ("rollbacks", report["rollbacks"]),
                        ("learner_restores", int(done.restored)), ("steps_skipped_nonfinite", report["skipped_nonfinite"]),
                        ("sync_epochs_applied", len(done.merged_epochs)),
                        ("sync_publications", int(done.published_epoch is not None)), ("alerts", len(done.alerts))):
            if n:
                self.counters[name].inc(n)
        self.distributions["flush_events"].update(len(events))
        loss = BinaryStats.from_dict(report["stats"]).logloss()
        if loss == loss:  # not nan
            self.distributions["prequential_logloss_micro"].update(int(loss * 1e6))
        progress.BOARD.note_flush(shard, len(events), done.learner.version, BinaryStats.from_dict(report["stats"]))
        yield REPORTS, report
        # a flush's scores (and deltas) as one element of JSON lines: the sink writes it as they are, and each
        # element is a round trip through the JVM
        if done.scores:
            yield "\n".join(json.dumps(record) for record in done.scores)
        if done.deltas:
            yield DELTA_RECORDS, "\n".join(json.dumps(record) for record in done.deltas)
        for rollback in done.result.rollbacks:
            yield ROLLBACK_RECORDS, json.dumps(rollback.to_record())
        for record in done.alerts:
            yield ALERT_RECORDS, json.dumps(record)
        if done.snapshot is not None:
            self.snapshot.update(done.snapshot)
            self.journal.clear()
        else:
            self.journal.add(done.journal_entry)
