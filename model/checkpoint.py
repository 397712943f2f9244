"""Versioned, atomic checkpoints of a learner, loadable without unpickling code (``weights_only=True``)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from model.config import LearnerConfig
from model.deltas import ModelDelta
from model.learner import IncrementalLearner

_NAME = re.compile(r"^shard-(\d+)-v(\d{12})\.pt$")


def checkpoint_path(directory: str | os.PathLike[str], shard: int, version: int) -> Path:
    return Path(directory) / f"shard-{shard:04d}-v{version:012d}.pt"


def save_checkpoint(learner: IncrementalLearner, directory: str | os.PathLike[str],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``learner`` to ``directory`` atomically (temp file in the same folder, fsync, rename).

    ``meta`` (plain values) travels with it, e.g. the delta sequence number published so far."""
    target = checkpoint_path(directory, learner.shard, learner.version)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({**learner.state_dict(), "meta": dict(meta or {})}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load_checkpoint(path: str | os.PathLike[str], cfg: LearnerConfig | None = None) -> IncrementalLearner:
    sd = torch.load(path, weights_only=True, map_location="cpu")
    learner = IncrementalLearner(cfg or LearnerConfig.from_dict(sd["config"]), int(sd["shard"]))
    learner.load_state_dict(sd)
    return learner


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return dict(torch.load(path, weights_only=True, map_location="cpu").get("meta", {}))


def latest_checkpoint(directory: str | os.PathLike[str], shard: int) -> Path | None:
    best: tuple[int, Path] | None = None
    d = Path(directory)
    if not d.is_dir():
        return None
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and int(m.group(1)) == shard and (best is None or int(m.group(2)) > best[0]):
            best = (int(m.group(2)), p)
    return None if best is None else best[1]


def replay_deltas(learner: IncrementalLearner, deltas: Iterable[ModelDelta]) -> IncrementalLearner:
    """Apply published deltas newer than the learner's version, in order."""
    start = learner.version
    for delta in deltas:
        if delta.model_version > start:
            learner.apply_delta(delta)
    return learner
