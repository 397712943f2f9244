"""The freshrec pipeline: read events, clean, featurize, update shard models, write scores/deltas/summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindows

import schemas
from core.layout import Layout
from core.readers import embedded_stream
from core.settings import ACK_CHECKPOINT_INTERVAL_S, STREAM_FLUSH_INTERVAL_S, PipelineConfig, add_flags, pipeline_config
from model.checkpoint import unacked_event_ids
from model.learner import IncrementalLearner
from pipelines.results import STATS, output_paths
from transforms.clean import DEAD_LETTER, CleanEvents
from transforms.direct_runner import tune_streaming_direct_runner
from transforms.featurize import FeaturizeEvents
from transforms.monitor import MonitorStream
from transforms.runtime import keep_each_steps_timers_apart, keep_runner_metrics_bounded
from transforms.sinks import SummarizeRun, WriteAvroRecords
from transforms.sources import FlowControl, ReplayEvents, SyntheticEvents
from transforms.update import ALERTS, DELTAS, REPORTS, ROLLBACKS, SCORES, UpdateShardModels

LEDGER_EVERY_S = 10.0  # a Pub/Sub run rewrites its summary.json (the ledger so far) this often


class FreshrecOptions(PipelineOptions):
    """freshrec's flags as Beam pipeline options: every group of ``core.settings``."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_flags(parser)


class RefreshModels(beam.PTransform):
    """Raw payloads -> {scores, deltas, rollbacks, alerts, reports, dead_letter, events (the clean ones), arrivals
    (decoded, as they arrived)}: the whole learning path."""

    def __init__(self, cfg: PipelineConfig, clock: Callable[[], float] = time.time, probe: Any = None):
        super().__init__()
        self.cfg, self.clock, self.probe = cfg, clock, probe

    def expand(self, payloads):
        cfg, update = self.cfg, self.cfg.update
        shards, groups = cfg.sharding.shards, cfg.sharding.key_groups
        applied_before = frozenset()
        if update.remember_unacked_ms and update.resume_from and update.checkpoint_dir:
            applied_before = unacked_event_ids(update.checkpoint_dir, update.resume_from, shards, cfg.learner)
        clean = payloads | "CleanEvents" >> CleanEvents(shards, cfg.allowed_lateness_ms, cfg.dedupe_ttl_ms, cfg.clean,
                                                         groups, applied_before)
        featurized = clean["events"] | "FeaturizeEvents" >> FeaturizeEvents(cfg.feature, cfg.state_ttl_ms, groups)
        updated = featurized | "UpdateShardModels" >> UpdateShardModels(
            cfg.learner, cfg.update, shards, self.clock, cfg.sharding.sync, cfg.sharding.sync_location, self.probe)
        return {**updated, DEAD_LETTER: clean[DEAD_LETTER], "events": clean["events"], "arrivals": clean["arrivals"]}


class ReadEvents(beam.PTransform):
    """``--data`` replayed with its ``layout`` (``PipelineConfig.layout``), or the synthetic stream."""

    def __init__(self, opts: FreshrecOptions, layout: Layout | None):
        super().__init__()
        self.opts, self.layout = opts.view_as(FreshrecOptions), layout

    def expand(self, pbegin):
        o, layout = self.opts, self.layout
        flow = FlowControl() if one_process_streaming(self.opts) else None
        if layout is not None:
            return pbegin | "ReplayDataset" >> ReplayEvents(o.data, layout.mapping, o.limit, rate=o.replay_rate,
                                                             max_bytes=o.max_event_bytes, flow=flow)
        return pbegin | "SyntheticDriftingStream" >> SyntheticEvents(embedded_stream(o.synthetic_events, o.seed), flow)


def one_process_streaming(opts: PipelineOptions) -> bool:
    """A streaming run on the DirectRunner: its steps share one process, so the source can wait for them."""
    std = opts.view_as(StandardOptions)
    return bool(std.streaming) and str(std.runner or "DirectRunner").split(".")[-1] in ("DirectRunner", "BundleBasedDirectRunner")


