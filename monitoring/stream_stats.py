"""Stream statistics of a window of events, kept in mergeable sketches (tfx-bsl's, without TensorFlow).

``StreamStats`` holds, for the events it was given: distinct users and items (``KmvSketch``), the top
items and the heaviest users (``MisraGriesSketch``), quantiles of the value (a rating or price), of the
event-time gap between consecutive events and of the lateness of each event behind the newest one seen
before it (``QuantilesSketch``), and the event-type mix. Two of them merge into the statistics of both
windows' events, so a runner can keep one per bundle and combine them (a Beam ``CombineFn``, a Flink
aggregate).

>>> stats = StreamStats()
>>> _ = stats.update([{"user_id": "u1", "item_id": "a", "event_type": "click", "event_time_ms": 1000, "value": None},
...                   {"user_id": "u2", "item_id": "a", "event_type": "rating", "event_time_ms": 3000, "value": 4.0},
...                   {"user_id": "u1", "item_id": "b", "event_type": "click", "event_time_ms": 2000, "value": None}])
>>> s = stats.summary()
>>> s["events"], s["distinct_users"], s["distinct_items"], s["top_items"][0], s["event_types"]
(3, 2, 2, ('a', 2.0), {'click': 2, 'rating': 1})
>>> s["lateness_ms"]["max"], s["gap_ms"]["max"]  # the third event came 1 s behind the newest before it
(1000.0, 1000.0)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from tfx_bsl import sketches

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
_EPS, _MAX_N = 0.005, 1 << 40


class StreamStats:
    """Mergeable statistics of a window of events (see the module docstring)."""

    def __init__(self, kmv_k: int = 1024, top_k: int = 50) -> None:
        self.kmv_k, self.top_k = kmv_k, top_k
        self.users, self.items = sketches.KmvSketch(kmv_k), sketches.KmvSketch(kmv_k)
        self.top_items, self.heavy_users = sketches.MisraGriesSketch(top_k), sketches.MisraGriesSketch(top_k)
        self.values = sketches.QuantilesSketch(_EPS, _MAX_N, 1)
        self.gaps = sketches.QuantilesSketch(_EPS, _MAX_N, 1)
        self.lateness = sketches.QuantilesSketch(_EPS, _MAX_N, 1)
        self.types: Counter[str] = Counter()
        self.events = self.n_values = self.n_gaps = self.n_late = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None  # the newest event time seen
        self.newest_ms: int | None = None  # the newest event time of the arrivals (add_timing)

    def update(self, events: Iterable[dict[str, Any]], timing: bool = True) -> StreamStats:
        """Add a batch of validated events, in arrival order (lateness is measured against that order).

        With ``timing=False`` only what does not depend on the order is kept (counts, sketches, values); a
        runner that reorders events by key feeds the event-time gaps and lateness from the stream as it
        arrived, with ``add_timing``."""
        batch = list(events)
        if not batch:
            return self
        users = pa.array([str(e["user_id"]) for e in batch])
        items = pa.array([str(e["item_id"]) for e in batch])
        self.users.AddValues(users)
        self.items.AddValues(items)
        self.heavy_users.AddValues(users)
        self.top_items.AddValues(items)
        values = [float(e["value"]) for e in batch if e.get("value") is not None]
        if values:
            self.values.AddValues(pa.array(values, type=pa.float64()))
            self.n_values += len(values)
        self.types.update(str(e["event_type"]) for e in batch)
        self.events += len(batch)
        times = [int(e["event_time_ms"]) for e in batch]
        self.first_ms = min(times) if self.first_ms is None else min(self.first_ms, min(times))
        if timing:
            self.add_timing(batch)
        else:
            self.last_ms = max(times) if self.last_ms is None else max(self.last_ms, max(times))
        return self

    def add_timing(self, events: Iterable[dict[str, Any]]) -> StreamStats:
        """The event-time gaps and lateness of a run of events in arrival order."""
        late: list[float] = []
        newest: int | None = self.newest_ms
        times: list[int] = []
        for e in events:
            t = int(e["event_time_ms"])
            times.append(t)
            late.append(float(max(0, newest - t)) if newest is not None else 0.0)
            newest = t if newest is None else max(newest, t)
        if not times:
            return self
        self.lateness.AddValues(pa.array(late, type=pa.float64()))
        self.n_late += len(late)
        times.sort()
        gaps = [float(b - a) for a, b in zip(times, times[1:], strict=False)]
        if self.newest_ms is not None and times[0] > self.newest_ms:
            gaps.append(float(times[0] - self.newest_ms))
        if gaps:
            self.gaps.AddValues(pa.array(gaps, type=pa.float64()))
            self.n_gaps += len(gaps)
        assert newest is not None  # times is not empty
        self.newest_ms = newest
        self.last_ms = newest if self.last_ms is None else max(self.last_ms, newest)
        return self

    def merge(self, other: StreamStats) -> StreamStats:
        """Fold ``other`` (the same ``kmv_k`` and ``top_k``) into this one."""
        for mine, theirs in ((self.users, other.users), (self.items, other.items), (self.top_items, other.top_items),
                             (self.heavy_users, other.heavy_users), (self.values, other.values), (self.gaps, other.gaps),
                             (self.lateness, other.lateness)):
            mine.Merge(theirs)
        self.types.update(other.types)
        self.events += other.events
        self.n_values += other.n_values
        self.n_gaps += other.n_gaps
        self.n_late += other.n_late
        newest = [t for t in (self.newest_ms, other.newest_ms) if t is not None]
        self.newest_ms = max(newest) if newest else None
        firsts = [t for t in (self.first_ms, other.first_ms) if t is not None]
        lasts = [t for t in (self.last_ms, other.last_ms) if t is not None]
        self.first_ms, self.last_ms = (min(firsts) if firsts else None), (max(lasts) if lasts else None)
        return self

    @staticmethod
    def _quantiles(sketch: Any, n: int) -> dict[str, float] | None:
        if not n:
            return None
        q = sketch.GetQuantiles(100).to_pylist()[0]  # 101 equally spaced ranks: min, p1 ... p99, max
        names = ("min", "p25", "p50", "p75", "p90", "p99", "max")
        return {name: float(q[round(f * 100)]) for name, f in zip(names, QUANTILES, strict=True)}

    def summary(self) -> dict[str, Any]:
        """Plain values: counts, distinct estimates, top items and users as (id, count), most frequent first (ids
        tied at the lowest count of a full sketch are left out, so that the lists are the same in every process),
        quantiles."""
        def top(sketch: Any) -> list[tuple[str, float]]:
            pairs = [(r["values"].decode(), float(r["counts"])) for r in sketch.Estimate().to_pylist()]
            if len(pairs) >= self.top_k:  # a full sketch: which of the ids tied at its lowest count it kept depends
                low = min(c for _, c in pairs)  # on its hash order, which differs between processes; leave them out
                pairs = [p for p in pairs if p[1] > low]
            return sorted(pairs, key=lambda p: (-p[1], p[0]))  # ties by id

        return {"events": self.events, "first_event_ms": self.first_ms, "last_event_ms": self.last_ms,
                "distinct_users": int(self.users.Estimate()), "distinct_items": int(self.items.Estimate()),
                "top_items": top(self.top_items), "heavy_users": top(self.heavy_users),
                "value": self._quantiles(self.values, self.n_values), "gap_ms": self._quantiles(self.gaps, self.n_gaps),
                "lateness_ms": self._quantiles(self.lateness, self.n_late),
                "event_types": dict(sorted(self.types.items()))}
