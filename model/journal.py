"""Runner-free persistence of a shard's learner in keyed state: a snapshot plus a journal of the
micro-batches applied since. The learner is deterministic, so snapshot + journal replay rebuilds it
exactly; Beam's UpdateShardModel and the PyFlink job both keep their partitions this way."""

from __future__ import annotations

import marshal
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from model.config import LearnerConfig
from model.deltas import LearnResult
from model.learner import IncrementalLearner
from model.metrics import BinaryStats
from model.shard_sync import ShardSync
from monitoring.alerts import SkippedStepsAlarm

# A journal entry is one micro-batch of featurized events (dicts of str/int/float/None/lists) in
# marshal's format behind this tag: about a ninth of the cost of Avro-encoding each event, and loading
# it builds plain data, never code.
# A flush with a sync step journals what the sync did too ((applied epochs, published epoch), events),
# behind a second tag: replay re-applies exactly those merged epochs, read back from the medium.
_MARSHALLED = b"\0\0\0\0"
_SYNCED = b"\0\0\0\1"


def journal_entry(events: list[dict], sync: tuple[list[int], int | None] | None = None) -> bytes:
    if sync is None:
        return _MARSHALLED + marshal.dumps(events, 4)
    return _SYNCED + marshal.dumps((list(sync[0]), sync[1], events), 4)


def journal_record(entry: bytes) -> tuple[list[dict[str, Any]], tuple[list[int], int | None] | None]:
    """(micro-batch, sync actions or None) of a journal entry; ValueError on bytes that are not one."""
    tag, body = entry[:4], entry[4:]
    if tag not in (_MARSHALLED, _SYNCED):
        raise ValueError("journal entry does not start with the marshalled-batch tag")
    try:
        value = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"journal entry is not a marshalled micro-batch: {exc}") from exc
    sync = None
    if tag == _SYNCED:
        if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], list)):
            raise ValueError("journal entry: a synced entry must hold (applied epochs, published epoch, events)")
        sync, value = (value[0], value[1]), value[2]
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ValueError("journal entry is not a list of event records")
    return value, sync


def journal_events(entry: bytes) -> list[dict[str, Any]]:
    """The micro-batch a journal entry holds; ValueError on bytes that are not one."""
    return journal_record(entry)[0]


def restore_learner(cfg: LearnerConfig, shard: int, snapshot: bytes | None, journal: list[bytes],
                    sync: ShardSync | None = None) -> IncrementalLearner:
    """Rebuild a shard's learner from its state: the snapshot, then every journaled micro-batch in order
    (with the merged epochs it applied and its publication, neither applied nor published twice)."""
    learner = IncrementalLearner.from_bytes(snapshot, cfg) if snapshot else IncrementalLearner(cfg, shard)
    if sync is not None:
        learner.share_serving()
    for entry in journal:
        events, actions = journal_record(entry)
        if actions is not None:
            if sync is None:
                raise ValueError("journal: a synced entry needs the run's sync medium to replay")
            if not events:  # a publication on event time alone (sync_on_time): its epoch ended then
                if actions[1] is not None:
                    sync.on_time(learner, (actions[1] + 1) * sync.cfg.interval_ms)
                continue
            if actions[0]:
                sync.apply(learner, actions[0])
        learner.learn(events)
        if actions is not None:
            sync.after_batch(learner, events)  # type: ignore[union-attr]  # its publication is on the medium already
        learner.take_deltas()
    return learner


def position(meta: dict[str, Any]) -> int:
    """How many journal-changing steps a shard's state has seen (flushes and publications on time): a worker's
    cached learner is current only at its state's position."""
    return meta["flushes"] + meta.get("on_time", 0)


def live_learner(cfg: LearnerConfig, shard: int, meta: dict[str, Any],
                 load_state: Callable[[], tuple[bytes | None, list[bytes]]],
                 live: dict[Hashable, tuple[IncrementalLearner, int]], live_key: Hashable,
                 sync: ShardSync | None = None) -> tuple[IncrementalLearner, bool]:
    """The worker's cached learner while it is at ``meta``'s position; otherwise (first use here, a restart,
    a retried bundle) one rebuilt from ``load_state()``. Returns (learner, rebuilt)."""
    cached = live.get(live_key)
    if cached is not None and cached[1] == position(meta):
        return cached[0], False
    return restore_learner(cfg, shard, *load_state(), sync), True


def sync_on_time(cfg: LearnerConfig, shard: int, now_ms: int, meta: dict[str, Any],
                 load_state: Callable[[], tuple[bytes | None, list[bytes]]],
                 live: dict[Hashable, tuple[IncrementalLearner, int]], live_key: Hashable,
                 sync: ShardSync) -> bytes | None:
    """Event time reached ``now_ms`` (``ShardSync.on_time``): the journal entry of the shard's publication, or
    None when it had nothing to say. Updates ``meta`` in place, as ``flush_micro_batch``."""
    learner, _ = live_learner(cfg, shard, meta, load_state, live, live_key, sync)
    published = sync.on_time(learner, now_ms)
    if published is not None:
        meta["on_time"] = meta.get("on_time", 0) + 1
        meta["journal_len"] += 1
    live[live_key] = (learner, position(meta))
    return None if published is None else journal_entry([], ([], published))


def new_meta() -> dict[str, Any]:
    """Per-shard bookkeeping kept in keyed state beside the snapshot and journal."""
    return {"flushes": 0, "journal_len": 0, "score_seq": 0, "delta_seq": 0, "skip_streak": [0, 0, 0]}


