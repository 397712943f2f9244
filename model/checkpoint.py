"""Versioned, atomic checkpoints of a learner, loadable without unpickling code (``weights_only=True``).

Each checkpoint file has a ``.sha256`` sidecar written after it; ``verified_state`` refuses a file whose
bytes do not match it (a torn or corrupted write), so a reader can fall back to an older checkpoint
(``checkpoints`` lists them newest first)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from model.config import LearnerConfig
from model.deltas import ModelDelta
from model.learner import IncrementalLearner

# shard-0003-r20261201T204000-1a2b-v000000000012.pt: shard, the run that wrote it (optional), version
_NAME = re.compile(r"^shard-(\d+)(?:-r([0-9A-Za-z_.-]+))?-v(\d{12})\.pt$")


def new_run_id() -> str:
    """A run's id for its checkpoints' names: its start time (so that ids sort like runs) and 4 random hex."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(2).hex()


def checkpoint_path(directory: str | os.PathLike[str], shard: int, version: int, run_id: str | None = None) -> Path:
    run = f"-r{run_id}" if run_id else ""
    return Path(directory) / f"shard-{shard:04d}{run}-v{version:012d}.pt"


def save_checkpoint(learner: IncrementalLearner, directory: str | os.PathLike[str],
                    meta: dict[str, Any] | None = None, run_id: str | None = None) -> Path:
    """Write ``learner`` to ``directory`` atomically (temp file in the same folder, fsync, rename).

    ``meta`` (plain values) travels with it, e.g. the delta sequence number published so far; ``run_id``
    (``new_run_id``) names the run, so that a later run's checkpoints sort after an earlier one's whatever
    their versions."""
    target = checkpoint_path(directory, learner.shard, learner.version, run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".pt")
    buf = io.BytesIO()
    torch.save({**learner.state_dict(), "meta": dict(meta or {})}, buf)
    data = buf.getvalue()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        side = target.with_name(target.name + ".sha256")
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(hashlib.sha256(data).hexdigest() + "\n")
        os.replace(side_tmp, side)  # the sidecar first: a checkpoint is never visible without its checksum
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load_checkpoint(path: str | os.PathLike[str], cfg: LearnerConfig | None = None) -> IncrementalLearner:
    sd = verified_state(path)
    learner = IncrementalLearner(cfg or LearnerConfig.from_dict(sd["config"]), int(sd["shard"]))
    learner.load_state_dict(sd)
    return learner


