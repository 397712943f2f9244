"""UpdateShardModels: one stateful DoFn per shard holds its model partition in Beam state.

Events arrive as micro-batches per shard (``RebatchByKey``). What is buffered plus what arrived is put
in event-time order and flushed in chunks of the shard's share of the micro-batch (``shard_batch_size``:
``batch_size`` over the shards; ``batch_size=1`` is online learning); the remainder waits in BagState
until that many are buffered, the watermark passes the newest
buffered event, or ``flush_interval_s`` of processing time after the buffer became non-empty. A flush scores first (prequential metrics),
takes one optimizer step, and emits refreshed scores for the touched users, a delta of exactly the
rows that changed, rollback records, and a report for the run summary.

The partition is kept in state as a snapshot (``IncrementalLearner.to_bytes``, loadable with
``weights_only=True``) plus a journal of the micro-batches applied since; the learner is
deterministic, so snapshot + journal replay rebuilds it exactly after a restart. A live copy is
cached per worker and used only while its flush count matches the one in state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.coders.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import schemas
from core.featurizers import featurized_record
from core.keyed_state import in_time_order
from core.progress import BOARD
from core.settings import UpdateConfig
from model.checkpoint import prune_checkpoints, remember_unacked, resume_shard, save_checkpoint, unacked_in
from model.config import LearnerConfig
from model.hashing import shard_of
from model.journal import flush_micro_batch, flush_report, live_learner, new_meta, sync_on_time
from model.learner import IncrementalLearner
from model.metrics import BinaryStats
from model.shard_sync import ShardSync
from model.sync import SyncConfig
from monitoring.alerts import SkippedStepsAlarm
from transforms.batching import rebatch_by
from transforms.coders import AvroRecordCoder
from transforms.medium import FileSystemsMedium
from transforms.runtime import tune_worker

SCORES, DELTAS, ROLLBACKS, REPORTS, ALERTS = "scores", "deltas", "rollbacks", "reports", "alerts"
NAMESPACE = "freshrec"

# Live learners of this worker, by (DoFn instance id, shard): (learner, flushes it has applied).
_LIVE: dict[tuple[str, int], tuple[IncrementalLearner, int]] = {}


class UpdateShardModel(beam.DoFn):
    BUFFER = BagStateSpec("buffer", AvroRecordCoder(schemas.FEATURIZED_EVENT))
    BUFFERED = CombiningValueStateSpec("buffered", VarIntCoder(), CountCombineFn())
    SNAPSHOT = ReadModifyWriteStateSpec("snapshot", BytesCoder())
    JOURNAL = BagStateSpec("journal", BytesCoder())
    META = ReadModifyWriteStateSpec("meta", FastPrimitivesCoder())
    WATERMARK_TIMER = TimerSpec("flush_at_watermark", TimeDomain.WATERMARK)
    DEFERS_CHECKPOINTS = False  # a processing-time timer saves a checkpoint put off by --checkpoint_every_s

    def __init__(self, learner_cfg: LearnerConfig, cfg: UpdateConfig, clock: Callable[[], float] = time.time,
                 sync: SyncConfig | None = None, sync_location: str | None = None, probe: Any = None, shards: int = 1):
        self.learner_cfg, self.cfg, self.clock, self.probe, self.shards = learner_cfg, cfg, clock, probe, shards
        self.sync_cfg, self.sync_location = sync, sync_location
        self.instance_id = uuid.uuid4().hex
        self.applied = Metrics.counter(NAMESPACE, "events_applied")
        self.flushes = Metrics.counter(NAMESPACE, "flushes")
        self.rollbacks = Metrics.counter(NAMESPACE, "rollbacks")
        self.restores = Metrics.counter(NAMESPACE, "learner_restores")
        self.skipped = Metrics.counter(NAMESPACE, "steps_skipped_nonfinite")
        self.merges = Metrics.counter(NAMESPACE, "sync_epochs_applied")
        self.publications = Metrics.counter(NAMESPACE, "sync_publications")
        self.resumed = Metrics.counter(NAMESPACE, "shards_resumed")
        self.alerts = Metrics.counter(NAMESPACE, "alerts")
        self.lag = Metrics.distribution(NAMESPACE, "freshness_lag_ms")
        self.loss = Metrics.distribution(NAMESPACE, "prequential_logloss_micro")
        self.flush_events = Metrics.distribution(NAMESPACE, "flush_events")
        self._gauges: dict[str, Any] = {}
        self.alarm = SkippedStepsAlarm(cfg.alert_skipped_flushes)

    def setup(self):
        IncrementalLearner(self.learner_cfg)  # what a first flush imports (torch.optim loads torch._dynamo, ~2 s), now
        tune_worker()
        self._syncs: dict[int, ShardSync] = {}
        self._medium = FileSystemsMedium(self.sync_location) if self.sync_location else None
        self._saved_at: dict[int, float] = {}  # shard -> processing time of its last checkpoint here

    def _sync(self, shard: int) -> ShardSync | None:
        if self.sync_cfg is None or self._medium is None:
            return None
        if shard not in self._syncs:
            self._syncs[shard] = ShardSync(self.sync_cfg, self._medium, shard)
        return self._syncs[shard]

    # -------------------------------------------------------------- triggers
    def process(
        self,
        element: tuple[int, list[dict[str, Any]]],
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        buffered=beam.DoFn.StateParam(BUFFERED),
        snapshot=beam.DoFn.StateParam(SNAPSHOT),
        journal=beam.DoFn.StateParam(JOURNAL),
        meta=beam.DoFn.StateParam(META),
        watermark_timer=beam.DoFn.TimerParam(WATERMARK_TIMER),
        timestamp=beam.DoFn.TimestampParam,
    ):
        yield from self._buffer(element, window, buffer, buffered, snapshot, journal, meta, watermark_timer, None,
                                timestamp)

    def _buffer(self, element, window, buffer, buffered, snapshot, journal, meta, watermark_timer, flush_timer,
                timestamp=None):
        shard, events = element
        if not events:  # a tick (BatchByShard): event time reached the element's timestamp
            if timestamp is not None:
                self._on_time(shard, timestamp.micros // 1000, snapshot, journal, meta)
            return
        records = [featurized_record(e) for e in events]
        count = buffered.read()
        state = meta.read() or _new_meta()
        newest = max(state.get("buffer_newest_ms") or 0, max(r["event_time_ms"] for r in records))
        if count + len(records) < self.cfg.shard_batch_size and not BOARD.flush_requested:  # still filling
            for record in records:
                buffer.add(record)
            buffered.add(len(records))
            if count == 0 and flush_timer is not None:
                flush_timer.set(Timestamp.of(self.clock() + self.cfg.flush_interval_s))
            state["buffer_newest_ms"] = newest
            meta.write(state)
            watermark_timer.set(Timestamp(micros=newest * 1000))
            return
        pending = in_time_order((list(buffer.read()) if count else []) + records)
        buffer.clear()
        buffered.clear()
        if flush_timer is not None:
            flush_timer.clear()
        size = self.cfg.shard_batch_size
        full = len(pending) if BOARD.flush_requested else len(pending) - len(pending) % size
        for start in range(0, full, size):
            yield from self._flush(shard, pending[start : start + size], window, snapshot, journal, state)
        rest = pending[full:]
        for record in rest:
            buffer.add(record)
        if rest:
            buffered.add(len(rest))
            if flush_timer is not None:
                flush_timer.set(Timestamp.of(self.clock() + self.cfg.flush_interval_s))
            state["buffer_newest_ms"] = max(r["event_time_ms"] for r in rest)
            watermark_timer.set(Timestamp(micros=state["buffer_newest_ms"] * 1000))
        else:
            self._checkpoint_later(shard, state, flush_timer)
        meta.write(state)

    def _on_time(self, shard, now_ms, snapshot, journal, meta):
        """Publish what the shard's sync has pending once its epoch is over, or that it has nothing
        (``ShardSync.on_time``): an idle shard does not hold back the other shards' merges."""
        sync = self._sync(shard)
        state = meta.read() or _new_meta()
        if sync is None or (self.cfg.resume_from and state["flushes"] == 0):
            return
        entry = sync_on_time(self.learner_cfg, shard, now_ms, state, lambda: (snapshot.read(), list(journal.read())),
                             _LIVE, (self.instance_id, shard), sync)
        if entry is not None:
            journal.add(entry)
            meta.write(state)
            self.publications.inc()

    @on_timer(WATERMARK_TIMER)
    def on_watermark(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        buffered=beam.DoFn.StateParam(BUFFERED),
        snapshot=beam.DoFn.StateParam(SNAPSHOT),
        journal=beam.DoFn.StateParam(JOURNAL),
        meta=beam.DoFn.StateParam(META),
    ):
        yield from self._flush_buffer(key, window, buffer, buffered, snapshot, journal, meta, None)

    def _flush_buffer(self, shard, window, buffer, buffered, snapshot, journal, meta, flush_timer):
        """Flush whatever is buffered (a timer fired)."""
        events = in_time_order(list(buffer.read()))
        buffer.clear()
        buffered.clear()
        if flush_timer is not None:
            flush_timer.clear()
        state = meta.read() or _new_meta()
        if events:
            yield from self._flush(shard, events, window, snapshot, journal, state)
        elif state.get("save_due"):  # a checkpoint put off by the interval (``_keep``): now
            learner, _ = live_learner(self.learner_cfg, shard, state, lambda: (snapshot.read(), list(journal.read())),
                                      _LIVE, (self.instance_id, shard), self._sync(shard))
            if learner.accumulating:  # mid-accumulation: saved after its step (``_keep``)
                return
            self._save(shard, learner, state)
        else:
            return
        self._checkpoint_later(shard, state, flush_timer)
        meta.write(state)

    def _checkpoint_later(self, shard, state, flush_timer) -> None:
        """A checkpoint ``_keep`` put off: the processing-time timer saves it when the interval is over."""
        if flush_timer is not None and state.get("save_due"):
            flush_timer.set(Timestamp.of(self._saved_at.get(shard, 0.0) + self.cfg.checkpoint_every_s))

    # -------------------------------------------------------------- the flush
    def _flush(self, shard, events, window, snapshot, journal, state):
        """One micro-batch through the learner; updates ``state`` (the shard's meta) in place."""
        now_ms = int(self.clock() * 1000)
        if self.cfg.resume_from and state["flushes"] == 0 and snapshot.read() is None:  # --resume_from: its checkpoint first
            resumed = resume_shard(self.cfg.checkpoint_dir, shard, self.cfg.resume_from, self.learner_cfg, state)
            if resumed is not None:
                snapshot.write(resumed)
                self.resumed.inc()
        done = flush_micro_batch(self.learner_cfg, shard, events, state, lambda: (snapshot.read(), list(journal.read())),
                                 _LIVE, (self.instance_id, shard), self.cfg.top_k, self.cfg.snapshot_every, now_ms,
                                 self._sync(shard), self.probe, self.alarm)
        learner, result = done.learner, done.result
        if done.restored:
            self.restores.inc()
        newest = max(e["event_time_ms"] for e in events)
        # Outputs carry the newest event time of the flush, in the batch's window. Built as windowed
        # values: a TimestampedValue costs a window assignment per record (a GlobalWindow() reads a proto).
        out_ts, windows = Timestamp(micros=newest * 1000), (window,)
        for record in done.scores:
            yield WindowedValue(record, out_ts, windows)
        for record in done.deltas:
            yield TaggedOutput(DELTAS, WindowedValue(record, out_ts, windows))
        for rb in result.rollbacks:
            self.rollbacks.inc()
            yield TaggedOutput(ROLLBACKS, WindowedValue(rb.to_record(), out_ts, windows))

        for alert in done.alerts:
            self.alerts.inc()
            yield TaggedOutput(ALERTS, WindowedValue(alert, out_ts, windows))

        report = flush_report(shard, events, done, now_ms)
        stats = BinaryStats.from_dict(report["stats"])
        BOARD.note_flush(shard, len(events), learner.version, stats)
        self.applied.inc(len(events))
        self.flushes.inc()
        self.skipped.inc(result.skipped_nonfinite)
        self.merges.inc(len(done.merged_epochs))
        self.publications.inc(done.published_epoch is not None)
        self._report_metrics(shard, learner, stats, now_ms - newest, len(events))
        yield TaggedOutput(REPORTS, WindowedValue(report, out_ts, windows))

        if done.snapshot is not None:
            snapshot.write(done.snapshot)
            journal.clear()
        else:
            journal.add(done.journal_entry)
        state["buffer_newest_ms"] = None
        self._keep(shard, learner, events, state)

    def _keep(self, shard: int, learner: IncrementalLearner, events: list[dict[str, Any]], state: dict[str, Any]) -> None:
        """Checkpoint every ``checkpoint_every`` flushes, and tell the board which applied events are durable (in
        a checkpoint; or applied, where the run writes none): a Pub/Sub read acknowledges only those. On
        streaming input with ``checkpoint_every_s``, one that comes sooner than that after the shard's last is
        put off (``save_due``: the interval timer saves it), unless a source waits to acknowledge. With
        ``remember_unacked_ms`` the checkpoint lists the ids applied since the read last acknowledged
        (``model.checkpoint.remember_unacked``), which a resumed run refuses when Pub/Sub redelivers them."""
        cfg = self.cfg
        state["applied"] = state.get("applied", 0) + len(events)
        if cfg.remember_unacked_ms:
            remember_unacked(state, events, BOARD.acks, cfg.remember_unacked_ms)
        if not (cfg.checkpoint_dir and cfg.checkpoint_every):
            BOARD.note_durable(len(events))
            return
        state["unsaved"] = state.get("unsaved", 0) + len(events)
        if state["flushes"] % cfg.checkpoint_every or learner.accumulating:
            return
        if self.DEFERS_CHECKPOINTS and cfg.checkpoint_every_s and not BOARD.flush_requested \
                and self.clock() < self._saved_at.get(shard, float("-inf")) + cfg.checkpoint_every_s:
            state["save_due"] = True
            return
        self._save(shard, learner, state)

    def _save(self, shard: int, learner: IncrementalLearner, state: dict[str, Any]) -> None:
        cfg = self.cfg
        assert cfg.checkpoint_dir
        save_checkpoint(learner, cfg.checkpoint_dir, {
            "delta_sequence": state["delta_seq"], "score_sequence": state["score_seq"], "shards": self.shards,
            "events_applied": state["applied"], "unacked_event_ids": unacked_in(state)}, cfg.run_id)
        prune_checkpoints(cfg.checkpoint_dir, shard, cfg.checkpoint_keep, cfg.run_id)
        BOARD.note_durable(state["unsaved"])
        state["unsaved"], state["save_due"] = 0, False
        self._saved_at[shard] = self.clock()


    def _report_metrics(self, shard: int, learner: IncrementalLearner, stats: BinaryStats, lag_ms: int, n: int) -> None:
        """Distributions per flush and the shard's gauges, for the runner's UI (pipelines/runner_metrics.py)."""
        self.lag.update(int(lag_ms))
        self.flush_events.update(n)
        loss = stats.logloss()
        if loss == loss:  # not nan
            self.loss.update(int(loss * 1e6))
        for name, value in (("model_version", learner.version), ("table_rows_item", len(learner.items)),
                            ("table_rows_user", len(learner.users))):
            key = f"{name}_shard_{shard}"
            if key not in self._gauges:
                self._gauges[key] = Metrics.gauge(NAMESPACE, key)
            self._gauges[key].set(int(value))


