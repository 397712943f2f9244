"""freshrec as a native PyFlink job (apache-flink 2.3, its own environment: scripts/setup_flink.sh).

The same runner-free core as the Beam pipeline, behind thin Flink adapters:

    FileSource (JSONL replay, checkpointed position)
      -> DecodeAndValidate (ProcessFunction; dead letters to a side output)
      -> key_by(key group of event_id)  DedupeEvents    (core.keyed_state.GroupStates, TTL)
      -> key_by(key group of item_id)   ItemPopularity  (GroupStates, core.featurizers)
      -> key_by(key group of user_id)   UserFeatures    (GroupStates, core.featurizers)
      -> key_by(shard)     UpdateShardModel    (ListState buffer, snapshot + journal state, model.learner)
      -> FileSink (exactly-once: part files are committed on checkpoints)
    events, flush reports, dead letters -> window statistics and drift alerts (pipelines/flink_monitor.py)

Micro-batches flush on count during the stream and once more when the input ends (an event-time
timer at the end of time), so batch boundaries, and therefore parameters, do not depend on timing:
a run killed and restored from its last checkpoint ends with exactly the parameters and outputs of
an uninterrupted run (tests/test_flink_job.py).

    ./run.sh export --data ../shared/datasets/movielens-100k --output /tmp/events.jsonl
    .venv-flink/bin/python -m pipelines.flink_job --input /tmp/events.jsonl --output out/flink --checkpoint_dir /tmp/ck
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyflink.common import Configuration, Duration, Encoder, Types, WatermarkStrategy  # noqa: E402
from pyflink.common.watermark_strategy import TimestampAssigner  # noqa: E402
from pyflink.datastream import (  # noqa: E402
    CheckpointingMode,
    OutputTag,
    RuntimeExecutionMode,
    StreamExecutionEnvironment,
)
from pyflink.datastream.connectors.file_system import FileSink, FileSource, OutputFileConfig, StreamFormat  # noqa: E402
from pyflink.datastream.functions import KeyedProcessFunction, ProcessFunction, RuntimeContext  # noqa: E402
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor  # noqa: E402

from core import progress  # noqa: E402  (by module: the worker's own board, not a pickled copy)
from core.cleaning import CleanConfig, InvalidEvent, decode_event, raw_bytes  # noqa: E402
from core.featurizers import ItemPopularity, UserFeaturizer  # noqa: E402
from core.keyed_state import GroupStates, key_group  # noqa: E402
from core.medium import FolderMedium, MediumError, check_medium  # noqa: E402
from core.settings import HelpFormatter, add_flags, pipeline_config, sync_location  # noqa: E402
from model.config import LearnerConfig  # noqa: E402
from model.hashing import shard_of  # noqa: E402
from model.journal import flush_micro_batch, flush_report, new_meta, sync_on_time  # noqa: E402
from model.learner import IncrementalLearner  # noqa: E402
from model.metrics import BinaryStats  # noqa: E402
from model.shard_sync import ShardSync  # noqa: E402
from model.sync import SyncConfig, parse_name  # noqa: E402
from monitoring.alerts import SkippedStepsAlarm  # noqa: E402

DEAD_LETTER = OutputTag("dead-letter", Types.STRING())
REPORTS = OutputTag("flush-reports", Types.PICKLED_BYTE_ARRAY())
END_OF_TIME = 2**62
MAX_OUT_OF_ORDERNESS_MS = 60_000  # transforms/sources.py's default


def _dead(payload: Any, reason: str, step: str, event: dict[str, Any] | None = None) -> str:
    return json.dumps({"kind": "dead_letter", "reason": reason, "step": step,
                       "event_id": None if event is None else event.get("event_id"),
                       "raw": raw_bytes(payload if event is None else event).decode("utf-8", "replace")})


class EventTime(TimestampAssigner):
    """A decoded event's time (the watermark trails the newest by ``MAX_OUT_OF_ORDERNESS_MS``, as the Beam source's)."""

    def extract_timestamp(self, value: dict[str, Any], record_timestamp: int) -> int:
        return int(value["event_time_ms"])


def metric_group(ctx: RuntimeContext):
    """The job's metrics, under the Beam pipeline's namespace and names (transforms/clean.py, transforms/update.py),
    so Flink's UI and its Prometheus reporter show what Beam's runners show."""
    return ctx.get_metrics_group().add_group("freshrec")


class DecodeAndValidate(ProcessFunction):
    def __init__(self, cfg: CleanConfig, throttle_ms: float = 0.0):
        self.cfg, self.throttle_ms = cfg, throttle_ms

    def open(self, ctx: RuntimeContext):
        group = metric_group(ctx)
        self.events_in, self.malformed = group.counter("events_in"), group.counter("dead_letter_malformed")

    def process_element(self, value: str, ctx):
        if self.throttle_ms:
            time.sleep(self.throttle_ms / 1000.0)
        progress.BOARD.note_read()
        self.events_in.inc()
        try:
            record = json.loads(value)
        except ValueError:
            progress.BOARD.note_dead()
            self.malformed.inc()
            yield DEAD_LETTER, _dead(value.encode(), "malformed: not JSON", "DecodeAndValidate")
            return
        try:
            yield decode_event(record, self.cfg)
        except InvalidEvent as exc:
            progress.BOARD.note_dead()
            self.malformed.inc()
            yield DEAD_LETTER, _dead(record, f"malformed: {exc.reason}", "DecodeAndValidate")


class KeyGroupFunction(KeyedProcessFunction):
    """Keyed by key group: the group's per-id states (``core.keyed_state.GroupStates``, with its event-time
    TTL) in one ValueState, as the Beam pipeline's ``KeyGroupStep``; ``handle`` does one event."""

    def __init__(self, ttl_ms: int):
        self.ttl_ms = ttl_ms

    def open(self, ctx: RuntimeContext):
        self.group = ctx.get_state(ValueStateDescriptor("group_states", Types.PICKLED_BYTE_ARRAY()))

    def handle(self, group: dict[str, Any], event: dict[str, Any]) -> Any:
        raise NotImplementedError

    def process_element(self, event, ctx):
        group = self.group.value() or GroupStates.new()
        out = self.handle(group, event)
        GroupStates.sweep(group, self.ttl_ms)
        self.group.update(group)
        yield out