def _found(directory: str | os.PathLike[str], shard: int) -> list[tuple[tuple[str, int], Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return [((m.group(2) or "", int(m.group(3))), p) for p in d.iterdir()
            if (m := _NAME.match(p.name)) and int(m.group(1)) == shard]


def checkpoints(directory: str | os.PathLike[str], shard: int, run_id: str | None = None) -> list[Path]:
    """The shard's checkpoint files, newest first: the latest run's (by run id), then by version; with
    ``run_id``, only that run's."""
    found = [f for f in _found(directory, shard) if run_id is None or f[0][0] == run_id]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_index(directory: str | os.PathLike[str]) -> dict[str, set[int]]:
    """The runs with checkpoints in ``directory`` ("" for files named without a run id) and the shards each
    has checkpoints of, from one listing."""
    d = Path(directory)
    index: dict[str, set[int]] = {}
    for p in d.iterdir() if d.is_dir() else ():
        if m := _NAME.match(p.name):
            index.setdefault(m.group(2) or "", set()).add(int(m.group(1)))
    return index


def prune_checkpoints(directory: str | os.PathLike[str], shard: int, keep: int, run_id: str | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``shard`` (of run ``run_id`` only, if given; other
    runs' stay for ``--resume_from``) and their sidecars; the deleted paths."""
    old = checkpoints(directory, shard, run_id)[keep:]
    for path in old:
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    return old


def latest_checkpoint(directory: str | os.PathLike[str], shard: int) -> Path | None:
    found = checkpoints(directory, shard)
    return found[0] if found else None


def resume_state(directory: str | os.PathLike[str], shard: int, run_id: str,
                 cfg: LearnerConfig | None = None) -> tuple[IncrementalLearner, dict[str, Any], Path] | None:
    """The newest checkpoint of run ``run_id`` for ``shard`` that reads back (checksum, format and, with
    ``cfg``, this model's shapes), as (its learner, its meta, its path); older ones are tried when the
    newest is unreadable, then the runs before ``run_id``, newest first: a resumed run that got no event of a
    shard leaves no checkpoint of it, and the shard's state is still its predecessor's. None: no readable one."""
    found = sorted((f for f in _found(directory, shard) if f[0][0] <= run_id), reverse=True)
    for _, path in found:
        try:
            sd = verified_state(path)
            meta = dict(sd.pop("meta", {}) or {})
            learner = IncrementalLearner(cfg or LearnerConfig.from_dict(sd["config"]), shard)
            learner.load_state_dict(sd)
        except Exception:  # torn, refused or of another model: the previous one
            continue
        return learner, meta, path
    return None


def resume_shard(directory: str | os.PathLike[str], shard: int, run_id: str, cfg: LearnerConfig,
                 meta: dict[str, Any]) -> bytes | None:
    """A shard's first state in a run started with ``--resume_from run_id``: the snapshot of that run's
    newest readable checkpoint (None: it left none for this shard, which starts afresh), its sync position
    restarted for this run's medium, with ``meta``'s delta and score sequences continued from it (updated
    in place)."""
    found = resume_state(directory, shard, run_id, cfg)
    if found is None:
        return None
    learner, saved, _ = found
    learner.sync.restart()
    meta["delta_seq"] = int(saved.get("delta_sequence", 0))
    meta["score_seq"] = int(saved.get("score_sequence", 0))
    meta["applied"] = int(saved.get("events_applied", 0))
    meta["carried_ids"] = {str(i): int(t) for i, t in dict(saved.get("unacked_event_ids") or {}).items()}
    return learner.to_bytes()


def remember_unacked(meta: dict[str, Any], events: Sequence[dict[str, Any]], ack_epoch: int, ttl_ms: int) -> None:
    """Note in a shard's ``meta`` the ids (and event times) of the ``events`` it applied, for its next checkpoint
    (``unacked_in``): those applied since the Pub/Sub read last acknowledged everything it had read (``ack_epoch``
    changed: the earlier ones are acknowledged and forgotten), and those a resumed run carried over from its
    checkpoint, until they are ``ttl_ms`` of event time older than the newest event applied."""
    if meta.get("ack_epoch") != ack_epoch:
        meta["ack_epoch"], meta["unacked_ids"] = ack_epoch, {}
    ids = meta["unacked_ids"]
    for e in events:
        ids[str(e["event_id"])] = int(e["event_time_ms"])
    if meta.get("carried_ids"):
        horizon = max(int(e["event_time_ms"]) for e in events) - ttl_ms
        meta["carried_ids"] = {i: t for i, t in meta["carried_ids"].items() if t >= horizon}


def unacked_in(meta: dict[str, Any]) -> dict[str, int]:
    """The ids (-> event time) a checkpoint lists as applied but maybe not acknowledged (``remember_unacked``)."""
    return {**meta.get("carried_ids", {}), **meta.get("unacked_ids", {})}


def unacked_event_ids(directory: str | os.PathLike[str], run_id: str, shards: int, cfg: LearnerConfig) -> frozenset[str]:
    """The ids of the events that run ``run_id``'s shards had applied, in the checkpoints a resumed run starts
    from (``resume_shard``), that its Pub/Sub read may not have acknowledged: Pub/Sub redelivers them, and the
    resumed run's dedupe step refuses them instead of applying them twice."""
    ids: set[str] = set()
    for shard in range(shards):
        found = resume_state(directory, shard, run_id, cfg)
        if found is not None:
            ids.update(str(i) for i in dict(found[1].get("unacked_event_ids") or {}))
    return frozenset(ids)


def verified_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's state dict, after checking its ``.sha256`` sidecar where there is one; ValueError if
    the bytes do not match, torch's own errors (truncated file, refused pickle) otherwise."""
    path = Path(path)
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256")
    if side.exists() and side.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise ValueError(f"checkpoint {path.name}: its bytes do not match {side.name}")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def replay_deltas(learner: IncrementalLearner, deltas: Iterable[ModelDelta]) -> IncrementalLearner:
    """Apply published deltas newer than the learner's version, in order."""
    start = learner.version
    for delta in deltas:
        if delta.model_version > start:
            learner.apply_delta(delta)
    return learner