class UpdateShardModelWithIntervalFlush(UpdateShardModel):
    """Also flushes ``flush_interval_s`` of processing time after the buffer became non-empty (streaming).

    Processing-time timers keep the DirectRunner off its faster batch engine, so bounded runs use
    the base class: count and watermark flushes cover them."""

    FLUSH_TIMER = TimerSpec("flush_after_interval", TimeDomain.REAL_TIME)
    DEFERS_CHECKPOINTS = True

    def process(
        self,
        element: tuple[int, list[dict[str, Any]]],
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(UpdateShardModel.BUFFER),
        buffered=beam.DoFn.StateParam(UpdateShardModel.BUFFERED),
        snapshot=beam.DoFn.StateParam(UpdateShardModel.SNAPSHOT),
        journal=beam.DoFn.StateParam(UpdateShardModel.JOURNAL),
        meta=beam.DoFn.StateParam(UpdateShardModel.META),
        watermark_timer=beam.DoFn.TimerParam(UpdateShardModel.WATERMARK_TIMER),
        flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER),
        timestamp=beam.DoFn.TimestampParam,
    ):
        yield from self._buffer(element, window, buffer, buffered, snapshot, journal, meta, watermark_timer, flush_timer,
                                timestamp)

    @on_timer(FLUSH_TIMER)
    def on_interval(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(UpdateShardModel.BUFFER),
        buffered=beam.DoFn.StateParam(UpdateShardModel.BUFFERED),
        snapshot=beam.DoFn.StateParam(UpdateShardModel.SNAPSHOT),
        journal=beam.DoFn.StateParam(UpdateShardModel.JOURNAL),
        meta=beam.DoFn.StateParam(UpdateShardModel.META),
        flush_timer=beam.DoFn.TimerParam(FLUSH_TIMER),
    ):
        yield from self._flush_buffer(key, window, buffer, buffered, snapshot, journal, meta, flush_timer)