class DedupeEvents(KeyGroupFunction):
    """Keyed by key group of the event id; an id is remembered for ``ttl_ms`` of event time."""

    def open(self, ctx: RuntimeContext):
        super().open(ctx)
        self.duplicates = metric_group(ctx).counter("dead_letter_duplicate")

    def handle(self, group, event):
        if GroupStates.seen(group, event["event_id"], event["event_time_ms"]):
            self.duplicates.inc()
            return DEAD_LETTER, _dead(None, "duplicate event_id", "DedupeEvents", event)
        return event


class AnnotateFeatures(KeyGroupFunction):
    """Keyed by key group of the id the featurizer keeps state for: the event with its features before it."""

    def __init__(self, featurizer: ItemPopularity | UserFeaturizer, ttl_ms: int):
        super().__init__(ttl_ms)
        self.featurizer = featurizer

    def handle(self, group, event):
        return self.featurizer.annotate(group, event)


class UpdateShardModel(KeyedProcessFunction):
    """Keyed by shard; the partition is a snapshot plus a journal of micro-batches in Flink state."""

    def __init__(self, cfg: LearnerConfig, batch_size: int, top_k: int, snapshot_every: int, progress_s: float = 0.0,
                 sync: SyncConfig | None = None, sync_location: str | None = None, alert_after: int = 3,
                 reports: bool = True):
        self.reports = reports  # flush reports to the REPORTS side output (an unread side output joins the main one)
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
        record = {k: event.get(k) for k in ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "value",
                                           "context", "user_features", "item_features", "history")}
        self.buffer.add(record)
        meta = self.meta.value() or {**new_meta(), "buffered": 0}
        meta["buffered"] += 1
        sync, event_ms = self.syncs.get(ctx.get_current_key()), ctx.timestamp()
        self.newest_ms = max(self.newest_ms, event_ms)
        if sync is not None and meta.get("tick_ms") is None:  # the shard's first event: start its epoch ticks
            meta["tick_ms"] = (sync.cfg.epoch_of(event_ms) + 1) * sync.cfg.interval_ms
            ctx.timer_service().register_event_time_timer(meta["tick_ms"])
        self.meta.update(meta)
        if meta["buffered"] >= self.batch_size:
            yield from self._flush(ctx.get_current_key())
        else:
            ctx.timer_service().register_event_time_timer(END_OF_TIME)

    def on_timer(self, timestamp, ctx):
        if timestamp >= END_OF_TIME:
            yield from self._flush(ctx.get_current_key())
        else:
            self._on_time(ctx.get_current_key(), timestamp, ctx)

    def _on_time(self, shard: int, now_ms: int, ctx) -> None:
        """Event time left an epoch (the Beam steps' ticks, ``ShardSync.on_time``): the shard publishes what it
        has pending, or that it has nothing, so a quiet shard does not hold back the others' merges; then it
        ticks again at the end of the watermark's epoch (at the end of the input: of the newest event's)."""
        sync, meta = self.syncs.get(shard), self.meta.value()
        if sync is None or meta is None:
            return
        watermark = ctx.timer_service().current_watermark()
        meta["tick_ms"] = now_ms
        if watermark < END_OF_TIME or now_ms <= self.newest_ms:
            horizon = max(now_ms, watermark if watermark < END_OF_TIME else self.newest_ms)
            meta["tick_ms"] = (sync.cfg.epoch_of(horizon) + 1) * sync.cfg.interval_ms
            ctx.timer_service().register_event_time_timer(meta["tick_ms"])
        entry = sync_on_time(self.cfg, shard, now_ms, meta, lambda: (self.snapshot.value(), list(self.journal.get() or [])),
                             self.live, shard, sync)
        if entry is not None:
            self.journal.add(entry)
            self.counters["sync_publications"].inc()
        self.meta.update(meta)

    def _gauge_shard(self, shard: int, learner: IncrementalLearner) -> None:
        """The shard's gauges under the Beam pipeline's names (transforms/update.py): its model version and
        table rows as of its last flush on this subtask, read by Flink at the end of each bundle."""
        if shard not in self.gauged:
            for name in ("model_version", "table_rows_item", "table_rows_user"):
                self.group.gauge(f"{name}_shard_{shard}", lambda shard=shard, name=name: self.gauged[shard][name])
        self.gauged[shard] = {"model_version": int(learner.version), "table_rows_item": len(learner.items),
                              "table_rows_user": len(learner.users)}

    def _flush(self, shard: int):
        events = list(self.buffer.get() or [])
        if not events:
            return
        self.buffer.clear()
        meta = self.meta.value()
        now_ms = int(time.time() * 1000)
        done = flush_micro_batch(self.cfg, shard, events, meta,
                                 lambda: (self.snapshot.value(), list(self.journal.get() or [])),
                                 self.live, shard, self.top_k, self.snapshot_every, emit_time_ms=now_ms,
                                 sync=self.syncs.get(shard), alarm=self.alarm)
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
        if self.reports:
            yield REPORTS, report
        for record in done.scores:
            yield json.dumps({"kind": "score", **record})
        for record in done.deltas:
            yield json.dumps({"kind": "delta", **record})
        for record in done.alerts:
            yield json.dumps({"kind": "alert", **record})
        if done.snapshot is not None:
            self.snapshot.update(done.snapshot)
            self.journal.clear()
        else:
            self.journal.add(done.journal_entry)
        meta["buffered"] = 0
        self.meta.update(meta)


