"""Runner-free, River-style featurizers: ``transform_one`` (features before the event) then ``learn_one``.

State is a plain dict of JSON-able values so any runner can keep it (Beam ValueState, Flink
ValueState). Counts over sliding event-time windows are kept in buckets (``bucket_ms`` wide), so a
window's count is exact up to one bucket at its old edge, and statistics merge by adding buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schemas import EVENT_TYPES

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _log1p(x: float) -> float:
    return math.log1p(max(0.0, x))


@dataclass(frozen=True)
class FeatureConfig:
    windows_ms: tuple[int, ...] = (HOUR_MS, DAY_MS)
    bucket_ms: int = 5 * 60_000
    history: int = 10

    def __post_init__(self) -> None:
        if not self.windows_ms or any(w <= 0 for w in self.windows_ms):
            raise ValueError(f"FeatureConfig.windows_ms must be positive, got {self.windows_ms}")
        if self.bucket_ms <= 0 or self.bucket_ms > min(self.windows_ms):
            raise ValueError("FeatureConfig.bucket_ms must be in (0, smallest window]")
        if self.history < 0:
            raise ValueError("FeatureConfig.history must be >= 0")

    @property
    def user_width(self) -> int:
        return len(EVENT_TYPES) * len(self.windows_ms) + 3

    @property
    def item_width(self) -> int:
        return len(self.windows_ms) + 1


class _Buckets:
    """Helpers over {bucket_start: [count per type]} dicts (JSON keys are strings)."""

    @staticmethod
    def add(buckets: dict[str, list[int]], start: int, slot: int, slots: int) -> None:
        counts = buckets.setdefault(str(start), [0] * slots)
        counts[slot] += 1

    @staticmethod
    def window_sums(buckets: dict[str, list[int]], now_ms: int, windows_ms: tuple[int, ...], slots: int) -> list[list[int]]:
        """window_sum for several windows in one pass over the buckets."""
        totals = [[0] * slots for _ in windows_ms]
        los = [now_ms - w for w in windows_ms]
        for start, counts in buckets.items():
            s = int(start)
            if s > now_ms:
                continue
            for total, lo in zip(totals, los):
                if lo < s:
                    for i, c in enumerate(counts):
                        total[i] += c
        return totals

    @staticmethod
    def prune(buckets: dict[str, list[int]], now_ms: int, keep_ms: int) -> None:
        for start in [s for s in buckets if int(s) < now_ms - keep_ms]:
            del buckets[start]

    @staticmethod
    def merge(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
        out = {k: list(v) for k, v in a.items()}
        for k, v in b.items():
            cur = out.setdefault(k, [0] * len(v))
            for i, c in enumerate(v):
                cur[i] += c
        return out


class UserFeaturizer:
    """Per-user: counts by event type over each window (log1p), total events, recency, recent mean rating,
    and the user's last N items."""

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"buckets": {}, "total": 0, "last_ms": None, "history": [], "ratings": []}

    def transform_one(self, state: dict[str, Any], event: dict[str, Any]) -> tuple[list[float], list[str]]:
        now = int(event["event_time_ms"])
        slots = len(EVENT_TYPES)
        feats: list[float] = []
        for total in _Buckets.window_sums(state["buckets"], now, self.cfg.windows_ms, slots):
            feats.extend(_log1p(c) for c in total)
        feats.append(_log1p(state["total"]))
        last = state["last_ms"]
        feats.append(_log1p(max(0, now - last) / 1000.0) / 10.0 if last is not None else 1.5)
        ratings = state["ratings"]
        feats.append(sum(ratings) / len(ratings) / 5.0 if ratings else 0.0)
        return feats, list(state["history"])

    def learn_one(self, state: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        now = int(event["event_time_ms"])
        start = now - now % self.cfg.bucket_ms
        _Buckets.add(state["buckets"], start, EVENT_TYPES.index(event["event_type"]), len(EVENT_TYPES))
        newest = max(now, state["last_ms"] or now)
        _Buckets.prune(state["buckets"], newest, max(self.cfg.windows_ms) + self.cfg.bucket_ms)
        state["total"] += 1
        state["last_ms"] = newest
        if self.cfg.history:
            state["history"] = (state["history"] + [event["item_id"]])[-self.cfg.history:]
        if event["event_type"] == "rating" and event.get("value") is not None:
            state["ratings"] = (state["ratings"] + [float(event["value"])])[-20:]
        return state

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """Merge two partial states of the same user (counts add; the newer history wins)."""
        newer, older = (a, b) if (a["last_ms"] or 0) >= (b["last_ms"] or 0) else (b, a)
        return {
            "buckets": _Buckets.merge(a["buckets"], b["buckets"]),
            "total": a["total"] + b["total"],
            "last_ms": newer["last_ms"],
            "history": newer["history"],
            "ratings": (older["ratings"] + newer["ratings"])[-20:],
        }


class ItemPopularity:
    """Per-item: event counts over each window (log1p) and recency of the item's last event."""

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"buckets": {}, "last_ms": None}

    def transform_one(self, state: dict[str, Any], event: dict[str, Any]) -> list[float]:
        now = int(event["event_time_ms"])
        feats = [_log1p(total[0]) for total in _Buckets.window_sums(state["buckets"], now, self.cfg.windows_ms, 1)]
        last = state["last_ms"]
        feats.append(_log1p(max(0, now - last) / 1000.0) / 10.0 if last is not None else 1.5)
        return feats

    def learn_one(self, state: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        now = int(event["event_time_ms"])
        _Buckets.add(state["buckets"], now - now % self.cfg.bucket_ms, 0, 1)
        newest = max(now, state["last_ms"] or now)
        _Buckets.prune(state["buckets"], newest, max(self.cfg.windows_ms) + self.cfg.bucket_ms)
        state["last_ms"] = newest
        return state

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"buckets": _Buckets.merge(a["buckets"], b["buckets"]),
                "last_ms": max(x for x in (a["last_ms"], b["last_ms"], -1) if x is not None)
                if (a["last_ms"] is not None or b["last_ms"] is not None) else None}
