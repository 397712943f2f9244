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

# A journal entry is one micro-batch of featurized events (dicts of str/int/float/None/lists) in
# marshal's format behind this tag: about a ninth of the cost of Avro-encoding each event, and loading
# it builds plain data, never code.
_MARSHALLED = b"\0\0\0\0"


def journal_entry(events: list[dict]) -> bytes:
    return _MARSHALLED + marshal.dumps(events, 4)


def journal_events(entry: bytes) -> list[dict[str, Any]]:
    """The micro-batch a journal entry holds; ValueError on bytes that are not one."""
    if not entry.startswith(_MARSHALLED):
        raise ValueError("journal entry does not start with the marshalled-batch tag")
    try:
        events = marshal.loads(entry[len(_MARSHALLED):])
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"journal entry is not a marshalled micro-batch: {exc}") from exc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError("journal entry is not a list of event records")
    return events


def restore_learner(cfg: LearnerConfig, shard: int, snapshot: bytes | None, journal: list[bytes]) -> IncrementalLearner:
    """Rebuild a shard's learner from its state: the snapshot, then every journaled micro-batch in order."""
    learner = IncrementalLearner.from_bytes(snapshot, cfg) if snapshot else IncrementalLearner(cfg, shard)
    for entry in journal:
        learner.learn(journal_events(entry))
        learner.take_deltas()
    return learner


def new_meta() -> dict[str, Any]:
    """Per-shard bookkeeping kept in keyed state beside the snapshot and journal."""
    return {"flushes": 0, "journal_len": 0, "score_seq": 0, "delta_seq": 0}


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
) -> Flush:
    """Score first, learn, and number the refreshed scores and deltas of one shard's micro-batch.

    The worker's live learner is reused while its flush count matches ``meta`` (updated in place);
    otherwise (first flush here, a restart, a retried bundle) it is rebuilt from ``load_state()``."""
    cached = live.get(live_key)
    restored = cached is None or cached[1] != meta["flushes"]
    learner = restore_learner(cfg, shard, *load_state()) if restored else cached[0]  # type: ignore[index]
    result = learner.learn(events)
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
    meta["flushes"] += 1
    meta["journal_len"] += 1
    snapshot = None
    if meta["journal_len"] >= snapshot_every and not learner.accumulating:
        snapshot = learner.to_bytes()
        meta["journal_len"] = 0
    live[live_key] = (learner, meta["flushes"])
    return Flush(learner, result, scores, deltas, journal_entry(events), snapshot, restored and meta["flushes"] > 1)
