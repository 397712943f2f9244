"""Window statistics and drift alerts: ``monitoring.window_stats`` merges and fits its schema, River's detectors
behind ``monitoring.drift`` fire on a shift and not on noise or a learning curve, and through the whole pipeline
each injected shift (a stalled shard among them: the sync lag) raises its alert within two windows while the same
stream without it raises none over 50."""

from __future__ import annotations

import pickle
import random

import pytest

import schemas
from bench.drift import run_scenario
from model.metrics import BinaryStats
from monitoring.drift import DriftMonitor, Signal, Watch
from monitoring.window_stats import WindowStats, split_by_window
from tests.helpers import valid_synthetic_events


def _events(n: int) -> list[dict]:
    return valid_synthetic_events(n, seed=5)


def _report(shard: int, events: list[dict], version: int) -> dict:
    rng = random.Random(version)
    stats = BinaryStats()
    stats.update([1.0, 0.0] * 10, [rng.random() for _ in range(20)])
    return {"shard": shard, "events": len(events), "version": version, "rollbacks": 0, "skipped_nonfinite": 0,
            "stats": stats.to_dict(), "max_event_time_ms": max(e["event_time_ms"] for e in events),
            "emit_time_ms": max(e["event_time_ms"] for e in events) + 1500, "table_rows": {"item": version},
            "evictions": {"item": 0}, "sync": {"merged": 1, "published": 1, "bytes_out": 10, "lag_epochs": version}}


def test_window_stats_of_two_halves_merge_into_the_whole_and_fit_the_schema():
    events = _events(4_000)
    half = len(events) // 2
    whole, a, b = WindowStats(), WindowStats(), WindowStats()
    for target, part in ((whole, events), (a, events[:half]), (b, events[half:])):
        target.add_events(part)
    for i, chunk in enumerate((events[:half], events[half:])):
        for target in (whole, a if i == 0 else b):
            target.add_report(_report(i % 2, chunk, i + 1))
            target.add_dead_letter({"reason": "late: 5 ms behind"})
    merged = a.merge(b).to_record(0, 10, 7)
    record = whole.to_record(0, 10, 7)
    schemas.encode(schemas.WINDOW_STATS, record)
    for key in ("events", "distinct_users", "distinct_items", "event_types", "dead_letters", "applied", "flushes",
                "logloss", "auc", "late_rate", "shards"):
        assert merged[key] == record[key], key
    assert record["dead_letters"] == {"late": 2} and record["applied"] == len(events)
    assert [s["shard"] for s in record["shards"]] == [0, 1] and record["freshness_lag_ms"]["p50"] == 1500.0
    assert [s["sync_lag_epochs"] for s in record["shards"]] == [1.0, 2.0]
    assert [(s, len(p)) for s, p in split_by_window([{"event_time_ms": t} for t in (3, 9, 1)], 5)] == [(0, 2), (5, 1)]


def test_a_watch_fires_on_a_shift_but_not_on_noise_or_on_an_improving_learning_curve():
    rng = random.Random(3)
    noise = Watch(Signal("logloss", "up", 0.01))
    assert not any(noise.update(0.4 + rng.gauss(0, 0.02)) for _ in range(300))
    curve = Watch(Signal("logloss", "up", 0.01))  # falls fast, then flattens: never a rise
    assert not any(curve.update(0.3 + 0.4 * 0.9 ** i + rng.gauss(0, 0.005)) for i in range(200))
    fired = [noise.update(0.4 + (0.3 if i >= 5 else 0.0) + rng.gauss(0, 0.02)) for i in range(10)]
    assert fired.index(next(f for f in fired if f)) == 5  # the first window of the shift
    with pytest.raises(ValueError, match="mode"):
        Signal("x", "sideways", 1.0)


def test_windows_without_valid_events_are_not_compared():
    monitor = DriftMonitor(warmup=1)
    empty = {"window_start_ms": 0, "window_end_ms": 1, "events": 0, "distinct_users": 0, "dead_letter_rate": 1.0,
             "late_rate": 0.0, "rollbacks": 0, "top_items": [], "shards": []}
    assert monitor.update(empty) == [] and monitor.windows == 0


def _synced_window(i: int, lags: dict[int, float]) -> dict:
    return {"window_start_ms": i * 60_000, "window_end_ms": (i + 1) * 60_000, "events": 900, "distinct_users": 300,
            "dead_letter_rate": 0.0, "late_rate": 0.0, "rollbacks": 0, "top_items": [], "logloss": None, "auc": None,
            "shards": [{"shard": s, "flushes": 14, "sync_lag_epochs": lag} for s, lag in sorted(lags.items())]}