def build(env: StreamExecutionEnvironment, args: argparse.Namespace) -> None:
    cfg = pipeline_config(args)
    shards, groups = cfg.sharding.shards, cfg.sharding.key_groups
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), args.input).build()
    # one reader and one decoder: the keyed steps see the input in its order, whatever their parallelism
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "ReplayEvents").uid("replay-source").set_parallelism(1)
    progress_s = 0.0 if args.quiet else args.progress_s
    events = (lines.process(DecodeAndValidate(cfg.clean, args.throttle_ms), output_type=Types.PICKLED_BYTE_ARRAY())
              .uid("decode").set_parallelism(1))
    # event time from the decoded events (a Python assigner given to from_source is not applied)
    watermarks = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(MAX_OUT_OF_ORDERNESS_MS))
                  .with_timestamp_assigner(EventTime()))
    stamped = events.assign_timestamps_and_watermarks(watermarks).uid("event-time").set_parallelism(1)
    unique = (stamped.key_by(lambda e: key_group(e["event_id"], groups), key_type=Types.INT())
              .process(DedupeEvents(cfg.dedupe_ttl_ms), output_type=Types.PICKLED_BYTE_ARRAY()).uid("dedupe"))
    with_items = (unique.key_by(lambda e: key_group(e["item_id"], groups), key_type=Types.INT())
                  .process(AnnotateFeatures(ItemPopularity(cfg.feature), cfg.state_ttl_ms), output_type=Types.PICKLED_BYTE_ARRAY())
                  .uid("item-features"))
    with_users = (with_items.key_by(lambda e: key_group(e["user_id"], groups), key_type=Types.INT())
                  .process(AnnotateFeatures(UserFeaturizer(cfg.feature), cfg.state_ttl_ms), output_type=Types.PICKLED_BYTE_ARRAY())
                  .uid("user-features"))
    outputs = (with_users.key_by(lambda e: shard_of(e["user_id"], shards), key_type=Types.INT())
               .process(UpdateShardModel(cfg.learner, cfg.update.shard_batch_size, cfg.update.top_k, args.snapshot_every,
                                         progress_s, cfg.sharding.sync, cfg.sharding.sync_location,
                                         cfg.update.alert_skipped_flushes, reports=bool(cfg.stats_window_s)),
                        output_type=Types.STRING())
               .uid("update-shard-model"))
    dead = (events.get_side_output(DEAD_LETTER)
            .union(unique.get_side_output(DEAD_LETTER)))
    sink = (FileSink.for_row_format(args.output, Encoder.simple_string_encoder())
            .with_output_file_config(OutputFileConfig.builder().with_part_prefix("part").with_part_suffix(".jsonl").build())
            .build())
    if cfg.stats_window_s:  # window statistics and drift alerts (pipelines/flink_monitor.py)
        from pipelines.flink_monitor import monitor_stream

        monitored = monitor_stream(unique, outputs.get_side_output(REPORTS), dead, cfg.stats_window_s)
        outputs = outputs.union(monitored)
    outputs.union(dead).sink_to(sink).uid("file-sink")


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", required=True, help="time-ordered JSONL of raw events (freshrec export writes one from any dataset)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--checkpoint_dir", required=True)
    ap.add_argument("--checkpoint_interval_ms", type=int, default=1000)
    ap.add_argument("--restore_from", default=None, help="a retained checkpoint (…/chk-N) to resume from")
    ap.add_argument("--snapshot_every", type=int, default=5, help="flushes between snapshots of a shard's learner")
    ap.add_argument("--bundle_size", type=int, default=5000,
                    help="elements per bundle of a Python step (Flink's python.fn-execution.bundle.size): larger runs "
                         "faster, smaller lets a checkpoint barrier through sooner where the Python steps fall behind")
    ap.add_argument("--bundle_time_ms", type=int, default=1000, help="longest a Python step's bundle stays open")
    ap.add_argument("--throttle_ms", type=float, default=0.0, help="sleep per input record (to stretch a test run)")
    ap.add_argument("--parallelism", type=int, default=1,
                    help="subtasks of every keyed step (shards and key groups spread over them); the source reads on one")
    ap.add_argument("--cluster", action="store_true",
                    help="submitted to a standing cluster (scripts/flink_cluster.sh submit): its restart strategy "
                         "and Python settings apply; without it the job runs on an in-process mini-cluster, no restarts")
    # the Beam pipeline's flags and defaults; this job does not implement lateness or processing-time flushes yet
    add_flags(ap, ("model", "stability", "state", "sharding"), skip=("flush_interval_s", "allowed_lateness_s"))
    add_flags(ap, ("run",), only=("progress_s", "quiet"))
    add_flags(ap, ("outputs",), only=("stats_window_s",))
    return ap


