"""Mergeable prequential statistics (River-style): update with new predictions, merge across shards."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-7


def exact_auc(labels: Iterable[float], scores: Iterable[float]) -> float:
    """ROC AUC by ranks (ties averaged); nan when only one class is present."""
    y = np.asarray(list(labels), dtype=np.float64)
    s = np.asarray(list(scores), dtype=np.float64)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: Iterable[float], probs: Iterable[float]) -> float:
    y = np.asarray(list(labels), dtype=np.float64)
    p = np.clip(np.asarray(list(probs), dtype=np.float64), EPS, 1 - EPS)
    if len(y) == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@dataclass
class BinaryStats:
    """Histogram AUC (``bins`` equal-width probability buckets) plus exact logloss; mergeable."""

    bins: int = 1000
    pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    loss_sum: float = 0.0
    count: int = 0
    nonfinite: int = 0  # predictions that were NaN/Inf: counted, left out of AUC and logloss

    def __post_init__(self) -> None:
        if self.pos.size == 0:
            self.pos = np.zeros(self.bins, dtype=np.int64)
        if self.neg.size == 0:
            self.neg = np.zeros(self.bins, dtype=np.int64)

    def update(self, labels: Iterable[float], probs: Iterable[float]) -> None:
        y = np.asarray(list(labels), dtype=np.float64)
        p = np.asarray(list(probs), dtype=np.float64)
        finite = np.isfinite(p)
        self.nonfinite += int((~finite).sum())
        y, p = y[finite], np.clip(p[finite], EPS, 1 - EPS)
        if len(y) == 0:
            return
        idx = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        is_pos = y > 0.5
        np.add.at(self.pos, idx[is_pos], 1)
        np.add.at(self.neg, idx[~is_pos], 1)
        self.loss_sum += float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())
        self.count += len(y)

    def merge(self, other: BinaryStats) -> BinaryStats:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge BinaryStats with {other.bins} bins into one with {self.bins}")
        return BinaryStats(self.bins, self.pos + other.pos, self.neg + other.neg,
                           self.loss_sum + other.loss_sum, self.count + other.count, self.nonfinite + other.nonfinite)

    def auc(self) -> float:
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg
        wins = (self.pos * neg_below).sum() + 0.5 * (self.pos * self.neg).sum()
        return float(wins / (n_pos * n_neg))

    def logloss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "pos": self.pos.tolist(), "neg": self.neg.tolist(),
                "loss_sum": self.loss_sum, "count": self.count, "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BinaryStats:
        return cls(int(d["bins"]), np.asarray(d["pos"], dtype=np.int64), np.asarray(d["neg"], dtype=np.int64),
                   float(d["loss_sum"]), int(d["count"]), int(d.get("nonfinite", 0)))


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
