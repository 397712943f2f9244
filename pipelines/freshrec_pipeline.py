"""The freshrec pipeline: read events, clean, featurize, update shard models, write scores/deltas/summary."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import schemas
from model.config import LearnerConfig, TableConfig
from transforms.clean import DEAD_LETTER, CleanEvents
from transforms.cleaning import CleanConfig
from transforms.featurize import FeaturizeEvents
from transforms.featurizers import FeatureConfig
from transforms.sinks import SummarizeRun, WriteAvroRecords
from transforms.sources import DATA_ENV, PRESETS, ReplayEvents, SyntheticConfig, SyntheticEvents, guess_preset
from transforms.update import DELTAS, REPORTS, ROLLBACKS, SCORES, UpdateConfig, UpdateShardModels

DAY_MS = 86_400_000


class FreshrecOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("freshrec")
        g.add_argument("--data", default=os.environ.get(DATA_ENV),
                       help=f"dataset file or folder to replay (default ${DATA_ENV}; none = synthetic stream)")
        g.add_argument("--data_format", default=None, choices=sorted(PRESETS),
                       help="column mapping preset (guessed from the path when omitted)")
        g.add_argument("--limit", type=int, default=None, help="replay only the first N events (in time order)")
        g.add_argument("--replay_rate", type=float, default=None,
                       help="pace the replay at this many events/s of processing time (streaming runs; default: as fast as read)")
        g.add_argument("--synthetic_events", type=int, default=20_000, help="events in the embedded synthetic stream")
        g.add_argument("--events_subscription", default=None,
                       help="read Avro events from this Pub/Sub subscription (projects/P/subscriptions/S); implies --streaming")
        g.add_argument("--scores_topic", default=None, help="publish scored outputs here (projects/P/topics/T)")
        g.add_argument("--deltas_topic", default=None, help="publish model deltas here")
        g.add_argument("--dead_letter_topic", default=None, help="publish dead letters here")
        g.add_argument("--rollbacks_topic", default=None, help="publish rollback records here")
        g.add_argument("--output_dir", default="out", help="where scores, deltas, dead letters and the summary go")
        g.add_argument("--output_window_s", type=int, default=0,
                       help="fixed event-time window for output files (0 = one window, for bounded runs)")
        g.add_argument("--shards", type=int, default=4)
        g.add_argument("--key_groups", type=int, default=1024,
                       help="key groups of the per-id keyed steps (dedupe, item and user features); see transforms.batching")
        g.add_argument("--mode", default="incremental", choices=["online", "incremental", "retrain"])
        g.add_argument("--batch_size", type=int, default=256, help="events per micro-batch (online mode: 1 step per event)")
        g.add_argument("--accumulate_steps", type=int, default=1)
        g.add_argument("--flush_interval_s", type=float, default=0.0,
                       help="also flush a non-empty buffer after this many seconds of processing time (0 = off; streaming)")
        g.add_argument("--optimizer", default="adagrad", choices=["adagrad", "ftrl", "sgd"])
        g.add_argument("--lr", type=float, default=0.05)
        g.add_argument("--dim", type=int, default=16)
        g.add_argument("--negatives", type=int, default=4)
        g.add_argument("--rating_threshold", type=float, default=4.0)
        g.add_argument("--admit_after", type=int, default=1, help="occurrences before an id gets an embedding row")
        g.add_argument("--embedding_ttl_days", type=float, default=0, help="evict rows idle this long (0 = never)")
        g.add_argument("--capacity", type=int, default=500_000, help="max rows per embedding table per shard")
        g.add_argument("--no_gate", action="store_true", help="disable the quality gate / rollback")
        g.add_argument("--gate_tolerance", type=float, default=0.15)
        g.add_argument("--feature_windows_s", default="3600,86400", help="sliding windows for counts, seconds")
        g.add_argument("--allowed_lateness_s", type=float, default=3600.0)
        g.add_argument("--dedupe_ttl_s", type=float, default=86400.0)
        g.add_argument("--state_ttl_days", type=float, default=30.0, help="drop per-user/item feature state idle this long")
        g.add_argument("--top_k", type=int, default=10)
        g.add_argument("--checkpoint_dir", default=None, help="also write atomic model checkpoints here")
        g.add_argument("--checkpoint_every", type=int, default=0, help="flushes between checkpoint files (0 = none)")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] for the update step")
        g.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class PipelineConfig:
    feature: FeatureConfig
    learner: LearnerConfig
    update: UpdateConfig
    clean: CleanConfig
    allowed_lateness_ms: int
    dedupe_ttl_ms: int
    state_ttl_ms: int
    output_dir: str
    output_window_s: int
    key_groups: int = 1024

    def __post_init__(self) -> None:
        if self.key_groups < 1:
            raise ValueError(f"PipelineConfig.key_groups must be >= 1, got {self.key_groups}")

    @classmethod
    def from_options(cls, opts: FreshrecOptions) -> PipelineConfig:
        o = opts.view_as(FreshrecOptions)
        windows = tuple(int(float(w) * 1000) for w in str(o.feature_windows_s).split(",") if w.strip())
        feature = FeatureConfig(windows_ms=windows, bucket_ms=max(1000, min(windows) // 12))
        ttl = int(o.embedding_ttl_days * DAY_MS) if o.embedding_ttl_days else None
        table = TableConfig(dim=o.dim, capacity=o.capacity, admit_after=o.admit_after, ttl_ms=ttl)
        learner = LearnerConfig(
            mode=o.mode, optimizer=o.optimizer, lr=o.lr, accumulate_steps=o.accumulate_steps, negatives=o.negatives,
            rating_threshold=o.rating_threshold, user_features=feature.user_width, item_features=feature.item_width,
            history=feature.history, user_table=table, item_table=table, gate=not o.no_gate,
            gate_tolerance=o.gate_tolerance, seed=o.seed, device=o.device)
        batch = 1 if o.mode == "online" else o.batch_size
        update = UpdateConfig(shards=o.shards, batch_size=batch, flush_interval_s=o.flush_interval_s or None, top_k=o.top_k,
                              checkpoint_dir=o.checkpoint_dir, checkpoint_every=o.checkpoint_every)
        return cls(feature, learner, update, CleanConfig(), int(o.allowed_lateness_s * 1000),
                   int(o.dedupe_ttl_s * 1000), int(o.state_ttl_days * DAY_MS), o.output_dir, o.output_window_s,
                   o.key_groups)


class RefreshModels(beam.PTransform):
    """Raw payloads -> {scores, deltas, rollbacks, reports, dead_letter}: the whole learning path."""

    def __init__(self, cfg: PipelineConfig, clock: Callable[[], float] = time.time):
        super().__init__()
        self.cfg, self.clock = cfg, clock

    def expand(self, payloads):
        cfg = self.cfg
        clean = payloads | "CleanEvents" >> CleanEvents(
            cfg.update.shards, cfg.allowed_lateness_ms, cfg.dedupe_ttl_ms, cfg.clean, cfg.key_groups)
        featurized = clean["events"] | "FeaturizeEvents" >> FeaturizeEvents(cfg.feature, cfg.state_ttl_ms, cfg.key_groups)
        updated = featurized | "UpdateShardModels" >> UpdateShardModels(cfg.learner, cfg.update, self.clock)
        return {**updated, DEAD_LETTER: clean[DEAD_LETTER]}


class ReadEvents(beam.PTransform):
    def __init__(self, opts: FreshrecOptions):
        super().__init__()
        self.opts = opts.view_as(FreshrecOptions)

    def expand(self, pbegin):
        o = self.opts
        if o.data:
            preset = o.data_format or guess_preset(o.data)
            return pbegin | "ReplayDataset" >> ReplayEvents(o.data, PRESETS[preset], o.limit, rate=o.replay_rate)
        synth = replace(SyntheticConfig(), events=o.synthetic_events, seed=7 + o.seed)
        return pbegin | "SyntheticDriftingStream" >> SyntheticEvents(synth)


def output_paths(output_dir: str) -> dict[str, str]:
    return {
        SCORES: os.path.join(output_dir, "scores"),
        DELTAS: os.path.join(output_dir, "deltas"),
        ROLLBACKS: os.path.join(output_dir, "rollbacks"),
        DEAD_LETTER: os.path.join(output_dir, "dead_letter"),
        "summary": os.path.join(output_dir, "summary.json"),
        "summaries": os.path.join(output_dir, "summaries"),  # one per window when --output_window_s is set
    }


def build_pipeline(p: beam.Pipeline, opts: FreshrecOptions, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    o = opts.view_as(FreshrecOptions)
    cfg = PipelineConfig.from_options(opts)
    paths = output_paths(cfg.output_dir)
    if o.events_subscription:
        from pipelines.pubsub import ReadEventsFromPubSub

        payloads, bad_messages = p | "ReadEventsFromPubSub" >> ReadEventsFromPubSub(o.events_subscription)
    else:
        payloads, bad_messages = p | "ReadEvents" >> ReadEvents(opts), None
    outputs = payloads | "RefreshModels" >> RefreshModels(cfg, clock)
    if bad_messages is not None:
        outputs[DEAD_LETTER] = (outputs[DEAD_LETTER], bad_messages) | "FlattenDeadLetters" >> beam.Flatten()
    w = cfg.output_window_s
    topics = {SCORES: o.scores_topic, DELTAS: o.deltas_topic, ROLLBACKS: o.rollbacks_topic, DEAD_LETTER: o.dead_letter_topic}
    schema_of = {SCORES: schemas.SCORED_OUTPUT, DELTAS: schemas.MODEL_DELTA, ROLLBACKS: schemas.ROLLBACK,
                 DEAD_LETTER: schemas.DEAD_LETTER}
    for tag, label in ((SCORES, "Scores"), (DELTAS, "Deltas"), (ROLLBACKS, "Rollbacks"), (DEAD_LETTER, "DeadLetters")):
        if topics[tag]:
            from pipelines.pubsub import PublishRecords

            outputs[tag] | f"Publish{label}" >> PublishRecords(topics[tag], schema_of[tag])
        else:
            outputs[tag] | f"Write{label}" >> WriteAvroRecords(paths[tag], schema_of[tag], w)
    (outputs[REPORTS], outputs[DEAD_LETTER]) | "SummarizeRun" >> SummarizeRun(
        None if w else paths["summary"], w, paths["summaries"])
    return {"outputs": outputs, "paths": paths, "config": cfg}


def make_options(argv: list[str] | None) -> FreshrecOptions:
    opts = PipelineOptions(argv)
    if opts.view_as(StandardOptions).runner is None:
        opts.view_as(StandardOptions).runner = "DirectRunner"
    fr = opts.view_as(FreshrecOptions)
    if fr.events_subscription:
        opts.view_as(StandardOptions).streaming = True
        if not fr.output_window_s:
            fr.output_window_s = 60
        if not fr.flush_interval_s:
            fr.flush_interval_s = 5.0
    return fr
