"""Runner-free, River-style featurizers: ``transform_one`` (features before the event) then ``learn_one``.

State is a plain dict of primitives (ints, floats, strings, lists, dicts) so any runner's coder can
keep it (Beam ValueState with FastPrimitivesCoder, Flink ValueState with pickled bytes). Counts over
sliding event-time windows are kept in buckets (``bucket_ms`` wide), so a window's count is exact up
to one bucket at its old edge, and statistics merge by adding buckets. Each state also carries the window totals as of its newest event (``sums``/``sums_at``); moving
them forward subtracts only the buckets that slid out, so an event costs O(windows x types) instead
of a pass over every bucket. Totals are integers, so the running sums equal a full recount exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import log1p
from typing import Any

from core.keyed_state import GroupStates
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
    """Helpers over {bucket_start_ms: [count per type]} dicts."""

    @staticmethod
    def add(buckets: dict[int, list[int]], start: int, slot: int, slots: int) -> None:
        counts = buckets.get(start)
        if counts is None:
            buckets[start] = counts = [0] * slots
        counts[slot] += 1

    @staticmethod
    def window_sums(buckets: dict[int, list[int]], now_ms: int, windows_ms: tuple[int, ...], slots: int) -> list[list[int]]:
        """window_sum for several windows in one pass over the buckets."""
        totals = [[0] * slots for _ in windows_ms]
        los = [now_ms - w for w in windows_ms]
        for s, counts in buckets.items():
            if s > now_ms:
                continue
            for total, lo in zip(totals, los):
                if lo < s:
                    for i, c in enumerate(counts):
                        total[i] += c
        return totals

    @staticmethod
    def prune(buckets: dict[int, list[int]], now_ms: int, keep_ms: int) -> None:
        for start in [s for s in buckets if s < now_ms - keep_ms]:
            del buckets[start]

    @staticmethod
    def totals_at(state: dict[str, Any], now_ms: int, cfg: FeatureConfig, slots: int) -> list[list[int]]:
        """Window totals as of ``now_ms`` (a fresh list): the running sums moved forward when ``now_ms``
        is at or after ``sums_at``; a full recount for an event older than the state's newest."""
        buckets, at = state["buckets"], state.get("sums_at")
        if at is None or now_ms < at:
            return _Buckets.window_sums(buckets, now_ms, cfg.windows_ms, slots)
        if now_ms == at:
            return [list(s) for s in state["sums"]]
        # No bucket starts after ``at`` (every bucket holds events at or before it), so moving to
        # ``now_ms`` only drops the buckets with at - w < start <= now_ms - w from each window w:
        # found by walking the bucket grid over that range, or over the buckets when there are fewer.
        bucket = cfg.bucket_ms
        gap = now_ms - at
        walk = gap // bucket + 1 <= len(buckets)
        sums = []
        for total, w in zip(state["sums"], cfg.windows_ms):
            if gap >= w:  # every bucket is at or before at <= now_ms - w: the window is empty
                sums.append([0] * slots)
                continue
            lo, hi = at - w, now_ms - w
            if walk:
                dropped = [c for s in range(lo - lo % bucket + bucket, hi + 1, bucket) if (c := buckets.get(s)) is not None]
            else:
                dropped = [counts for s, counts in buckets.items() if lo < s <= hi]
            if not dropped:
                sums.append(list(total))
            elif len(dropped) == 1:
                sums.append([t - c for t, c in zip(total, dropped[0], strict=True)])
            else:
                sums.append([t - sum(col) for t, col in zip(total, zip(*dropped, strict=True), strict=True)])
        return sums

    @staticmethod
    def learn(state: dict[str, Any], now_ms: int, slot: int, cfg: FeatureConfig, slots: int,
              totals_now: list[list[int]] | None = None) -> int:
        """Count one event at ``now_ms`` in ``slot``: buckets, running sums, pruning. ``totals_now`` (from
        ``totals_at(state, now_ms)`` just before, if the caller has it) saves recomputing them. Returns
        the newest time."""
        last = state.get("last_ms")
        newest = now_ms if last is None else max(now_ms, last)
        if totals_now is not None and newest == now_ms:
            sums = totals_now
        else:
            sums = _Buckets.totals_at(state, newest, cfg, slots)  # before adding: the event's bucket is not in them
        start = now_ms - now_ms % cfg.bucket_ms
        buckets = state["buckets"]
        _Buckets.add(buckets, start, slot, slots)
        for total, w in zip(sums, cfg.windows_ms):
            if start > newest - w:
                total[slot] += 1
        # Buckets past every window are never counted again; drop them once there could be more of
        # them than of the buckets a window can hold (so the state stays bounded without a scan per event).
        keep = max(cfg.windows_ms) + cfg.bucket_ms
        if len(buckets) > keep // cfg.bucket_ms + 1:
            _Buckets.prune(buckets, newest, keep)
        state["sums"], state["sums_at"] = sums, newest
        return newest

    @staticmethod
    def merge(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict[int, list[int]]:
        out = {k: list(v) for k, v in a.items()}
        for k, v in b.items():
            cur = out.setdefault(k, [0] * len(v))
            for i, c in enumerate(v):
                cur[i] += c
        return out


class UserFeaturizer:
    """Per-user: counts by event type over each window (log1p), total events, recency, recent mean rating,
    and the user's last N items.

    >>> f = UserFeaturizer(FeatureConfig(windows_ms=(HOUR_MS,), bucket_ms=60_000, history=2))
    >>> state = f.new_state()
    >>> for n, item in enumerate(["a", "b", "c"]):
    ...     features, history = f.transform_learn(state, {"event_type": "click", "item_id": item,
    ...                                                    "event_time_ms": 60_000 * n})
    >>> history                      # the items before this event (the last 2)
    ['a', 'b']
    >>> [round(x, 3) for x in features[:4]]  # log1p of the hour's views, clicks (2), ratings, purchases
    [0.0, 1.099, 0.0, 0.0]
    >>> f.transform_one(state, {"event_type": "view", "event_time_ms": 180_000})[1]
    ['b', 'c']
    """

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"buckets": {}, "total": 0, "last_ms": None, "history": [], "ratings": [], "sums": None, "sums_at": None}

    def transform_one(self, state: dict[str, Any], event: dict[str, Any]) -> tuple[list[float], list[str]]:
        now = int(event["event_time_ms"])
        return self._features(state, now, _Buckets.totals_at(state, now, self.cfg, len(EVENT_TYPES)))

    def learn_one(self, state: dict[str, Any], event: dict[str, Any],
                  _totals_now: list[list[int]] | None = None) -> dict[str, Any]:
        now = int(event["event_time_ms"])
        newest = _Buckets.learn(state, now, EVENT_TYPES.index(event["event_type"]), self.cfg, len(EVENT_TYPES),
                                _totals_now)
        state["total"] += 1
        state["last_ms"] = newest
        if self.cfg.history:
            state["history"] = (state["history"] + [event["item_id"]])[-self.cfg.history:]
        if event["event_type"] == "rating" and event.get("value") is not None:
            state["ratings"] = (state["ratings"] + [float(event["value"])])[-20:]
        return state

    def transform_learn(self, state: dict[str, Any], event: dict[str, Any]) -> tuple[list[float], list[str]]:
        """``transform_one`` then ``learn_one`` (what a keyed step does per event), sharing the window totals."""
        now = int(event["event_time_ms"])
        totals = _Buckets.totals_at(state, now, self.cfg, len(EVENT_TYPES))
        out = self._features(state, now, totals)
        self.learn_one(state, event, totals)
        return out

    def annotate(self, group: dict[str, Any], event: dict[str, Any], ttl_ms: int | None = None) -> dict[str, Any]:
        """The event with its user's features and history before it, learning it into the user's state in
        ``group`` (a key group's ``GroupStates``; a state idle for ``ttl_ms`` has expired): what the keyed
        user-feature steps do per event."""
        state = GroupStates.state_for(group, event["user_id"], event["event_time_ms"], self.new_state, ttl_ms)
        features, history = self.transform_learn(state, event)
        return {**event, "user_features": features, "history": history}

    def _features(self, state: dict[str, Any], now: int, totals: list[list[int]]) -> tuple[list[float], list[str]]:
        feats: list[float] = []
        for total in totals:
            feats.extend([log1p(c) if c > 0 else 0.0 for c in total])  # _log1p, inlined (the hot loop)
        feats.append(_log1p(state["total"]))
        last = state["last_ms"]
        feats.append(_log1p(max(0, now - last) / 1000.0) / 10.0 if last is not None else 1.5)
        ratings = state["ratings"]
        feats.append(sum(ratings) / len(ratings) / 5.0 if ratings else 0.0)
        return feats, list(state["history"])

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
            "sums": None, "sums_at": None,  # recounted on next use
        }


