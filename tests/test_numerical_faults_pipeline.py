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


def test_a_shard_that_keeps_skipping_its_steps_raises_an_alert_and_the_summary_counts_it():
    import schemas
    from transforms.sinks import SummaryFn
    from transforms.update import ALERTS

    table = TableConfig(dim=8)
    cfg = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=table,
                        item_table=table, negatives=2, gate=False)
    events = topic_stream(150)
    poisoned = [dict(e, user_features=[float("nan")] * FEATURES.user_width) if 30 <= i < 100 and i % 10 == 3 else e
                for i, e in enumerate(events)]  # batches 3 to 9 (of 10 events) each carry a NaN: 7 skipped in a row
    Collected.clear()
    with beam.Pipeline() as p:
        out = p | beam.Create([poisoned]) | UpdateShardModels(
            cfg, UpdateConfig(batch_size=10, flush_interval_s=None, alert_skipped_flushes=3), shards=1)
        out[ALERTS] | "CollectAlerts" >> CollectTo("skip/alerts")
        out[REPORTS] | "CollectReports" >> CollectTo("skip/reports")
    alerts = Collected.get("skip/alerts")
    assert [a["value"] for a in alerts] == [3.0, 6.0]  # after 3 skipped flushes, again at 6; the 7th does not repeat it
    assert all(a["signal"] == "steps_skipped_nonfinite" and a["shard"] == 0 and a["severity"] == "critical" for a in alerts)
    assert alerts[0]["window_start_ms"] == events[30]["event_time_ms"]
    for a in alerts:
        schemas.encode(schemas.ALERT, a)
    reports = Collected.get("skip/reports")
    fn = SummaryFn()
    acc = fn.create_accumulator()
    for r in reports:
        acc = fn.add_input(acc, ("report", r))
    summary = fn.extract_output(acc)
    assert summary["alerts"] == 2 and summary["events_not_learned"] == 70
    assert summary["events_not_learned_by_shard"] == {"0": 70}


def test_the_skip_alarm_is_quiet_while_steps_are_learned():
    from monitoring.alerts import SkippedStepsAlarm

    alarm, meta = SkippedStepsAlarm(after=2), {}
    fired = [alarm.update(meta, 0, 10, 10 if n % 2 else 0, n, n) for n in range(40)]  # every other flush skipped
    assert not any(fired)
