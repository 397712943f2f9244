"""The downstream consumer without Pub/Sub: in-order application, duplicates, out-of-order arrival,
and resync from a checkpoint when a delta is lost."""

from __future__ import annotations

from model.checkpoint import save_checkpoint
from model.config import LearnerConfig, TableConfig
from model.learner import IncrementalLearner
from pipelines.consumer import DeltaConsumer
from tests.helpers import FEATURES, topic_stream


def cfg() -> LearnerConfig:
    t = TableConfig(dim=8)
    return LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=t,
                         item_table=t, gate=False, negatives=2)


def produce(tmp_path=None, checkpoint_after=None):
    learner = IncrementalLearner(cfg(), shard=0)
    records, seq = [], 0
    events = topic_stream(600)
    for i in range(0, 600, 30):
        learner.learn(events[i : i + 30])
        for d in learner.take_deltas():
            seq += 1
            records.append(d.to_record(seq, 0))
        if checkpoint_after is not None and i // 30 == checkpoint_after:
            save_checkpoint(learner, tmp_path, {"delta_sequence": seq})
    return learner, records


def served(consumer, learner, users):
    return {u: consumer.scores(u, 5) for u in users} == {u: learner.topk([u], 5)[u] for u in users}


def test_in_order_duplicates_and_out_of_order_arrivals():
    learner, records = produce()
    consumer = DeltaConsumer(cfg(), shards=1)
    shuffled = records[1::2] + records[::2]  # every other one early: buffered until the gap closes
    results = [consumer.handle(r) for r in shuffled + records[:5]]
    assert results.count("duplicate") == 5 and "buffered" in results
    assert consumer.version(0) == learner.version
    assert consumer.replicas[0].model.published_snapshot() == learner.published_snapshot()
    assert served(consumer, learner, ["u1", "u7", "u33"])


def test_lost_delta_triggers_resync_from_checkpoint(tmp_path):
    learner, records = produce(tmp_path, checkpoint_after=12)
    lost = records[10]["sequence"]
    consumer = DeltaConsumer(cfg(), shards=1, checkpoint_dir=str(tmp_path))
    for r in records:
        if r["sequence"] != lost:
            consumer.handle(r)
    assert consumer.counters["resyncs"] == 1
    assert consumer.replicas[0].model.published_snapshot() == learner.published_snapshot()
    assert served(consumer, learner, ["u2", "u5"])


def test_lost_delta_without_checkpoint_stays_buffered():
    learner, records = produce()
    consumer = DeltaConsumer(cfg(), shards=1)
    for r in records[:3] + records[4:]:
        consumer.handle(r)
    assert consumer.replicas[0].applied_sequence == 3
    assert len(consumer.replicas[0].pending) == len(records) - 4
