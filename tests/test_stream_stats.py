"""Stream statistics on tfx-bsl's sketches (``monitoring.stream_stats``): they run in the project's
environment without TensorFlow (installed with --no-deps by scripts/setup.sh), their estimates are close
to the exact figures, and two windows' statistics merge into those of both."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter

from monitoring.stream_stats import StreamStats
from tests.helpers import valid_synthetic_events


def test_the_sketches_run_without_tensorflow_in_the_environment():
    assert importlib.util.find_spec("tensorflow") is None
    code = ("import sys; from monitoring.stream_stats import StreamStats; "
            "s = StreamStats().update([{'user_id': 'u', 'item_id': 'i', 'event_type': 'view', 'event_time_ms': 1}]); "
            "assert s.summary()['distinct_items'] == 1; assert 'tensorflow' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _events(n: int) -> list[dict]:
    return valid_synthetic_events(n, seed=11)


def test_estimates_are_close_to_the_exact_figures_and_halves_merge_into_the_whole():
    events = _events(20_000)
    whole = StreamStats().update(events).summary()
    users, items = {e["user_id"] for e in events}, Counter(e["item_id"] for e in events)
    assert abs(whole["distinct_users"] - len(users)) <= 0.05 * len(users)
    assert abs(whole["distinct_items"] - len(items)) <= 0.05 * len(items)
    assert whole["top_items"][0][0] == items.most_common(1)[0][0]
    values = sorted(e["value"] for e in events if e["value"] is not None)
    assert abs(whole["value"]["p50"] - values[len(values) // 2]) <= 0.02 * (values[-1] - values[0])
    assert whole["value"]["min"] == values[0] and whole["value"]["max"] == values[-1]
    assert whole["event_types"] == dict(sorted(Counter(e["event_type"] for e in events).items()))
    half = len(events) // 2
    merged = StreamStats().update(events[:half]).merge(StreamStats().update(events[half:])).summary()
    assert merged["events"] == whole["events"] and merged["event_types"] == whole["event_types"]
    assert merged["distinct_users"] == whole["distinct_users"] and merged["distinct_items"] == whole["distinct_items"]
    assert merged["top_items"][0] == whole["top_items"][0]