class ItemPopularity:
    """Per-item: event counts over each window (log1p) and recency of the item's last event.

    >>> f = ItemPopularity(FeatureConfig(windows_ms=(HOUR_MS, DAY_MS)))
    >>> group = GroupStates.new()
    >>> events = [{"item_id": "i1", "event_type": "view", "event_time_ms": t} for t in (0, 1_000, 2 * HOUR_MS)]
    >>> [[round(x, 3) for x in f.annotate(group, e)["item_features"]] for e in events]
    [[0.0, 0.0, 1.5], [0.693, 0.693, 0.069], [0.0, 1.099, 0.888]]
    """

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"buckets": {}, "last_ms": None, "sums": None, "sums_at": None}

    def transform_one(self, state: dict[str, Any], event: dict[str, Any]) -> list[float]:
        now = int(event["event_time_ms"])
        return self._features(state, now, _Buckets.totals_at(state, now, self.cfg, 1))

    def learn_one(self, state: dict[str, Any], event: dict[str, Any],
                  _totals_now: list[list[int]] | None = None) -> dict[str, Any]:
        state["last_ms"] = _Buckets.learn(state, int(event["event_time_ms"]), 0, self.cfg, 1, _totals_now)
        return state

    def transform_learn(self, state: dict[str, Any], event: dict[str, Any]) -> list[float]:
        """``transform_one`` then ``learn_one``, sharing the window totals."""
        now = int(event["event_time_ms"])
        totals = _Buckets.totals_at(state, now, self.cfg, 1)
        out = self._features(state, now, totals)
        self.learn_one(state, event, totals)
        return out

    def annotate(self, group: dict[str, Any], event: dict[str, Any], ttl_ms: int | None = None) -> dict[str, Any]:
        """The event with its item's popularity features before it (``UserFeaturizer.annotate``, per item)."""
        state = GroupStates.state_for(group, event["item_id"], event["event_time_ms"], self.new_state, ttl_ms)
        return {**event, "item_features": self.transform_learn(state, event)}

    @staticmethod
    def _features(state: dict[str, Any], now: int, totals: list[list[int]]) -> list[float]:
        feats = [log1p(total[0]) if total[0] > 0 else 0.0 for total in totals]
        last = state["last_ms"]
        feats.append(_log1p(max(0, now - last) / 1000.0) / 10.0 if last is not None else 1.5)
        return feats

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"buckets": _Buckets.merge(a["buckets"], b["buckets"]), "sums": None, "sums_at": None,
                "last_ms": max(x for x in (a["last_ms"], b["last_ms"], -1) if x is not None)
                if (a["last_ms"] is not None or b["last_ms"] is not None) else None}


FEATURIZED_FIELDS = ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "value", "context",
                     "user_features", "item_features", "history", "seq")
_FEATURIZED_SET = frozenset(FEATURIZED_FIELDS)


def featurized_record(event: dict[str, Any]) -> dict[str, Any]:
    """The event with exactly the fields of ``schemas/featurized_event.avsc`` (the event itself when it
    has exactly those; the featurizers' output does): what a shard's update step buffers."""
    if event.keys() == _FEATURIZED_SET:
        return event
    return {k: event.get(k) for k in FEATURIZED_FIELDS}
