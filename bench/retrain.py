"""The periodic full-retrain baseline of the prequential benchmark: what a nightly batch job gives.

Between retrains the model is frozen: it scores, keeps item features and user towers current, and
never steps. Every ``every_ms`` of event time a fresh learner is trained from scratch, ``epochs``
passes over the replay buffer (the last ``window_ms`` of events, or all of them), and takes over.
This is a baseline to compare the streaming learner against, not a mode of the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from model.config import LearnerConfig
from model.deltas import LearnResult
from model.learner import IncrementalLearner

DAY_MS = 86_400_000


@dataclass(frozen=True)
class RetrainConfig:
    every_ms: int = DAY_MS
    epochs: int = 2
    window_ms: int | None = None
    batch: int = 512

    def __post_init__(self) -> None:
        if self.every_ms <= 0 or self.epochs < 1 or self.batch < 1:
            raise ValueError("RetrainConfig: every_ms, epochs and batch must be positive")
        if self.window_ms is not None and self.window_ms <= 0:
            raise ValueError("RetrainConfig.window_ms must be > 0 or None")


class PeriodicRetrain:
    """A learner retrained from scratch on a schedule, frozen in between (``learn``/``predict`` as the learner's)."""

    def __init__(self, cfg: LearnerConfig, retrain: RetrainConfig = RetrainConfig()):
        self.cfg = replace(cfg, mode="incremental", gate=False, l2_to_good=0.0)
        self.retrain = retrain
        self.learner = IncrementalLearner(self.cfg)
        self.learner.frozen = True
        self.replay: list[dict[str, Any]] = []
        self.last_ms: int | None = None
        self.retrains = 0

    def learn(self, events: Sequence[dict[str, Any]]) -> LearnResult:
        result = self.learner.learn(events)
        self.replay.extend(dict(e) for e in events)
        now = self.learner.now_ms
        if self.last_ms is None:
            self.last_ms = now
        if now - self.last_ms >= self.retrain.every_ms:
            self.last_ms = now
            self._retrain(now)
        return result

    def _retrain(self, now_ms: int) -> None:
        if self.retrain.window_ms is not None:
            self.replay = [e for e in self.replay if e["event_time_ms"] >= now_ms - self.retrain.window_ms]
        fresh = IncrementalLearner(self.cfg)
        step = self.retrain.batch
        for _ in range(self.retrain.epochs):
            for i in range(0, len(self.replay), step):
                fresh.learn(self.replay[i : i + step])
        fresh.frozen = True
        self.learner = fresh
        self.retrains += 1

    def predict(self, events: Sequence[dict[str, Any]]) -> list[float]:
        return self.learner.predict(events)

    def score_candidates(self, user_id: str, item_ids: list[str]) -> list[float]:
        return self.learner.score_candidates(user_id, item_ids)
