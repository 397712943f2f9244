"""freshrec as a native PyFlink job (apache-flink 2.3, its own environment: scripts/setup_flink.sh).

The same runner-free core as the Beam pipeline, behind thin Flink adapters:

    FileSource (a JSONL file, or a landing folder watched for new files; checkpointed position)
      -> DecodeAndValidate (ProcessFunction; dead letters to a side output)
      -> key_by(key group of event_id)  DedupeEvents    (lateness gate; core.keyed_state.GroupStates, TTL)
      -> key_by(key group of item_id)   ItemPopularity  (GroupStates, core.featurizers)
      -> key_by(key group of user_id)   UserFeatures    (GroupStates, core.featurizers)
      -> key_by(shard)     UpdateShardModel    (ListState buffer, snapshot + journal state, model.learner)
      -> FileSinks: scores/ deltas/ rollbacks/ alerts/ dead_letter/ (exactly once: committed on checkpoints)
    events, flush reports, dead letters -> window statistics and drift alerts (stats/, pipelines/flink_monitor.py)
    flush reports, dead letters, alerts -> SummarizeRun -> summary.json, printed at the end (pipelines/flink_io.py)

Micro-batches flush on count during the stream and once more when the input ends (an event-time
timer at the end of time), so batch boundaries, and therefore parameters, do not depend on timing:
a run killed and restored from its last checkpoint ends with exactly the parameters and outputs of
an uninterrupted run (tests/test_flink_job.py).

    .venv-flink/bin/python -m pipelines.flink_job --output out/flink --checkpoint_dir /tmp/ck   # synthetic
    .venv-flink/bin/python -m pipelines.flink_job --data ../shared/datasets/movielens-100k --output out/flink --checkpoint_dir /tmp/ck
    .venv-flink/bin/python -m pipelines.flink_job --input landing/ --watch_s 2 --output out/flink --checkpoint_dir /tmp/ck
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

from pyflink.common import Configuration, Duration, Row, Types, WatermarkStrategy  # noqa: E402
from pyflink.datastream import (  # noqa: E402
    CheckpointingMode,
    DataStream,
    KeyedStream,
    OutputTag,
    RuntimeExecutionMode,
    StreamExecutionEnvironment,
)
from pyflink.datastream.functions import KeyedProcessFunction, ProcessFunction, RuntimeContext  # noqa: E402
from pyflink.datastream.state import ValueStateDescriptor  # noqa: E402
from pyflink.java_gateway import get_gateway  # noqa: E402

from core import progress  # noqa: E402  (by module: the worker's own board, not a pickled copy)
from core.cleaning import CleanConfig, InvalidEvent, LatenessTracker, dead_letter, decode_event  # noqa: E402
from core.featurizers import ItemPopularity, UserFeaturizer  # noqa: E402
from core.keyed_state import GroupStates, key_group  # noqa: E402
from core.medium import FolderMedium, MediumError, check_medium  # noqa: E402
from core.settings import STREAM_FLUSH_INTERVAL_S, HelpFormatter, add_flags, pipeline_config, sync_location  # noqa: E402
from model.hashing import shard_of  # noqa: E402
from model.sync import parse_name  # noqa: E402
from pipelines import flink_io  # noqa: E402
from pipelines.flink_update import (  # noqa: E402
    ALERT_RECORDS,
    DELTA_RECORDS,
    REPORTS,
    ROLLBACK_RECORDS,
    UpdateShardModel,
    metric_group,
)
from pipelines.results import ALERTS, DEAD_LETTER, DELTAS, ROLLBACKS, SCORES, STATS  # noqa: E402

DEAD = OutputTag("dead-letter", Types.STRING())
MAX_OUT_OF_ORDERNESS_MS = 60_000  # transforms/sources.py's default


def _dead(payload: Any, reason: str, step: str, event: dict[str, Any] | None = None) -> str:
    """schemas/dead_letter.avsc as a JSON line (``raw`` as text)."""
    record = dead_letter(payload, reason, step, event)
    return json.dumps({**record, "raw": record["raw"].decode("utf-8", "replace")})


KEYED = Types.ROW([Types.INT(), Types.PICKLED_BYTE_ARRAY()])  # (key group of the event id, event)
DECODED = Types.TUPLE([KEYED, Types.LONG()])  # ... and its event time: what the decoder emits


def stamp_and_key(decoded: DataStream) -> KeyedStream:
    """The decoder's (key group, event) rows and event times -> its events with Flink timestamps and watermarks
    that trail the newest event by ``MAX_OUT_OF_ORDERNESS_MS`` (as the Beam source's), keyed by key group.

    What PyFlink's ``assign_timestamps_and_watermarks`` (with a Python TimestampAssigner) and ``key_by`` do, less
    their Python operators: each is one more round trip of every event through a Python worker, and the first
    ran at the job's default parallelism, so at parallelism 2 the events went round-robin to two extra subtasks
    and back (merged in an order that varied from run to run). The decoder computes both; the Java steps here
    are the ones PyFlink's methods use, all on the decoder's one subtask."""
    jvm = get_gateway().jvm
    python_time = jvm.org.apache.flink.streaming.api.functions.python.eventtime
    strategy = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(MAX_OUT_OF_ORDERNESS_MS))
                ._j_watermark_strategy.withTimestampAssigner(python_time.CustomTimestampAssigner()))
    stamped = decoded._j_data_stream.assignTimestampsAndWatermarks(strategy).uid("event-time").setParallelism(1)
    rows = DataStream(stamped.map(python_time.RemoveTimestampMapFunction(), KEYED.get_java_type_info())
                      .name("Remove-Timestamp").setParallelism(1))
    return KeyedStream(rows._j_data_stream.keyBy(jvm.KeyByKeySelector(), Types.ROW([Types.INT()]).get_java_type_info()),
                       Types.PICKLED_BYTE_ARRAY(), rows)


class DecodeAndValidate(ProcessFunction):
    """A raw line -> (key group of its event id, event) and its event time (``stamp_and_key``), or a dead letter."""

    def __init__(self, cfg: CleanConfig, groups: int, throttle_ms: float = 0.0):
        self.cfg, self.groups, self.throttle_ms = cfg, groups, throttle_ms

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
            yield DEAD, _dead(value.encode(), "malformed: not JSON", "DecodeAndValidate")
            return
        try:
            event = decode_event(record, self.cfg)
            yield Row(key_group(event["event_id"], self.groups), event), int(event["event_time_ms"])
        except InvalidEvent as exc:
            progress.BOARD.note_dead()
            self.malformed.inc()
            yield DEAD, _dead(record, f"malformed: {exc.reason}", "DecodeAndValidate")


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
    """Keyed by key group of the event id. Drops late events first (older than the watermark minus the
    allowed lateness, as the Beam pipeline's ``DropLateEvents``: Flink lets the step read its watermark),
    then duplicates: an id is remembered for ``ttl_ms`` of event time."""

    def __init__(self, ttl_ms: int, allowed_lateness_ms: int):
        super().__init__(ttl_ms)
        self.allowed_lateness_ms = allowed_lateness_ms

    def open(self, ctx: RuntimeContext):
        super().open(ctx)
        group = metric_group(ctx)
        self.duplicates, self.late = group.counter("dead_letter_duplicate"), group.counter("dead_letter_late")

    def process_element(self, event, ctx):
        tracker = LatenessTracker(self.allowed_lateness_ms)
        tracker.advance(ctx.timer_service().current_watermark())
        if tracker.is_late(event["event_time_ms"]):
            self.late.inc()
            yield DEAD, _dead(None, tracker.late_reason(event["event_time_ms"]), "DropLateEvents", event)
            return
        yield from super().process_element(event, ctx)

    def handle(self, group, event):
        if GroupStates.seen(group, event["event_id"], event["event_time_ms"], self.ttl_ms):
            self.duplicates.inc()
            return DEAD, _dead(None, "duplicate event_id", "DedupeEvents", event)
        return event


class AnnotateFeatures(KeyGroupFunction):
    """Keyed by key group of the id the featurizer keeps state for: the event with its features before it."""

    def __init__(self, featurizer: ItemPopularity | UserFeaturizer, ttl_ms: int):
        super().__init__(ttl_ms)
        self.featurizer = featurizer

    def handle(self, group, event):
        return self.featurizer.annotate(group, event, self.ttl_ms)


def build(env: StreamExecutionEnvironment, args: argparse.Namespace, input_path: str, paths: dict[str, str]) -> None:
    cfg = pipeline_config(args)
    shards, groups = cfg.sharding.shards, cfg.sharding.key_groups
    source = flink_io.source(input_path, args.watch_s)
    # one reader and one decoder: the keyed steps see the input in its order, whatever their parallelism
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "ReplayEvents").uid("replay-source").set_parallelism(1)
    progress_s = 0.0 if args.quiet else args.progress_s
    events = (lines.process(DecodeAndValidate(cfg.clean, groups, args.throttle_ms), output_type=DECODED)
              .uid("decode").name("DecodeAndValidate").set_parallelism(1))
    # event time from the decoded events (an assigner given to from_source is not applied), keyed by event id
    unique = (stamp_and_key(events)
              .process(DedupeEvents(cfg.dedupe_ttl_ms, cfg.allowed_lateness_ms), output_type=Types.PICKLED_BYTE_ARRAY())
              .uid("dedupe").name("DropLateAndDuplicateEvents"))
    with_items = (unique.key_by(lambda e: key_group(e["item_id"], groups), key_type=Types.INT())
                  .process(AnnotateFeatures(ItemPopularity(cfg.feature), cfg.state_ttl_ms), output_type=Types.PICKLED_BYTE_ARRAY())
                  .uid("item-features").name("ItemPopularity"))
    with_users = (with_items.key_by(lambda e: key_group(e["user_id"], groups), key_type=Types.INT())
                  .process(AnnotateFeatures(UserFeaturizer(cfg.feature), cfg.state_ttl_ms), output_type=Types.PICKLED_BYTE_ARRAY())
                  .uid("user-features").name("UserFeatures"))
    flush_s = cfg.update.flush_interval_s or (STREAM_FLUSH_INTERVAL_S if args.watch_s else 0.0)
    scores = (with_users.key_by(lambda e: shard_of(e["user_id"], shards), key_type=Types.INT())
              .process(UpdateShardModel(cfg.learner, cfg.update.shard_batch_size, cfg.update.top_k, args.snapshot_every,
                                        progress_s, cfg.sharding.sync, cfg.sharding.sync_location,
                                        cfg.update.alert_skipped_flushes, int(flush_s * 1000), ordered=not (args.watch_s or args.arrival_order),
                                        order_window=args.bundle_size + cfg.update.shard_batch_size),
                       output_type=Types.STRING())
              .uid("update-shard-model").name("UpdateShardModel"))
    dead = events.get_side_output(DEAD).union(unique.get_side_output(DEAD))
    reports = scores.get_side_output(REPORTS)
    alerts, drift_alerts = scores.get_side_output(ALERT_RECORDS), None
    if cfg.stats_window_s:  # window statistics and drift alerts (pipelines/flink_monitor.py)
        from pipelines.flink_monitor import monitor_stream

        stats, drift_alerts = monitor_stream(unique, reports, dead, cfg.stats_window_s)
        flink_io.sink_to_folder(stats, paths[STATS], STATS)
        alerts = alerts.union(drift_alerts)
    for name, stream in ((SCORES, scores), (DELTAS, scores.get_side_output(DELTA_RECORDS)),
                         (ROLLBACKS, scores.get_side_output(ROLLBACK_RECORDS)), (ALERTS, alerts), (DEAD_LETTER, dead),
                         (flink_io.SUMMARY_PARTS, flink_io.summarize(reports, dead, drift_alerts))):
        flink_io.sink_to_folder(stream, paths[name], name)


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--input", default=None,
                    help="time-ordered JSONL of raw events (freshrec export writes one), or a landing folder of such "
                         "files (see --watch_s); without it: --data, or the synthetic stream")
    ap.add_argument("--watch_s", type=float, default=0.0,
                    help="watch the --input folder: list it every this many seconds and read new files as they land "
                         "(an unbounded run: stop it with Ctrl-C or flink cancel; 0: read what is there and end)")
    ap.add_argument("--output", required=True, help="folder of the outputs: scores/ deltas/ rollbacks/ alerts/ "
                    "dead_letter/ stats/ (JSON lines of the Avro records) and summary.json")
    ap.add_argument("--checkpoint_dir", required=True)
    ap.add_argument("--checkpoint_interval_ms", type=int, default=1000)
    ap.add_argument("--restore_from", default=None, help="a retained checkpoint (…/chk-N) to resume from")
    ap.add_argument("--snapshot_every", type=int, default=5, help="flushes between snapshots of a shard's learner")
    ap.add_argument("--bundle_size", type=int, default=5000,
                    help="elements per bundle of a Python step (Flink's python.fn-execution.bundle.size): larger runs "
                         "faster; smaller lets a checkpoint barrier through sooner where the Python steps fall behind "
                         "and, at --parallelism above 1, interleaves the subtasks' events more finely, nearer the "
                         "input's order (AUC against time: docs/benchmarks.md, Engines); on a bounded input, also "
                         "the most events a shard holds to cut its micro-batches in event-time order")
    ap.add_argument("--bundle_time_ms", type=int, default=1000, help="longest a Python step's bundle stays open")
    ap.add_argument("--arrival_order", action="store_true",
                    help="on a bounded input too, cut a shard's micro-batches in the order its events arrive (as a "
                         "watched folder's always are): no wait for the watermark, but at --parallelism above 1 they "
                         "then vary from run to run, and so does the AUC (docs/benchmarks.md, Engines)")
    ap.add_argument("--throttle_ms", type=float, default=0.0, help="sleep per input record (to stretch a test run)")
    ap.add_argument("--parallelism", type=int, default=1,
                    help="subtasks of every keyed step (shards and key groups spread over them); the source reads on one")
    ap.add_argument("--cluster", action="store_true",
                    help="submitted to a standing cluster (scripts/flink_cluster.sh submit): its restart strategy "
                         "and Python settings apply; without it the job runs on an in-process mini-cluster, no restarts")
    # the Beam pipeline's flags and defaults
    add_flags(ap, ("input",), only=("data", "data_format", "columns", "time_unit", "limit", "synthetic_events"))
    add_flags(ap, ("model", "stability", "state", "sharding"))
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
        input_path = flink_io.prepare_input(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"flink_job: {exc}", file=sys.stderr)
        return 2
    paths = flink_io.start_outputs(args)
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
    build(env, args, input_path, paths)
    env.execute("freshrec")
    return flink_io.finish_run(paths, input_path, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
