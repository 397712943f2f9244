"""Drift detectors on injected shifts, and their false-alarm rate on the same stream without them.

Each scenario is the embedded synthetic stream cut into ``--window_s`` event-time windows, with one shift
injected from window ``--at`` (counted from the first whole window), run through the pipeline itself
(``pipelines.cli``, the DirectRunner, default flags but ``--stats_window_s``). The alerts it raises are
read back from ``alerts/``:

  none        the stream as it is: every alert is a false alarm
  burst       traffic x5 for two windows (each event four more times)          -> traffic_volume
  malformed   40% of the events malformed for two windows                      -> dead_letter_rate
  popularity  from then on every item is renamed (the hot items go cold)       -> top_items_churn
  poison      three windows of clicks on items drawn at random (label noise)   -> prequential_logloss or _auc
  stall       shard 0 gets no events for three windows (its users' events come from stand-ins on the other
              shards: the same traffic), so it publishes nothing and the others' publications wait -> sync_lag

    python -m bench.drift --windows 60 --seeds 3 --json bench/results/drift.json

writes ``{"window_s": w, "windows": n, "scenarios": [{"scenario": ..., "seed": s, "expected": signal,
"detected_after_windows": k | null, "false_alarms": f, "alerts": [...]}], "false_alarm_rate": r}``, where a
false alarm is an alert outside the windows the shift can explain (from ``--at`` to ``--at`` + the shift's
length + ``--bound``), and the rate is false alarms per window watched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

from core.readers import SyntheticConfig, synthetic_events
from core.settings import DEFAULTS
from model.hashing import shard_of
from pipelines.results import records

EXPECTED = {"none": (), "burst": ("traffic_volume",), "malformed": ("dead_letter_rate",),
            "popularity": ("top_items_churn",), "poison": ("prequential_logloss", "prequential_auc"),
            "stall": ("sync_lag",)}
# flags a scenario adds to the defaults: shards sync only in streaming runs (a bounded DirectRunner run learns
# them alone, pipelines.cli), and micro-batches of 64 have each shard publish a few times per window
EXTRA = {"stall": ["--streaming", "--batch_size", "64"]}
SHARDS = DEFAULTS["shards"]  # the pipeline's default, which the scenarios run with
LENGTH = {"none": 0, "burst": 2, "malformed": 2, "popularity": 1, "poison": 3, "stall": 3}


def _elsewhere(user: str) -> str:
    """A stand-in for ``user`` (one of its own, so the distinct users stay as they were) on a shard other than 0."""
    j = 0
    while shard_of(f"{user}~{j}", SHARDS) == 0:
        j += 1
    return f"{user}~{j}"


def first_window_ms(window_s: int) -> int:
    """Start of the synthetic stream's first whole window."""
    w = window_s * 1000
    return (SyntheticConfig().start_ms // w + 1) * w


def scenario_events(kind: str, seed: int, windows: int, window_s: int, at: int) -> list[dict[str, Any]]:
    """The synthetic stream over ``windows`` whole windows (plus the partial first one) with ``kind`` injected."""
    if kind not in EXPECTED:
        raise ValueError(f"unknown scenario {kind!r}; known: {', '.join(EXPECTED)}")
    w = window_s * 1000
    cfg = replace(SyntheticConfig(), seed=seed)
    cfg = replace(cfg, events=(windows + 1) * w // cfg.mean_gap_ms)
    first = first_window_ms(window_s)
    rng = random.Random(seed * 7919 + 1)
    out: list[dict[str, Any]] = []
    for e in synthetic_events(cfg):
        t = e.get("event_time_ms")
        k = (t - first) // w if isinstance(t, int) else -1
        inside = at <= k < at + LENGTH[kind]
        if kind == "burst" and inside:
            out.append(e)
            out.extend({**e, "event_id": f"{e['event_id']}-b{j}", "event_time_ms": t + 17 * j} for j in range(1, 5))
            continue
        if kind == "malformed" and inside and rng.random() < 0.4:
            out.append({k2: v for k2, v in e.items() if k2 != "item_id"})
            continue
        if kind == "popularity" and k >= at and "item_id" in e:
            e = {**e, "item_id": f"n{e['item_id']}"}
        if kind == "stall" and inside and shard_of(str(e.get("user_id")), SHARDS) == 0:
            e = {**e, "user_id": _elsewhere(str(e["user_id"]))}  # the same traffic, none of it on shard 0
        if kind == "poison" and inside and "item_id" in e:
            e = {**e, "item_id": f"i{rng.randrange(cfg.items)}", "event_type": "click", "value": None}
        out.append(e)
    return out


def run_scenario(kind: str, seed: int, windows: int, window_s: int, at: int, bound: int,
                 extra: list[str] | None = None) -> dict[str, Any]:
    from pipelines import cli

    events = scenario_events(kind, seed, windows, window_s, at)
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "events.jsonl"), os.path.join(tmp, "out")
        with open(data, "w") as fh:
            for e in events:
                fh.write(json.dumps(e) + "\n")
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the run's own summary: stdout is this script's
            rc = cli.main(["--data", data, "--output_dir", out, "--stats_window_s", str(window_s), "--quiet",
                           "--max_dead_letter_fraction", "1", *EXTRA.get(kind, []), *(extra or [])])
        if rc != 0:
            raise RuntimeError(f"scenario {kind}: the pipeline exited {rc}")
        alerts = sorted(records(os.path.join(out, "alerts")), key=lambda a: a["window_start_ms"])
        stats = sorted(records(os.path.join(out, "stats")), key=lambda r: r["window_start_ms"])
        with open(os.path.join(out, "summary.json")) as fh:
            counted = json.load(fh)["alerts_by_signal"]
        seconds = time.perf_counter() - start
    w = window_s * 1000
    first = first_window_ms(window_s)
    expected = EXPECTED[kind]
    explained = range(at, at + LENGTH[kind] + bound)
    detected, false_alarms, listed = None, 0, []
    for a in alerts:
        k = (a["window_start_ms"] - first) // w
        listed.append({"window": k, "shard": a["shard"], "signal": a["signal"], "value": round(a["value"], 4),
                       "baseline": round(a["baseline"], 4), "severity": a["severity"], "message": a["message"]})
        if a["signal"] in expected and k in explained and a["shard"] == -1:
            detected = k - at if detected is None else min(detected, k - at)
        elif k not in explained:
            false_alarms += 1
    return {"scenario": kind, "seed": seed, "expected": expected, "detected_after_windows": detected,
            "false_alarms": false_alarms, "windows_watched": len(stats), "events": len(events),
            "seconds": round(seconds, 1), "alerts": listed, "summary_alerts_by_signal": counted}


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=60, help="whole windows per scenario")
    ap.add_argument("--window_s", type=int, default=1800, help="event-time window of the statistics (900 events)")
    ap.add_argument("--at", type=int, default=30, help="window the shift starts in")
    ap.add_argument("--bound", type=int, default=2, help="windows after the shift within which it must be detected")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(EXPECTED))
    ap.add_argument("--json", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    runs = []
    for seed in range(args.seeds):
        for kind in args.scenarios.split(","):
            r = run_scenario(kind, seed, args.windows, args.window_s, args.at, args.bound)
            runs.append(r)
            print(f"{kind:11s} seed {seed}: expected {'/'.join(r['expected']) or '-':20s} detected after "
                  f"{r['detected_after_windows']} windows, false alarms {r['false_alarms']} of "
                  f"{r['windows_watched']} windows ({r['seconds']} s)", file=sys.stderr)
    watched = sum(r["windows_watched"] for r in runs)
    result = {"window_s": args.window_s, "windows": args.windows, "at": args.at, "bound": args.bound,
              "scenarios": runs, "false_alarms": sum(r["false_alarms"] for r in runs), "windows_watched": watched,
              "false_alarm_rate": sum(r["false_alarms"] for r in runs) / max(watched, 1)}
    print(f"false alarms: {result['false_alarms']} in {watched} windows watched "
          f"(rate {result['false_alarm_rate']:.4f} per window)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
