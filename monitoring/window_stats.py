"""The statistics of one event-time window: the stream, its dead letters, and what the shards learned.

``WindowStats`` is a mergeable accumulator over three kinds of input, the three a runner has at hand:
the window's valid events (``add_events``: a ``StreamStats`` of tfx-bsl sketches), its dead letters
(``add_dead_letter``: counted by reason) and the flush reports of the shards (``add_report``: applied
events, flushes, rollbacks, prequential statistics, table sizes and evictions, freshness lag, per
shard). ``to_record`` gives the ``schemas/window_stats.avsc`` record that the drift detectors
(``monitoring.drift``) and the report (``freshrec report``) read. Beam's ``ComputeWindowStats`` and the
PyFlink job are thin adapters over it.

>>> w = WindowStats()
>>> _ = w.add_events([{"user_id": "u1", "item_id": "a", "event_type": "click", "event_time_ms": 1_000, "value": None}])
>>> _ = w.add_dead_letter({"reason": "late: 2 h behind the watermark"})
>>> r = w.to_record(0, 3_600_000, emit_time_ms=5)
>>> r["events"], r["dead_letters"], r["dead_letter_rate"], r["late_rate"], r["shards"]
(1, {'late': 1}, 0.5, 0.5, [])
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
from tfx_bsl import sketches

from model.metrics import BinaryStats
from monitoring.stream_stats import _EPS, _MAX_N, StreamStats

LATE_REASON = "late"


def split_by_window(events: Iterable[dict[str, Any]], window_ms: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(window start, events of that window) for a batch of events, in arrival order within each window.

    >>> [(s, len(b)) for s, b in split_by_window([{"event_time_ms": t} for t in (5, 12, 7, 25)], 10)]
    [(0, 2), (10, 1), (20, 1)]
    """
    if window_ms < 1:
        raise ValueError(f"split_by_window: window_ms must be >= 1, got {window_ms}")
    parts: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        t = int(e["event_time_ms"])
        parts.setdefault(t - t % window_ms, []).append(e)
    yield from sorted(parts.items())


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