@dataclass
class Flush:
    """What one micro-batch flush produced; the adapter writes ``journal_entry`` (and, when set, replaces
    the snapshot with ``snapshot`` and clears the journal) and emits the records."""

    learner: IncrementalLearner
    result: LearnResult
    scores: list[dict[str, Any]]  # schemas/scored_output.avsc
    deltas: list[dict[str, Any]]  # schemas/model_delta.avsc
    journal_entry: bytes
    snapshot: bytes | None
    restored: bool
    merged_epochs: list[int]  # merged sync epochs applied before learning
    published_epoch: int | None  # the sync epoch this flush published
    sync_bytes: int  # bytes this flush's publication put on the sync medium
    sync_lag_epochs: int  # this shard's publications not yet merged back when the flush began (ShardSync.catch_up)
    probed: tuple[float, int]  # an evaluation probe's (hits, probes) on this batch, before learning it
    not_learned: int  # events applied (accounted for) but not learned: every step of the flush was skipped
    alerts: list[dict[str, Any]]  # schemas/alert.avsc records this flush raised


def flush_micro_batch(
    cfg: LearnerConfig,
    shard: int,
    events: list[dict[str, Any]],
    meta: dict[str, Any],
    load_state: Callable[[], tuple[bytes | None, list[bytes]]],
    live: dict[Hashable, tuple[IncrementalLearner, int]],
    live_key: Hashable,
    top_k: int,
    snapshot_every: int,
    emit_time_ms: int,
    sync: ShardSync | None = None,
    probe: Callable[[IncrementalLearner, list[dict[str, Any]]], tuple[float, int]] | None = None,
    alarm: SkippedStepsAlarm | None = None,
) -> Flush:
    """Score first, learn, and number the refreshed scores and deltas of one shard's micro-batch.

    The worker's live learner is reused while its flush count matches ``meta`` (updated in place);
    otherwise (first flush here, a restart, a retried bundle) it is rebuilt from ``load_state()``. ``alarm``
    (default ``SkippedStepsAlarm()``) watches for a shard whose steps keep being skipped."""
    learner, restored = live_learner(cfg, shard, meta, load_state, live, live_key, sync)
    applied: list[int] = []
    bytes_before = learner.counters["sync_bytes_out"]
    if sync is not None:  # merged epochs first, none newer than this batch's oldest event
        applied = sync.catch_up(learner, min(int(e["event_time_ms"]) for e in events))
    probed = probe(learner, events) if probe is not None else (0.0, 0)  # (hits, probes), before learning them
    result = learner.learn(events)
    published = sync.after_batch(learner, events) if sync is not None else None
    latest_by_user: dict[str, int] = {}
    for e in events:
        latest_by_user[e["user_id"]] = max(latest_by_user.get(e["user_id"], 0), e["event_time_ms"])
    scores = []
    for user, items in learner.topk(sorted(latest_by_user), top_k).items():
        meta["score_seq"] += 1
        scores.append({"user_id": user, "shard": shard, "model_version": learner.version, "sequence": meta["score_seq"],
                       "items": [{"item_id": i, "score": float(s)} for i, s in items],
                       "event_time_ms": latest_by_user[user], "emit_time_ms": emit_time_ms})
    deltas = []
    for delta in learner.take_deltas():
        meta["delta_seq"] += 1
        deltas.append(delta.to_record(meta["delta_seq"], emit_time_ms))
    not_learned = len(events) if result.skipped_nonfinite and not result.steps else 0
    times = [int(e["event_time_ms"]) for e in events]
    alert = (alarm or SkippedStepsAlarm()).update(meta, shard, len(events), not_learned, min(times), max(times))
    meta["flushes"] += 1
    meta["journal_len"] += 1
    snapshot = None
    if meta["journal_len"] >= snapshot_every and not learner.accumulating:
        learner.sync.note_snapshot()  # (what the sync's retention may remove follows the snapshots)
        snapshot = learner.to_bytes()
        meta["journal_len"] = 0
    live[live_key] = (learner, position(meta))
    entry = journal_entry(events, None if sync is None else (applied, published))
    return Flush(learner, result, scores, deltas, entry, snapshot, restored and meta["flushes"] > 1, applied, published,
                 learner.counters["sync_bytes_out"] - bytes_before, 0 if sync is None else sync.lag_epochs,
                 probed, not_learned,
                 [] if alert is None else [alert.to_record(emit_time_ms)])


def flush_report(shard: int, events: list[dict[str, Any]], done: Flush, emit_time_ms: int) -> dict[str, Any]:
    """The report of one flush that the run summary and the window statistics (``monitoring.window_stats``) add
    up: counts, the prequential statistics, table sizes and evictions, sync activity."""
    stats = BinaryStats()
    stats.update(done.result.labels, done.result.probs)
    learner, result = done.learner, done.result
    tables = learner.tables()
    return {
        "shard": shard, "events": len(events), "version": learner.version, "steps": result.steps,
        "skipped_nonfinite": result.skipped_nonfinite, "rollbacks": len(result.rollbacks),
        "scores": len(done.scores), "deltas": len(done.deltas),
        # applied (accounted for) but not learned: their step was skipped for non-finite values
        "not_learned": done.not_learned, "alerts": len(done.alerts),
        "stats": stats.to_dict(), "max_event_time_ms": max(int(e["event_time_ms"]) for e in events),
        "emit_time_ms": int(emit_time_ms),
        "table_rows": {name: len(t) for name, t in tables.items()},
        "evictions": {name: t.evictions for name, t in tables.items()},
        "probe": {"hits": done.probed[0], "probes": done.probed[1]},
        "sync": {"merged": len(done.merged_epochs), "published": int(done.published_epoch is not None),
                 "bytes_out": done.sync_bytes, "lag_epochs": done.sync_lag_epochs},
    }
