"""One configuration for every entry point: the flags, their defaults, and the configs they build.

Every flag is declared once, in ``FLAGS``, with its group, default and one sentence of help. The
Beam pipeline's options, the PyFlink job, the consumer, the publisher and the benchmarks add the
groups they take with ``add_flags`` and build their configs with ``pipeline_config``, so a default
changed here changes it everywhere (``tests/test_settings.py`` checks that no entry point declares
its own). Beam-free: the consumer and the publisher import it without importing Beam.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_flags(parser, ("model", "sharding"))
>>> cfg = pipeline_config(parser.parse_args(["--shards", "2", "--dim", "8"]))
>>> cfg.sharding.shards, cfg.learner.dim, cfg.update.batch_size
(2, 8, 256)
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from core.cleaning import CleanConfig
from core.featurizers import FeatureConfig
from core.layout import Layout, resolve_layout
from core.readers import DATA_ENV, PRESETS, TIME_UNITS
from core.records import MAX_EVENT_BYTES
from model.config import MODES, OPTIMIZERS, LearnerConfig, TableConfig
from model.sync import SHARABLE, SyncConfig

DAY_MS = 86_400_000
ACK_CHECKPOINT_INTERVAL_S = 3.0  # a Pub/Sub run with checkpoints: a shard checkpoints at most this often between acks
STREAM_FLUSH_INTERVAL_S = 5.0  # an unbounded input's partial batches flush after this, unless --flush_interval_s says


@dataclass(frozen=True)
class Flag:
    """One command-line flag. A flag whose default is ``False`` and that has no ``type`` is a switch."""

    name: str
    group: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    bound: str | None = None  # ">=N" or ">N": what a number must be (None, where allowed, passes)


GROUPS: dict[str, str] = {
    "input": "input: where events come from",
    "model": "model: the learner of each shard",
    "stability": "stability: the quality gate and rollback",
    "state": "cleaning and state: lateness, dedupe and feature-state lifetimes",
    "sharding": "sharding: how events spread over keyed steps",
    "outputs": "outputs: scores, deltas, dead letters, checkpoints",
    "run": "run: what the command line checks and prints",
}

FLAGS: tuple[Flag, ...] = (
    # input
    Flag("data", "input", os.environ.get(DATA_ENV), f"dataset file or folder to replay (${DATA_ENV}; none: the synthetic stream)"),
    Flag("data_format", "input", None, "force a column mapping preset instead of recognising the layout", choices=tuple(sorted(PRESETS))),
    Flag("columns", "input", None, "override the recognised columns: user_id=COL,item_id=COL,event_time=COL,value=COL,event_type=COL|TYPE"),
    Flag("time_unit", "input", None, "unit of the time column (recognised from its values when omitted)", choices=TIME_UNITS),
    Flag("value_range", "input", None, "LOW,HIGH: the domain of value (a rating scale); events outside it are dead-lettered"),
    Flag("max_event_bytes", "input", MAX_EVENT_BYTES, "a record longer than this is dead-lettered (too_large) before it is parsed", int, bound=">=1"),
    Flag("limit", "input", None, "replay only the first N events in time order", int, bound=">=1"),
    Flag("replay_rate", "input", None, "pace the replay at this many events/s of processing time (streaming runs)", float, bound=">0"),
    Flag("synthetic_events", "input", 20_000, "events in the embedded synthetic stream", int, bound=">=1"),
    Flag("events_subscription", "input", None, "read Avro events from this Pub/Sub subscription (projects/P/subscriptions/S); implies --streaming"),
    Flag("ack_every_s", "input", 30.0, "a Pub/Sub run on the DirectRunner acknowledges what it read once all of it "
         "is applied (with --checkpoint_dir: in a checkpoint) or dead-lettered, at most this often; a pull "
         "unacknowledged this long pauses the reading until it is", float, bound=">0"),
    # model
    Flag("mode", "model", "incremental", "online: one step per event; incremental: one step per micro-batch", choices=MODES),
    Flag("batch_size", "model", 256, "events per micro-batch of the whole stream: each of N shards steps every "
         "ceil(batch_size/N) of its own events, so more shards do not make the model staler (online mode: 1)", int, bound=">=1"),
    Flag("accumulate_steps", "model", 1, "micro-batches whose gradients are summed before one optimizer step", int, bound=">=1"),
    Flag("flush_interval_s", "model", 0.0, "also flush a non-empty buffer after this many seconds of processing time "
         f"(0: off; on Pub/Sub or a watched folder: {STREAM_FLUSH_INTERVAL_S:g})", float, bound=">=0"),
    Flag("optimizer", "model", "adagrad", "row-wise optimizer of the embedding tables", choices=OPTIMIZERS),
    Flag("lr", "model", 0.05, "learning rate of the embedding tables", float, bound=">0"),
    Flag("dim", "model", 16, "embedding width", int, bound=">=1"),
    Flag("negatives", "model", 4, "negatives sampled per positive event from the item table", int, bound=">=0"),
    Flag("rating_threshold", "model", 4.0, "a rating at or above this is a positive", float),
    Flag("admit_after", "model", 1, "occurrences of an id before it gets an embedding row", int, bound=">=1"),
    Flag("embedding_ttl_days", "model", 0.0, "evict embedding rows idle this long in event time (0: never)", float, bound=">=0"),
    Flag("capacity", "model", 500_000, "most rows per embedding table per shard", int, bound=">=1"),
    Flag("feature_windows_s", "model", "3600,86400", "sliding event-time windows of the count features, seconds"),
    Flag("top_k", "model", 10, "items in each refreshed score record", int, bound=">=1"),
    Flag("device", "model", "auto", "auto | cpu | cuda[:N] for the update step"),
    Flag("seed", "model", 0, "seed of the model and the synthetic stream", int),
    # stability
    Flag("no_gate", "stability", False, "turn the quality gate (and rollback) off"),
    Flag("alert_skipped_flushes", "stability", 3, "consecutive flushes of a shard with every step skipped for "
         "non-finite values before an alert (then at 2x, 4x, ...)", int, bound=">=1"),
    Flag("gate_tolerance", "stability", 0.15, "roll back when the candidate's logloss exceeds the last good version's by this fraction", float, bound=">=0"),
    # cleaning and state
    Flag("allowed_lateness_s", "state", 3600.0, "events older than the watermark by more than this are dead-lettered", float, bound=">=0"),
    Flag("dedupe_ttl_s", "state", 86400.0, "how long an event id is remembered for dedupe, event time", float, bound=">0"),
    Flag("state_ttl_days", "state", 30.0, "drop per-user and per-item feature state idle this long", float, bound=">0"),
    # sharding
    Flag("shards", "sharding", 4, "model shards (users are hashed to shards)", int, bound=">=1"),
    Flag("sync_dir", "sharding", None, "where shards share what they learn together (--sync_share): a folder every worker "
         "reaches (gs://... on Dataflow); a run writes under RUN_ID/ in it (none: OUTPUT_DIR/sync, with --shards > 1; "
         "streaming runs only on the DirectRunner)"),
    Flag("no_sync", "sharding", False, "shards learn everything alone (nothing of --sync_share is shared)"),
    Flag("sync_interval_s", "sharding", 60.0, "event time of a sync epoch: a shard publishes its changes once event "
         "time passes into a later one", float, bound=">0"),
    Flag("sync_keep_s", "sharding", 3600.0, "event time of sync publications kept behind the oldest snapshot any "
         "shard could be restored to; older ones are removed, so the sync folder stays bounded (0: keep all). A "
         "restore that needs removed ones stops with an error", float, bound=">=0"),
    Flag("sync_merge", "sharding", "sum", "how the shards' changes merge: their sum, or FedAvg's example-weighted mean",
         choices=("sum", "mean")),
    Flag("sync_share", "sharding", "items,bias,item_mlp", "what the shards learn together: items (row values and side features, "
         "always), state (the item rows' optimizer state), bias (the global bias), mlps (the feature MLPs), item_mlp "
         "(the item-feature MLP alone)"),
    Flag("key_groups", "sharding", 1024, "key groups of the per-id keyed steps (dedupe, item and user features)", int, bound=">=1"),
    # outputs
    Flag("output_dir", "outputs", "out", "where scores, deltas, rollbacks, alerts, dead letters and the summary go"),
    Flag("output_window_s", "outputs", 0, "fixed event-time window of the output files (0: one window, for bounded runs)", int, bound=">=0"),
    Flag("stats_window_s", "outputs", 3600, "event-time window of the stream statistics (stats/) and of the drift "
         "detectors that watch them (alerts/); freshrec report plots them (0: off)", int, bound=">=0"),
    Flag("scores_topic", "outputs", None, "publish scores to this Pub/Sub topic (projects/P/topics/T) instead of files"),
    Flag("deltas_topic", "outputs", None, "publish model deltas to this topic"),
    Flag("rollbacks_topic", "outputs", None, "publish rollback records to this topic"),
    Flag("alerts_topic", "outputs", None, "publish alert records (schemas/alert.avsc) to this topic"),
    Flag("dead_letter_topic", "outputs", None, "publish dead letters to this topic"),
    Flag("checkpoint_dir", "outputs", None, "also write atomic model checkpoints here"),
    Flag("checkpoint_every", "outputs", 0, "flushes between checkpoint files (0: none; a Pub/Sub run on the "
         "DirectRunner with --checkpoint_dir: 1, whatever is given, so that what it acknowledges is on disk)", int, bound=">=0"),
    Flag("checkpoint_every_s", "outputs", 0.0, "at most one checkpoint per shard per this many seconds of processing "
         "time, on streaming input (0: every --checkpoint_every flushes; a Pub/Sub run on the DirectRunner with "
         f"--checkpoint_dir: {ACK_CHECKPOINT_INTERVAL_S:g}); a source about to acknowledge, or a drain, gets one at once",
         float, bound=">=0"),
    Flag("run_id", "outputs", None, "names this run's checkpoints, which sort after earlier runs' (default: its start time)"),
    Flag("checkpoint_keep", "outputs", 5, "checkpoint files of this run kept per shard (older ones are deleted; "
         "other runs' stay)", int, bound=">=1"),
    Flag("resume_from", "outputs", None, "start each shard from the newest readable checkpoint in --checkpoint_dir of "
         "this run id ('latest': the newest other run's); versions and sequences continue from it"),
    # run
    Flag("batch_max_events", "run", 200_000, "a bounded DirectRunner run of more input events than this runs as a "
         "flow-controlled stream, in bounded memory (the batch engine holds each step's whole output; 0: always)",
         int, bound=">=0"),
    Flag("max_dead_letter_fraction", "run", 0.5, "fail the run (exit 1) when more than this fraction of its input is dead-lettered", float, bound=">=0"),
    Flag("progress_s", "run", 10.0, "print a progress line this often, seconds (0: never)", float, bound=">=0"),
    Flag("quiet", "run", False, "print no progress lines"),
    Flag("debug", "run", False, "show the traceback of an error instead of one line"),
)

DEFAULTS: dict[str, Any] = {f.name: f.default for f in FLAGS}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a description's layout and shows each option's default (once: the shared flags carry theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS, False) or action.required:
            return text
        return f"{text} (default: {action.default})".strip()


def add_flags(parser: argparse.ArgumentParser, groups: Iterable[str] = tuple(GROUPS),
              skip: Iterable[str] = (), only: Iterable[str] | None = None) -> None:
    """Add the flags of ``groups`` (all by default), but ``skip`` (or ``only`` those named), to ``parser``,
    one argument group each."""
    skip, keep = set(skip), None if only is None else set(only)
    unknown = (skip | (keep or set())) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"add_flags: no such flags {sorted(unknown)}")
    for group in groups:
        g = parser.add_argument_group(GROUPS[group])
        for flag in FLAGS:
            if flag.group != group or flag.name in skip or (keep is not None and flag.name not in keep):
                continue
            shown = "off" if flag.default is False else "none" if flag.default is None else flag.default
            text = f"{flag.help} (default: {shown})"
            if flag.type is None and flag.default is False:
                g.add_argument(f"--{flag.name}", action="store_true", help=text)
            else:
                g.add_argument(f"--{flag.name}", default=flag.default, type=flag.type or str, choices=flag.choices,
                               help=text)


def check_flags(ns: Any) -> None:
    """ValueError naming the first flag whose value is out of its bound (e.g. ``--shards must be >= 1, got 0``)."""
    for flag in FLAGS:
        value = getattr(ns, flag.name, None)
        if flag.bound is None or value is None:
            continue
        strict, low = flag.bound.startswith(">") and not flag.bound.startswith(">="), float(flag.bound.lstrip(">="))
        if value < low or (strict and value == low):
            raise ValueError(f"--{flag.name} must be {flag.bound.replace('>=', '>= ').replace('>0', '> 0')}, got {value}")
    fraction = getattr(ns, "max_dead_letter_fraction", None)
    if fraction is not None and fraction > 1:
        raise ValueError(f"--max_dead_letter_fraction must be at most 1, got {fraction}")


def _get(ns: Any, name: str) -> Any:
    return getattr(ns, name, DEFAULTS[name])


@dataclass(frozen=True)
class ShardingConfig:
    """Pipeline-wide: how many model shards, how many key groups the per-id keyed steps use, and how the
    shards share their global parameters (``sync``, at ``sync_location``; None: they do not)."""

    shards: int = DEFAULTS["shards"]
    key_groups: int = DEFAULTS["key_groups"]
    sync: SyncConfig | None = None
    sync_location: str | None = None

    def __post_init__(self) -> None:
        if (self.sync is None) != (self.sync_location is None):
            raise ValueError("ShardingConfig: sync and sync_location go together")
        if self.shards < 1:
            raise ValueError(f"ShardingConfig.shards must be >= 1, got {self.shards}")
        if self.key_groups < 1:
            raise ValueError(f"ShardingConfig.key_groups must be >= 1, got {self.key_groups}")


@dataclass(frozen=True)
class UpdateConfig:
    """How a shard's update step flushes and publishes (the learner itself is ``LearnerConfig``)."""

    batch_size: int = DEFAULTS["batch_size"]  # events per micro-batch of the whole stream (--batch_size)
    flush_interval_s: float | None = None
    top_k: int = DEFAULTS["top_k"]
    snapshot_every: int = 50
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    checkpoint_every_s: float = 0.0  # streaming: at most one checkpoint per shard per this many seconds (0: no limit)
    checkpoint_keep: int = DEFAULTS["checkpoint_keep"]
    run_id: str | None = None
    resume_from: str | None = None  # a run id whose checkpoints the shards start from
    alert_skipped_flushes: int = DEFAULTS["alert_skipped_flushes"]
    # a Pub/Sub run with checkpoints: each shard's checkpoint also lists the ids of the events it applied since
    # the read last acknowledged, which a resumed run's dedupe step refuses when they are redelivered; those a
    # resumed run carries over are kept this long (the dedupe TTL, event time). 0: no list
    remember_unacked_ms: int = 0

    shards: int = 1  # the shards the stream's micro-batch is split over

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shards < 1:
            raise ValueError(f"UpdateConfig.batch_size and shards must be >= 1, got {self.batch_size}, {self.shards}")
        if self.flush_interval_s is not None and self.flush_interval_s <= 0:
            raise ValueError("UpdateConfig.flush_interval_s must be > 0 or None")
        for name in ("run_id", "resume_from"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", value):
                raise ValueError(f"--{name} must be 1-64 letters, digits, '.', '_' or '-', got {value!r}")
        if self.resume_from is not None and not self.checkpoint_dir:
            raise ValueError("--resume_from needs --checkpoint_dir (where that run's checkpoints are)")
        if self.top_k < 1 or self.snapshot_every < 1 or self.checkpoint_every < 0 or self.checkpoint_keep < 1 \
                or self.checkpoint_every_s < 0:
            raise ValueError("UpdateConfig.top_k, snapshot_every and checkpoint_keep must be >= 1, checkpoint_every and "
                             "checkpoint_every_s >= 0")

    @property
    def shard_batch_size(self) -> int:
        """Events of one shard per flush: its share of the stream's micro-batch. Data-parallel learning keeps the
        global batch and splits it over the workers: with a per-shard batch of ``batch_size`` each shard would
        step once per ``shards x batch_size`` events of the stream, so its model and the item features it
        ranks with would grow staler with every shard added (on the first 100,000 Globo clicks, 16 shards at 256 each lost
        28% of one shard's Recall@10 in the runner-free replay; at 16 each, 3%)."""
        return max(1, -(-self.batch_size // self.shards))


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a run is configured with, built from flags by ``pipeline_config``."""

    feature: FeatureConfig
    learner: LearnerConfig
    update: UpdateConfig
    clean: CleanConfig
    sharding: ShardingConfig
    allowed_lateness_ms: int
    dedupe_ttl_ms: int
    state_ttl_ms: int
    output_dir: str
    output_window_s: int
    layout: Layout | None = None  # how --data is read; None: the synthetic stream (or no --data flag)
    stats_window_s: int = 3600  # 0: no stream statistics or drift detection


def feature_config(ns: Any) -> FeatureConfig:
    windows = tuple(int(float(w) * 1000) for w in str(_get(ns, "feature_windows_s")).split(",") if w.strip())
    if not windows:
        raise ValueError("--feature_windows_s: expected comma-separated seconds, e.g. 3600,86400")
    return FeatureConfig(windows_ms=windows, bucket_ms=max(1000, min(windows) // 12))


def learner_config(ns: Any, feature: FeatureConfig | None = None) -> LearnerConfig:
    """The learner of every shard, from the model and stability flags (defaults for any ``ns`` lacks)."""
    feature = feature or feature_config(ns)
    ttl_days = _get(ns, "embedding_ttl_days")
    table = TableConfig(dim=_get(ns, "dim"), capacity=_get(ns, "capacity"), admit_after=_get(ns, "admit_after"),
                        ttl_ms=int(ttl_days * DAY_MS) if ttl_days else None)
    return LearnerConfig(
        mode=_get(ns, "mode"), optimizer=_get(ns, "optimizer"), lr=_get(ns, "lr"),
        accumulate_steps=_get(ns, "accumulate_steps"), negatives=_get(ns, "negatives"),
        rating_threshold=_get(ns, "rating_threshold"), user_features=feature.user_width,
        item_features=feature.item_width, history=feature.history, user_table=table, item_table=table,
        gate=not _get(ns, "no_gate"), gate_tolerance=_get(ns, "gate_tolerance"), seed=_get(ns, "seed"),
        device=_get(ns, "device"))


def input_layout(ns: Any) -> Layout | None:
    """How ``--data`` is read (None: the synthetic stream, or an entry point without the flag);
    ``core.layout.LayoutError`` if it cannot be."""
    data = getattr(ns, "data", None)
    if not data:
        return None
    return resolve_layout(data, _get(ns, "data_format"), _get(ns, "columns"), _get(ns, "time_unit"))


def clean_config(ns: Any, layout: Layout | None) -> CleanConfig:
    """Validation rules: ``--value_range`` if given, else the rating scale of the layout's preset, else the
    general bound."""
    spec = _get(ns, "value_range")
    if spec:
        try:
            low, high = (float(x) for x in str(spec).split(","))
        except ValueError as exc:
            raise ValueError(f"--value_range: expected LOW,HIGH, got {spec!r}") from exc
        return CleanConfig(value_range=(low, high))
    return CleanConfig(value_range=layout.mapping.value_range if layout is not None else None)


def sync_location(ns: Any) -> str | None:
    """Where this run's shards meet (``--sync_dir``/RUN_ID), or None when there is nothing to sync."""
    if _get(ns, "shards") < 2 or _get(ns, "no_sync"):
        return None
    root = _get(ns, "sync_dir") or os.path.join(_get(ns, "output_dir"), "sync")
    return f"{root.rstrip('/')}/{_get(ns, 'run_id') or 'run'}"


def sharding_config(ns: Any) -> ShardingConfig:
    location = sync_location(ns)
    share = tuple(x.strip() for x in str(_get(ns, "sync_share")).split(",") if x.strip())
    if set(share) - set(SHARABLE) or "items" not in share:
        raise ValueError(f"--sync_share: expected items and any of {', '.join(SHARABLE[1:])}, comma-separated, "
                         f"got {_get(ns, 'sync_share')!r}")
    sync = None if location is None else SyncConfig(
        _get(ns, "shards"), int(_get(ns, "sync_interval_s") * 1000), _get(ns, "sync_merge"), share,
        keep_ms=int(_get(ns, "sync_keep_s") * 1000))
    return ShardingConfig(_get(ns, "shards"), _get(ns, "key_groups"), sync, location)


def pipeline_config(ns: Any) -> PipelineConfig:
    """The whole run's configuration from parsed flags (argparse, or Beam's options view); reads the head of
    ``--data`` to tell its layout."""
    feature = feature_config(ns)
    layout = input_layout(ns)
    batch = 1 if _get(ns, "mode") == "online" else _get(ns, "batch_size")
    update = UpdateConfig(batch_size=batch, shards=_get(ns, "shards"), flush_interval_s=_get(ns, "flush_interval_s") or None,
                          top_k=_get(ns, "top_k"), checkpoint_dir=_get(ns, "checkpoint_dir"),
                          checkpoint_every=_get(ns, "checkpoint_every"), checkpoint_every_s=_get(ns, "checkpoint_every_s"), checkpoint_keep=_get(ns, "checkpoint_keep"), run_id=_get(ns, "run_id"),
                          resume_from=_get(ns, "resume_from"), alert_skipped_flushes=_get(ns, "alert_skipped_flushes"))
    return PipelineConfig(
        feature, learner_config(ns, feature), update, clean_config(ns, layout),
        sharding_config(ns),
        int(_get(ns, "allowed_lateness_s") * 1000), int(_get(ns, "dedupe_ttl_s") * 1000),
        int(_get(ns, "state_ttl_days") * DAY_MS), _get(ns, "output_dir"), _get(ns, "output_window_s"), layout,
        _get(ns, "stats_window_s"))