class _ShardWindow:
    """What one shard's flushes in the window added up to."""

    def __init__(self) -> None:
        self.applied = self.flushes = self.rollbacks = self.skipped = self.merged = self.published = 0
        self.lag_epochs = 0  # the sync lags of the window's flushes, summed
        self.version = -1
        self.quality = BinaryStats()
        self.table_rows: dict[str, int] = {}
        self.evictions: dict[str, int] = {}

    def add(self, report: dict[str, Any]) -> None:
        self.applied += int(report["events"])
        self.flushes += 1
        self.rollbacks += int(report.get("rollbacks", 0))
        self.skipped += int(report.get("skipped_nonfinite", 0))
        sync = report.get("sync") or {}
        self.merged += int(sync.get("merged", 0))
        self.published += int(sync.get("published", 0))
        self.lag_epochs += int(sync.get("lag_epochs", 0))
        self.quality = self.quality.merge(BinaryStats.from_dict(report["stats"]))
        if int(report["version"]) >= self.version:
            self.version = int(report["version"])
            self.table_rows = dict(report.get("table_rows") or {})
            self.evictions = dict(report.get("evictions") or {})

    def merge(self, other: _ShardWindow) -> None:
        for name in ("applied", "flushes", "rollbacks", "skipped", "merged", "published", "lag_epochs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.quality = self.quality.merge(other.quality)
        if other.version >= self.version:
            self.version, self.table_rows, self.evictions = other.version, other.table_rows, other.evictions

    def to_record(self, shard: int) -> dict[str, Any]:
        return {"shard": shard, "applied": self.applied, "flushes": self.flushes, "rollbacks": self.rollbacks,
                "skipped_nonfinite": self.skipped, "version": max(self.version, 0),
                "logloss": _finite(self.quality.logloss()), "auc": _finite(self.quality.auc()),
                "table_rows": {k: int(v) for k, v in self.table_rows.items()},
                "evictions": {k: int(v) for k, v in self.evictions.items()},
                "sync_merged": self.merged, "sync_published": self.published, "sync_lag_epochs": self.lag_epochs / self.flushes if self.flushes else 0.0}


class WindowStats:
    """Mergeable statistics of one event-time window (see the module docstring)."""

    def __init__(self, kmv_k: int = 1024, top_k: int = 50) -> None:
        self.stream = StreamStats(kmv_k, top_k)
        self.dead: Counter[str] = Counter()
        self.shards: dict[int, _ShardWindow] = {}
        self.lag = sketches.QuantilesSketch(_EPS, _MAX_N, 1)
        self.lag_weight = 0
        self.first_emit_ms: int | None = None
        self.last_emit_ms: int | None = None

    def add_events(self, events: Iterable[dict[str, Any]], timing: bool = True) -> WindowStats:
        """Valid events; ``timing=False`` where they are not in arrival order (then ``add_arrivals`` them too)."""
        self.stream.update(events, timing)
        return self

    def add_arrivals(self, events: Iterable[dict[str, Any]]) -> WindowStats:
        """Events in the order they arrived, for their event-time gaps and lateness only."""
        self.stream.add_timing(events)
        return self

    def add_dead_letter(self, record: dict[str, Any]) -> WindowStats:
        self.dead[str(record["reason"]).split(":")[0]] += 1
        return self

    def add_report(self, report: dict[str, Any]) -> WindowStats:
        """One flush report (``transforms.update`` / the PyFlink job): counts, quality and tables of its shard."""
        self.shards.setdefault(int(report["shard"]), _ShardWindow()).add(report)
        emit, newest, n = int(report["emit_time_ms"]), int(report["max_event_time_ms"]), int(report["events"])
        if n:
            self.lag.AddValues(pa.array([float(emit - newest)], type=pa.float64()), pa.array([float(n)]))
            self.lag_weight += n
        self.first_emit_ms = emit if self.first_emit_ms is None else min(self.first_emit_ms, emit)
        self.last_emit_ms = emit if self.last_emit_ms is None else max(self.last_emit_ms, emit)
        return self

    def merge(self, other: WindowStats) -> WindowStats:
        self.stream.merge(other.stream)
        self.dead.update(other.dead)
        for shard, part in other.shards.items():
            self.shards.setdefault(shard, _ShardWindow()).merge(part)
        self.lag.Merge(other.lag)
        self.lag_weight += other.lag_weight
        for name, pick in (("first_emit_ms", min), ("last_emit_ms", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))
        return self

    def to_record(self, window_start_ms: int, window_end_ms: int, emit_time_ms: int) -> dict[str, Any]:
        """The ``schemas/window_stats.avsc`` record of this window."""
        s = self.stream.summary()
        dead = sum(self.dead.values())
        seen = s["events"] + dead
        quality = BinaryStats()
        for part in self.shards.values():
            quality = quality.merge(part.quality)

        def counts(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
            return [{"id": k, "count": float(v)} for k, v in pairs]

        return {
            "window_start_ms": int(window_start_ms), "window_end_ms": int(window_end_ms),
            "events": s["events"], "distinct_users": s["distinct_users"], "distinct_items": s["distinct_items"],
            "top_items": counts(s["top_items"]), "heavy_users": counts(s["heavy_users"]),
            "value": s["value"], "gap_ms": s["gap_ms"], "lateness_ms": s["lateness_ms"],
            "event_types": {k: int(v) for k, v in s["event_types"].items()},
            "dead_letters": dict(sorted(self.dead.items())),
            "dead_letter_rate": dead / seen if seen else 0.0,
            "late_rate": self.dead[LATE_REASON] / seen if seen else 0.0,
            "applied": sum(p.applied for p in self.shards.values()),
            "flushes": sum(p.flushes for p in self.shards.values()),
            "rollbacks": sum(p.rollbacks for p in self.shards.values()),
            "logloss": _finite(quality.logloss()), "auc": _finite(quality.auc()),
            "freshness_lag_ms": StreamStats._quantiles(self.lag, self.lag_weight),
            "first_emit_ms": self.first_emit_ms, "last_emit_ms": self.last_emit_ms,
            "shards": [self.shards[k].to_record(k) for k in sorted(self.shards)],
            "emit_time_ms": int(emit_time_ms),
        }