def _new_meta() -> dict[str, Any]:
    return {**new_meta(), "buffer_newest_ms": None}


class UpdateShardModels(beam.PTransform):
    """Micro-batches of featurized events (lists, as ``FeaturizeEvents`` emits them) -> {scores, deltas,
    rollbacks, alerts, reports}."""

    def __init__(self, learner_cfg: LearnerConfig, cfg: UpdateConfig, shards: int, clock: Callable[[], float] = time.time,
                 sync: SyncConfig | None = None, sync_location: str | None = None, probe: Any = None):
        """``probe(learner, events) -> (hits, probes)``: an evaluation run's Recall@K probe, called before
        each batch is learned (``bench/sharding.py``)."""
        super().__init__()
        if shards < 1:
            raise ValueError(f"UpdateShardModels: shards must be >= 1, got {shards}")
        self.learner_cfg, self.cfg, self.shards, self.clock = learner_cfg, cfg, shards, clock
        self.sync, self.sync_location, self.probe = sync, sync_location, probe

    def expand(self, events):
        shards = self.shards
        cls = UpdateShardModelWithIntervalFlush if self.cfg.flush_interval_s else UpdateShardModel
        dofn = cls(self.learner_cfg, self.cfg, self.clock, self.sync, self.sync_location, self.probe, shards)
        outputs = (
            events
            | "BatchByShard" >> rebatch_by(lambda e: shard_of(e["user_id"], shards), "BatchByShard",
                                           *((shards, self.sync.interval_ms) if self.sync else (0, 0)))
            | "UpdateShardModel" >> beam.ParDo(dofn).with_outputs(
                DELTAS, ROLLBACKS, ALERTS, REPORTS, main=SCORES)
        )
        return {tag: outputs[tag] for tag in (SCORES, DELTAS, ROLLBACKS, ALERTS, REPORTS)}