def acknowledging_durably(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` for a Pub/Sub run on the DirectRunner with ``--checkpoint_dir``, whose read acknowledges only
    what is in a checkpoint (``pipelines.pubsub_read``): each shard checkpoints after a flush, at most once per
    ``--checkpoint_every_s`` (default ``ACK_CHECKPOINT_INTERVAL_S``: torch.save of a shard every flush
    took 30% of the pipeline at 2,000 events/s) but at once while the read waits to acknowledge, and lists
    there the ids it applied that the read has not acknowledged yet, kept over restarts for the dedupe TTL."""
    update = replace(cfg.update, checkpoint_every=1, remember_unacked_ms=cfg.dedupe_ttl_ms,
                     checkpoint_every_s=cfg.update.checkpoint_every_s or ACK_CHECKPOINT_INTERVAL_S)
    return replace(cfg, update=update)


def build_pipeline(p: beam.Pipeline, opts: FreshrecOptions, clock: Callable[[], float] = time.time,
                   probe: Any = None) -> dict[str, Any]:
    o = opts.view_as(FreshrecOptions)
    cfg = pipeline_config(o)
    if o.events_subscription and o.checkpoint_dir and one_process_streaming(opts):
        cfg = acknowledging_durably(cfg)
    paths = output_paths(cfg.output_dir)
    keep_runner_metrics_bounded()  # the DirectRunner's engine: bounded metrics, and gauges that report their last value
    keep_each_steps_timers_apart()  # ... and each step's own timers
    tune_streaming_direct_runner()
    if one_process_streaming(opts):  # the steps set up at their first bundle, in this process: import what a
        IncrementalLearner(cfg.learner)  # learner needs (torch.optim loads torch._dynamo, ~2 s) before events wait
    if o.events_subscription:
        from pipelines.pubsub import ReadEventsFromPubSub
        from pipelines.pubsub_read import use_batched_pubsub_reads

        if one_process_streaming(opts):
            use_batched_pubsub_reads(o.ack_every_s)

        payloads, bad_messages = p | "ReadEventsFromPubSub" >> ReadEventsFromPubSub(o.events_subscription)
    else:
        payloads, bad_messages = p | "ReadEvents" >> ReadEvents(opts, cfg.layout), None
    outputs = payloads | "RefreshModels" >> RefreshModels(cfg, clock, probe)
    if bad_messages is not None:
        outputs[DEAD_LETTER] = (outputs[DEAD_LETTER], bad_messages) | "FlattenDeadLetters" >> beam.Flatten()
    w = cfg.output_window_s
    drift_alerts = None
    if cfg.stats_window_s:
        monitored = (outputs["events"], outputs[REPORTS], outputs[DEAD_LETTER], outputs["arrivals"]) | "MonitorStream" >> MonitorStream(
            cfg.stats_window_s, clock, bounded=not o.events_subscription)
        stats = monitored["stats"] if w else monitored["stats"] | "StatsInOneFile" >> beam.WindowInto(GlobalWindows())
        stats | "WriteWindowStats" >> WriteAvroRecords(paths[STATS], schemas.WINDOW_STATS, w)
        drift_alerts = monitored["alerts"]
        outputs[ALERTS] = (outputs[ALERTS], drift_alerts) | "FlattenAlerts" >> beam.Flatten()
    topics = {SCORES: o.scores_topic, DELTAS: o.deltas_topic, ROLLBACKS: o.rollbacks_topic, ALERTS: o.alerts_topic,
              DEAD_LETTER: o.dead_letter_topic}
    schema_of = {SCORES: schemas.SCORED_OUTPUT, DELTAS: schemas.MODEL_DELTA, ROLLBACKS: schemas.ROLLBACK,
                 ALERTS: schemas.ALERT, DEAD_LETTER: schemas.DEAD_LETTER}
    for tag, label in ((SCORES, "Scores"), (DELTAS, "Deltas"), (ROLLBACKS, "Rollbacks"), (ALERTS, "Alerts"),
                       (DEAD_LETTER, "DeadLetters")):
        if topics[tag]:
            from pipelines.pubsub import PublishRecords

            outputs[tag] | f"Publish{label}" >> PublishRecords(topics[tag], schema_of[tag])
        else:
            outputs[tag] | f"Write{label}" >> WriteAvroRecords(paths[tag], schema_of[tag], w)
    ledger_inputs = (outputs[REPORTS], outputs[DEAD_LETTER]) + ((drift_alerts,) if drift_alerts is not None else ())
    streaming = bool(opts.view_as(StandardOptions).streaming)
    ledger_inputs | "SummarizeRun" >> SummarizeRun(paths["summary"] if streaming or not w else None, w, paths["summaries"],
                                                   ledger=streaming, ledger_every_s=LEDGER_EVERY_S if o.events_subscription else 0)
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
            fr.flush_interval_s = STREAM_FLUSH_INTERVAL_S
    return fr
