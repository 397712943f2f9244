"""Shared test fixtures: featurized events, and a collecting sink that lives in an importable module."""

from __future__ import annotations

import json
import os
import random
import threading
from collections import defaultdict
from typing import Any

import apache_beam as beam

from core.featurizers import FeatureConfig
from model.config import LearnerConfig, TableConfig

FEATURES = FeatureConfig()
BASE_MS = 1_700_000_000_000


def cfg(**kw) -> LearnerConfig:
    """A small learner config over ``FEATURES`` (the model-core tests' default)."""
    table = kw.pop("table", TableConfig(dim=8))
    base = dict(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=table,
                item_table=table, gate=False, lr=0.1, negatives=3)
    base.update(kw)
    return LearnerConfig(**base)


def replay(learner: Any, events: list[dict[str, Any]], batch: int) -> tuple[list[float], list[float]]:
    """Learn ``events`` in batches of ``batch``; the prequential labels and probabilities."""
    labels, probs = [], []
    for i in range(0, len(events), batch):
        r = learner.learn(events[i : i + batch])
        labels += r.labels
        probs += r.probs
    return labels, probs


def featurized(i: int, user: str, item: str, t_ms: int, etype: str = "click", value: float | None = None,
               history: list[str] | None = None) -> dict[str, Any]:
    return {
        "event_id": f"e{i}", "user_id": user, "item_id": item, "event_type": etype, "event_time_ms": t_ms,
        "value": value, "context": {}, "user_features": [0.0] * FEATURES.user_width,
        "item_features": [0.0] * FEATURES.item_width, "history": history or [],
    }


def topic_stream(n: int, users: int = 60, items_per_topic: int = 20, topics: int = 4, seed: int = 0,
                 start_ms: int = BASE_MS) -> list[dict[str, Any]]:
    """Users of topic g click items of topic g: a learnable, time-ordered stream."""
    rng = random.Random(seed)
    history: dict[str, list[str]] = defaultdict(list)
    out = []
    for i in range(n):
        u = rng.randrange(users)
        item = f"i{rng.randrange(items_per_topic) * topics + u % topics}"
        user = f"u{u}"
        out.append(featurized(i, user, item, start_ms + i * 1000, history=history[user][-10:]))
        history[user].append(item)
    return out


class Collected:
    """Thread-safe store for pipeline outputs, keyed by a test-chosen name."""

    _lock = threading.Lock()
    _data: dict[str, list[Any]] = defaultdict(list)

    @classmethod
    def add(cls, key: str, value: Any) -> None:
        with cls._lock:
            cls._data[key].append(value)

    @classmethod
    def get(cls, key: str) -> list[Any]:
        with cls._lock:
            return list(cls._data.get(key, []))

    @classmethod
    def clear(cls) -> None:
        with cls._lock:
            cls._data.clear()


class CollectTo(beam.PTransform):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def expand(self, pcoll):
        key = self.key
        return pcoll | beam.Map(lambda v: Collected.add(key, v))


def fixed_clock() -> float:
    """Processing time for TestStream runs: TestStream's clock starts at epoch 0."""
    return 0.0


def valid_synthetic_events(n: int, seed: int) -> list[dict[str, Any]]:
    """The valid events among the first ``n`` of the embedded synthetic stream (the bad ones left out)."""
    from dataclasses import replace

    from core.cleaning import InvalidEvent, validate_event
    from core.readers import SyntheticConfig, synthetic_events

    out = []
    for raw in synthetic_events(replace(SyntheticConfig(), events=n, seed=seed)):
        try:
            out.append(validate_event(raw))
        except InvalidEvent:
            continue
    return out


def tied_ratings_csv(path: Any, events: int = 600) -> str:
    """A ratings CSV (``userId,movieId,rating,timestamp``, seconds) whose events come three to a second, as
    MovieLens' do: a user's ratings of one second, and several users' seconds. Its users and items come back
    after minutes, so a short ``--state_ttl_days`` expires some of their states between visits."""
    rows = []
    for j in range(events):
        k = j // 3
        user = k % 23 if j % 3 < 2 else 23 + (k * 5) % 31
        item = (j * 13) % 61
        rows.append(f"{user},{item},{1 + (user + item) % 5}.0,{1_600_000_000 + 30 * k}\n")
    with open(path, "w") as fh:
        fh.write("userId,movieId,rating,timestamp\n" + "".join(rows))
    return str(path)


def learned_records(out_dir: str) -> list[str]:
    """A run's scores and deltas, each as canonical JSON without its emit time (processing time), sorted: what
    two runs over the same events must agree on."""
    from pipelines.results import records

    found = [{k: v for k, v in r.items() if k != "emit_time_ms"}
             for folder in ("scores", "deltas") for r in records(os.path.join(out_dir, folder))]
    return sorted(json.dumps(r, sort_keys=True) for r in found)
