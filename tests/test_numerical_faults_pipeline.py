"""Numerical faults injected into the shard update step of the Beam pipeline: NaN/Inf features and
exploding inputs are counted as skipped steps and never reach a published delta or score."""

from __future__ import annotations

import math

import apache_beam as beam

from core.settings import UpdateConfig
from model.config import LearnerConfig, TableConfig
from tests.helpers import FEATURES, Collected, CollectTo, topic_stream
from transforms.update import DELTAS, REPORTS, SCORES, UpdateShardModels


def test_nan_inf_and_huge_features_never_reach_published_deltas():
    table = TableConfig(dim=8)
    cfg = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=table,
                        item_table=table, negatives=2, gate=False, clip_norm=1.0)
    events = topic_stream(120)
    poisoned = []
    for i, e in enumerate(events):  # micro-batches of 10: batches 2, 5 and 8 carry one fault each
        if i == 23:
            e = dict(e, user_features=[float("nan")] * FEATURES.user_width)
        elif i == 57:
            e = dict(e, item_features=[float("inf")] * FEATURES.item_width)
        elif i == 89:
            e = dict(e, item_features=[1e30] * FEATURES.item_width)
        poisoned.append(e)
    Collected.clear()
    with beam.Pipeline() as p:
        out = p | beam.Create([poisoned]) | UpdateShardModels(cfg, UpdateConfig(batch_size=10, flush_interval_s=None), shards=1)
        out[DELTAS] | "CollectDeltas" >> CollectTo("nan/deltas")
        out[REPORTS] | "CollectReports" >> CollectTo("nan/reports")
        out[SCORES] | "CollectScores" >> CollectTo("nan/scores")
    reports = Collected.get("nan/reports")
    assert sum(r["events"] for r in reports) == len(poisoned)  # every event accounted for
    assert sum(r["skipped_nonfinite"] for r in reports) >= 2
    # the events of a skipped step are applied (accounted for) but reported as not learned
    assert sum(r["not_learned"] for r in reports) == 10 * sum(1 for r in reports if r["skipped_nonfinite"] and not r["steps"])
    assert sum(r["not_learned"] for r in reports) >= 20
    assert sum(r["steps"] for r in reports) >= 9
    deltas = Collected.get("nan/deltas")
    assert deltas
    for d in deltas:
        for row in d["row_values"]:
            assert all(math.isfinite(v) for v in row), (d["table"], d["row_ids"])
    for s in Collected.get("nan/scores"):
        assert all(math.isfinite(i["score"]) for i in s["items"])
