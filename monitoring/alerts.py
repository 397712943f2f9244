"""Alerts (``schemas/alert.avsc``) and the detector of a shard that has stopped learning.

A flush whose every optimizer step was skipped for non-finite values (a poisoned input, an exploding
feature) still accounts for its events, as applied, but the shard learned nothing from them. One such
flush is an incident the summary counts; a run of them means the shard has stopped learning, and
``SkippedStepsAlarm`` raises an alert: after ``after`` consecutive such flushes, and again each time
the run of them doubles, so that a long outage keeps reporting without flooding the output. A flush that
learns ends the run of them.

The alarm's state is a plain list kept in the shard's keyed state (``model.journal.new_meta``), so it
survives restarts with the rest of the shard.

>>> alarm = SkippedStepsAlarm(after=2)
>>> meta = {}
>>> [alarm.update(meta, shard=0, events=10, not_learned=10, oldest_ms=t, newest_ms=t + 9) is not None
...  for t in (0, 10, 20, 30)]
[False, True, False, True]
>>> alarm.update(meta, shard=0, events=10, not_learned=0, oldest_ms=40, newest_ms=49) is None
True
>>> meta["skip_streak"]
[0, 0, 0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Alert:
    """One firing of a detector: ``signal`` of ``shard`` (-1: the whole run) was ``value`` against
    ``baseline`` over the event-time window [``window_start_ms``, ``window_end_ms``]."""

    window_start_ms: int
    window_end_ms: int
    shard: int
    signal: str
    value: float
    baseline: float
    detector: str
    severity: str
    message: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert.severity must be one of {SEVERITIES}, got {self.severity!r}")
        if self.window_end_ms < self.window_start_ms:
            raise ValueError("Alert: window_end_ms is before window_start_ms")

    def to_record(self, emit_time_ms: int) -> dict[str, Any]:
        """The ``schemas/alert.avsc`` record."""
        return {**asdict(self), "value": float(self.value), "baseline": float(self.baseline),
                "emit_time_ms": int(emit_time_ms)}


class SkippedStepsAlarm:
    """Raises an alert when a shard keeps skipping its steps for non-finite values.

    Parameters
    ----------
    after
        Consecutive flushes with no step learned before the first alert (then again at 2x, 4x, ...).
    """

    SIGNAL = "steps_skipped_nonfinite"
    DETECTOR = "consecutive_skipped_flushes"

    def __init__(self, after: int = 3):
        if after < 1:
            raise ValueError(f"SkippedStepsAlarm: after must be >= 1, got {after}")
        self.after = after

    def update(self, meta: dict[str, Any], shard: int, events: int, not_learned: int, oldest_ms: int,
               newest_ms: int) -> Alert | None:
        """Count one flush of ``events`` (``not_learned`` of them not learned) into ``meta["skip_streak"]``
        ([flushes, events not learned, event time the run of them began]); the alert, if one is due."""
        streak = meta.get("skip_streak") or [0, 0, 0]
        if not not_learned or not_learned < events:  # it learned: the run of skipped flushes is over
            meta["skip_streak"] = [0, 0, 0]
            return None
        flushes, lost, start = streak[0] + 1, streak[1] + not_learned, streak[2] if streak[0] else oldest_ms
        meta["skip_streak"] = [flushes, lost, start]
        if flushes < self.after or flushes % self.after or (flushes // self.after) & (flushes // self.after - 1):
            return None  # due at after, 2 after, 4 after, ...
        return Alert(start, max(start, newest_ms), shard, self.SIGNAL, float(flushes), float(self.after), self.DETECTOR,
                     "critical", f"shard {shard} learned nothing from its last {flushes} flushes ({lost} events): every "
                     "step was skipped for non-finite values")