@pytest.mark.parametrize("seed", range(5))
def test_the_sync_lag_alert_ignores_shards_running_out_of_step_and_fires_when_one_stops_publishing(seed):
    # as the streaming DirectRunner runs them (bench.drift's stall scenario): the shard furthest behind holds
    # the merge (its own lag about 0) while the others wait 6-25 epochs, and which shard that is changes every
    # two to five windows; then shard 0 publishes nothing for three windows and every other shard waits on it
    rng, holder, left, monitor, fired = random.Random(seed), 0, 0, DriftMonitor(), []
    for i in range(30):
        if not left:
            holder, left = rng.choice([s for s in range(4) if s != holder]), rng.randint(2, 5)
        left -= 1
        level = rng.uniform(6, 25)
        lags = {s: rng.uniform(0.2, 1.0) if s == holder else level + rng.uniform(-3, 3) for s in range(4)}
        fired += [(i, a.shard, a.signal) for a in monitor.update(_synced_window(i, lags))]
    assert fired == []
    messages = []
    for i, level in ((30, 10.0), (31, 25.0), (32, 40.0)):
        alerts = monitor.update(_synced_window(i, {s: level for s in (1, 2, 3)}))
        fired += [(i, a.shard, a.signal) for a in alerts]
        messages += [a.message for a in alerts]
    assert fired and fired[0][0] <= 31 and {(s, sig) for _, s, sig in fired} == {(-1, "sync_lag")}, fired
    # the alert names the shard that stopped, and how long ago it last learned
    n = fired[0][0] - 29
    assert messages[0].endswith(f"not learning in the window: shard 0 (last learned {n} window{'s' * (n > 1)} "
                                "before)"), messages[0]


@pytest.mark.parametrize("seed", range(5))
def test_windows_where_few_shards_learned_do_not_feed_the_sync_lag(seed):
    # a sparse stream over 4 shards (MovieLens at the README's 4 shards): in most windows one shard learns,
    # and now and then it waits long (a burst of one user's events, before event time reaches the quiet
    # shards); in one window of five, two to four learn and one of them holds the merge. A stall still shows,
    # where three of the four learn
    rng, monitor, fired = random.Random(seed), DriftMonitor(), []
    for i in range(80):
        if i % 5 == 0:
            learning = rng.sample(range(4), rng.randint(2, 4))
            lags = {s: rng.uniform(0, 1) if s == learning[0] else rng.uniform(2, 15) for s in learning}
        else:
            lags = {rng.randrange(4): rng.uniform(20, 60) if rng.random() < 0.15 else rng.uniform(0, 2)}
        fired += [(i, a.shard, a.signal) for a in monitor.update(_synced_window(i, lags))]
    assert fired == []
    for i, level in ((80, 10.0), (81, 25.0), (82, 40.0)):
        fired += [(i, a.shard, a.signal) for a in monitor.update(_synced_window(i, {s: level for s in (1, 2, 3)}))]
    # fed one window in five before, the watch knows the level less well: within the stall's three windows
    assert fired and fired[0][0] <= 82 and {(s, sig) for _, s, sig in fired} == {(-1, "sync_lag")}, fired


@pytest.mark.parametrize("kind", ["burst", "malformed", "popularity", "poison", "stall"])
def test_an_injected_shift_raises_its_alert_within_two_windows_through_the_pipeline(kind):
    r = run_scenario(kind, seed=0, windows=32, window_s=1800, at=24, bound=2)
    assert r["detected_after_windows"] is not None and r["detected_after_windows"] <= 2, r["alerts"]
    assert r["false_alarms"] == 0, r["alerts"]
    assert any(r["summary_alerts_by_signal"].get(s) for s in r["expected"]), r["summary_alerts_by_signal"]


def test_the_same_stream_without_a_shift_raises_no_alert_over_fifty_windows():
    r = run_scenario("none", seed=0, windows=52, window_s=1800, at=24, bound=2)
    assert r["windows_watched"] >= 50
    assert r["alerts"] == [] and r["summary_alerts_by_signal"] == {}


def test_the_sync_lag_alert_names_the_quiet_shards_longest_quiet_first():
    rng, monitor, alerts = random.Random(0), DriftMonitor(), []
    for i in range(30):  # six shards in step; shard 5 quiet from window 20, shard 2 from 24, then the others wait
        quiet = {5} if 20 <= i < 24 else {2, 5} if i >= 24 else set()
        lags = {s: 12.0 if i >= 24 else rng.uniform(0.2, 1.0) for s in range(6) if s not in quiet}
        alerts += monitor.update(_synced_window(i, lags))
    assert alerts and {a.signal for a in alerts} == {"sync_lag"}, alerts
    assert alerts[0].message.endswith("not learning in the window: shard 5 (last learned 5 windows before), "
                                      "shard 2 (last learned 1 window before)"), alerts[0].message
    old = pickle.loads(pickle.dumps(monitor))
    old.shards_seen = set(old.__dict__.pop("last_learned"))  # a monitor pickled before it kept their windows
    restored = pickle.loads(pickle.dumps(old))
    assert restored.last_learned == dict.fromkeys(range(6), -1) and not hasattr(restored, "shards_seen")
    assert restored._quiet_shards([{"shard": s} for s in (0, 1, 3, 4)]).endswith(": shard 2, shard 5")
    assert restored._quiet_shards([{"shard": 0}]).endswith(": shard 1, shard 2, shard 3 and 2 more")
    older = DriftMonitor()
    del older.__dict__["last_learned"]  # pickled before it kept the shards at all
    assert pickle.loads(pickle.dumps(older)).last_learned == {}