def sync_medium(args: argparse.Namespace) -> str | None:
    """The shards' sync folder (``--sync_dir``, default CHECKPOINT_DIR/sync), checked before the job starts:
    it must take a file, and a fresh run (no ``--restore_from``) must not find another run's publications."""
    args.sync_dir = args.sync_dir or os.path.join(args.checkpoint_dir, "sync")
    location = sync_location(args)
    if location is None:
        return None
    medium = FolderMedium(location)
    try:
        check_medium(medium)
    except MediumError as exc:
        raise SystemExit(f"flink_job: --sync_dir: {exc}") from exc
    if not args.restore_from and any(parse_name(n) for n in medium.names()):
        raise SystemExit(f"flink_job: --sync_dir {location} holds an earlier run's publications: pass --restore_from "
                         "to resume that run, or an empty --sync_dir")
    return location


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    try:
        sync_medium(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    conf = Configuration()
    conf.set_string("execution.checkpointing.dir", "file://" + os.path.abspath(args.checkpoint_dir))
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("execution.checkpointing.checkpoints-after-tasks-finish", "true")
    if not args.cluster:
        conf.set_string("restart-strategy.type", "none")
    # a bundle is one round trip to the Python worker, and small ones cost more than the steps themselves; but
    # a checkpoint barrier waits until the Python step has worked through what was sent to it
    conf.set_string("python.fn-execution.bundle.size", str(args.bundle_size))
    conf.set_string("python.fn-execution.bundle.time", str(args.bundle_time_ms))
    conf.set_string("python.execution-mode", "process")
    if os.environ.get("FRESHREC_FLINK_PROFILE"):
        conf.set_string("python.profile.enabled", "true")
    conf.set_string("python.executable", sys.executable)  # workers run in this (PyFlink) environment
    conf.set_string("python.client.executable", sys.executable)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    if args.restore_from:
        conf.set_string("execution.state-recovery.path", "file://" + os.path.abspath(args.restore_from))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_runtime_mode(RuntimeExecutionMode.STREAMING)
    env.set_parallelism(args.parallelism)
    env.enable_checkpointing(args.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)
    build(env, args)
    env.execute("freshrec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
