"""Drift and anomaly detection over the window statistics, with River's detectors.

``DriftMonitor.update`` takes the ``schemas/window_stats.avsc`` records of a run in event-time order and returns
the alerts (``monitoring.alerts.Alert``) they raise. Each signal of the whole run (shard -1), and of each shard
for those watched per shard, has its own ``Watch``: the signal is standardised against its own recent level
(River's exponentially weighted mean, ``stats.EWMean``) and noise (the EW mean of the change from one window to
the next, which a slow trend such as the learning curve does not inflate as a variance would), with a floor on
the scale (``resolution``: the smallest change worth an alert, so that a flat signal's tiny variance does not
turn noise into alarms), and River's Page-Hinkley test (``drift.PageHinkley``) watches the standardised value
for a sustained shift in the signal's direction of harm. After a firing the watch stays quiet for ``cooldown``
windows while it keeps learning the new level, then starts a fresh test.

Signals (``SIGNALS``): prequential logloss (up) and AUC (down), overall and per shard; popularity churn
(the share of the top items not among the previous window's); traffic volume and distinct users (log
scale, either way); the dead-letter and late rates (up); rollbacks per window (up, overall and per shard); the
sync lag (up, of the run only): the least, over the shards that learned in the window, of a shard's publications
not yet merged back (averaged over its flushes). Shards that run out of step wait on the one furthest behind,
which holds the merge and so has no lag of its own: the least is about 0 however far the others are ahead, and
it grows only when every learning shard waits, on a shard that has stopped publishing. It is taken only in a
window where at least half of the run's shards (those seen learning so far) learned: where fewer did, as in a
sparse stream over many shards, the one holding the merge is seldom among them, and a burst of one user's events
makes its shard wait on the quiet ones until event time reaches them, so the least said nothing of a stall
(docs/benchmarks.md, "Drift alerts"). A shard's own lag (in the window statistics) says that it waits, not who
holds it, and swings as the runner changes which shard is behind, so it is not watched per shard. The run's
alert names instead the shards seen learning before that did not learn in the window, the longest quiet first:
the one holding the merge is likely among them (it has no lag of its own, so where it learned, the least lag
would be near 0).

>>> monitor = DriftMonitor(warmup=3)
>>> def window(i, events, dead=0):
...     return {"window_start_ms": i * 60_000, "window_end_ms": (i + 1) * 60_000, "events": events,
...             "distinct_users": events // 3, "dead_letter_rate": dead / (events + dead), "late_rate": 0.0,
...             "rollbacks": 0, "top_items": [], "logloss": None, "auc": None, "shards": []}
>>> [len(monitor.update(window(i, 1000 + 10 * (i % 3)))) for i in range(8)]
[0, 0, 0, 0, 0, 0, 0, 0]
>>> [a.signal for a in monitor.update(window(8, 1000, dead=400))]
['dead_letter_rate']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from river import drift, stats

from monitoring.alerts import Alert

DETECTOR = "page_hinkley"
TOP_N = 10  # the top items compared between consecutive windows
CLIP = 3.0  # standard units an outlier counts for in the level and noise a watch learns
_MEAN_ABS_DIFF = 2 / math.sqrt(math.pi)  # E|x - x'| / sd for independent normal draws
VOLUME = ("traffic_volume", "distinct_users")  # not compared in a window the input only partly covers


@dataclass(frozen=True)
class Signal:
    """A quantity watched per window: ``mode`` is the direction of harm (up, down, both); ``log``: watched on
    log(1 + x); ``resolution``: the smallest change (in the watched units) worth an alert."""

    name: str
    mode: str
    resolution: float
    log: bool = False
    per_shard: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("up", "down", "both"):
            raise ValueError(f"Signal {self.name}: mode must be up, down or both, got {self.mode!r}")
        if self.resolution <= 0:
            raise ValueError(f"Signal {self.name}: resolution must be > 0, got {self.resolution}")


SIGNALS: tuple[Signal, ...] = (
    Signal("prequential_logloss", "up", 0.02, per_shard=True),
    Signal("prequential_auc", "down", 0.02, per_shard=True),
    Signal("top_items_churn", "up", 0.1),
    Signal("traffic_volume", "both", 0.1, log=True),
    Signal("distinct_users", "both", 0.1, log=True),
    Signal("dead_letter_rate", "up", 0.01),
    Signal("late_rate", "up", 0.01),
    Signal("rollbacks", "up", 1.0, per_shard=True),
    Signal("sync_lag", "up", 1.0),
)


class Watch:
    """One signal of one shard: River's EW means standardise it, River's Page-Hinkley tests it.

    Parameters
    ----------
    signal
        What is watched (its direction and resolution).
    warmup
        Windows that only teach the level before the test runs.
    fading
        The EW statistics' fading factor (weight of the newest window).
    delta, threshold
        Page-Hinkley's tolerated drift and alarm threshold, in standard units.
    forget
        Page-Hinkley's fading factor of its cumulative sums (River's ``alpha``): below 1 an old excess fades, so
        a signal that trends slowly (the learning curve) does not build up to an alarm.
    cooldown
        Windows without a firing after one.
    """

    def __init__(self, signal: Signal, warmup: int = 5, fading: float = 0.1, delta: float = 0.5,
                 threshold: float = 7.0, forget: float = 0.8, cooldown: int = 5):
        self.signal, self.warmup, self.cooldown = signal, warmup, cooldown
        self.mean, self.noise = stats.EWMean(fading), stats.EWMean(fading)
        self.previous: float | None = None
        self.test = drift.PageHinkley(min_instances=1, delta=delta, threshold=threshold, alpha=forget,
                                       mode=signal.mode)
        self.seen, self.quiet = 0, 0

    def update(self, value: float) -> tuple[float, float] | None:
        """Learn one window's value; (standard score, baseline in the signal's units) when it fires."""
        x = learned = math.log1p(max(value, 0.0)) if self.signal.log else value
        fired = None
        if self.seen >= self.warmup:
            baseline = self.mean.get()
            scale = max(self.noise.get() / _MEAN_ABS_DIFF, self.signal.resolution)
            z = (x - baseline) / scale
            # the level and noise learn an outlier as at most CLIP scales off: a burst of a few windows does
            # not move the baseline it is judged against, nor inflate the noise, for long after
            learned = baseline + max(-CLIP, min(CLIP, z)) * scale
            # only the harmful side reaches the test: a signal improving along a trend (the learning curve) would
            # otherwise read as a rise once the trend flattens, Page-Hinkley centring on its own long-run mean
            low, high = {"up": (0.0, 10.0), "down": (-10.0, 0.0), "both": (-10.0, 10.0)}[self.signal.mode]
            self.test.update(max(low, min(high, z)))
            if self.test.drift_detected and self.quiet == 0:
                fired = (z, math.expm1(baseline) if self.signal.log else baseline)
                self.quiet = self.cooldown
            elif self.quiet:
                self.quiet -= 1
                if not self.quiet:  # a fresh test: the shift and its aftermath are not in the mean it centres on
                    self.test = self.test.clone()
        self.mean.update(learned)
        if self.previous is not None:
            self.noise.update(abs(learned - self.previous))
        self.previous = learned
        self.seen += 1
        return fired


def _churn(previous: list[str] | None, current: list[str]) -> float | None:
    if not previous or not current:
        return None
    return 1.0 - len(set(previous) & set(current)) / max(len(current), 1)


def _least_lag(parts: list[dict[str, Any]], shards: int) -> float | None:
    """The run's sync lag in a window: the least lag of the shards that learned in it, where they are at least
    half of the ``shards`` the run has (otherwise None: the window does not say)."""
    if not parts or 2 * len(parts) < shards:
        return None
    return min(float(p.get("sync_lag_epochs", 0)) for p in parts)


class DriftMonitor:
    """Every signal of ``SIGNALS`` for the whole run and each shard; feed it windows in event-time order."""

    def __init__(self, signals: tuple[Signal, ...] = SIGNALS, **watch_args: Any):
        self.signals, self.watch_args = signals, watch_args
        self.watches: dict[tuple[str, int], Watch] = {}
        self.previous_top: list[str] | None = None
        self.windows = 0
        # the shards that learned in any window so far -> the newest window (its count) each learned in
        self.last_learned: dict[int, int] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a monitor pickled before it kept them starts here: with the shards it had seen (``shards_seen``, kept
        # before the windows were), each in an unknown window (-1)
        self.__dict__.update({"last_learned": dict.fromkeys(state.pop("shards_seen", ()), -1), **state})

    def _quiet_shards(self, parts: list[dict[str, Any]]) -> str:
        """The shards seen learning before that did not learn in this window, the longest quiet first."""
        learned = {int(p["shard"]) for p in parts}
        quiet = sorted((last, s) for s, last in self.last_learned.items() if s not in learned)
        if not quiet:
            return "; every shard seen learning so far learned in the window"
        named = []
        for last, s in quiet[:3]:
            n = self.windows - last
            named.append(f"shard {s}" if last < 0 else f"shard {s} (last learned {n} window{'s' * (n > 1)} before)")
        more = f" and {len(quiet) - 3} more" if len(quiet) > 3 else ""
        return "; not learning in the window: " + ", ".join(named) + more

    def _watch(self, signal: Signal, shard: int) -> Watch:
        key = (signal.name, shard)
        if key not in self.watches:
            self.watches[key] = Watch(signal, **self.watch_args)
        return self.watches[key]

    def values(self, record: dict[str, Any], partial: bool = False) -> dict[tuple[str, int], float]:
        """The signals' values in one window record, by (signal, shard); absent where undefined. A ``partial``
        window (the first of a run, or the last of a bounded one) has no traffic volume or distinct users."""
        top = [c["id"] for c in record.get("top_items") or []][:TOP_N]
        parts = record.get("shards") or []
        self.last_learned.update((int(p["shard"]), self.windows) for p in parts)
        overall: dict[str, Callable[[], float | None]] = {
            "prequential_logloss": lambda: record.get("logloss"), "prequential_auc": lambda: record.get("auc"),
            "top_items_churn": lambda: _churn(self.previous_top, top), "traffic_volume": lambda: record["events"],
            "distinct_users": lambda: record["distinct_users"], "dead_letter_rate": lambda: record["dead_letter_rate"],
            "late_rate": lambda: record["late_rate"], "rollbacks": lambda: record["rollbacks"],
            "sync_lag": lambda: _least_lag(parts, len(self.last_learned))}
        out: dict[tuple[str, int], float] = {}
        for signal in self.signals:
            value = overall[signal.name]()
            if value is not None and not (partial and signal.name in VOLUME):
                out[(signal.name, -1)] = float(value)
            if signal.per_shard:
                field = {"prequential_logloss": "logloss", "prequential_auc": "auc"}.get(signal.name, signal.name)
                for part in parts:
                    if part.get(field) is not None:
                        out[(signal.name, int(part["shard"]))] = float(part[field])
        self.previous_top = top or self.previous_top
        return out

    def update(self, record: dict[str, Any], last: bool = False) -> list[Alert]:
        """The alerts one window raises (the record is a ``window_stats`` record); ``last``: the last window of a
        bounded input, which ends where the input does (its traffic is not compared, nor is the first window's)."""
        if not record.get("events"):
            return []  # no valid event in the window (only dead letters without a usable time): nothing to compare
        by_name = {s.name: s for s in self.signals}
        alerts = []
        self.windows += 1
        for (name, shard), value in sorted(self.values(record, partial=last or self.windows == 1).items()):
            fired = self._watch(by_name[name], shard).update(value)
            if fired is None:
                continue
            z, baseline = fired
            where = "the run" if shard < 0 else f"shard {shard}"
            who = self._quiet_shards(record.get("shards") or []) if name == "sync_lag" else ""
            alerts.append(Alert(int(record["window_start_ms"]), int(record["window_end_ms"]) - 1, shard, name, value,
                                baseline, DETECTOR, "critical" if abs(z) >= 10 else "warning",
                                f"{name} of {where} moved to {value:.4g} from a recent level of {baseline:.4g} "
                                f"({z:+.1f} standard units){who}"))
        return alerts
