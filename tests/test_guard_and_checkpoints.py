"""The stability guard (gate, rollback, regularisation towards the last good version), checkpoints and
deltas of the learning core, without any runner."""

from __future__ import annotations

import os

import pytest
import torch

from model.checkpoint import latest_checkpoint, load_checkpoint, replay_deltas, save_checkpoint
from model.config import TableConfig
from model.learner import IncrementalLearner
from tests.helpers import FEATURES, cfg, featurized, replay, topic_stream


# ------------------------------------------------------------------ stability guard
def test_harmful_update_is_rolled_back_to_last_good_version():
    c = cfg(gate=True, gate_window=100, gate_tolerance=0.15, negatives=2)
    learner = IncrementalLearner(c)
    stream = topic_stream(2000)
    replay(learner, stream[:1500], 20)
    good_version = learner.good_version
    assert good_version > 0 and learner.counters["rollbacks"] == 0
    learner.take_deltas()
    # a poisoned update: every user's rows and the item rows pushed far off
    with torch.no_grad():
        n = len(learner.items)
        learner.items.weights[:n] += torch.randn(n, learner.items.width) * 3
        rows = learner.items.active_rows()
        learner.items.write_rows(rows, learner.items.weights[rows], {k: v[rows] for k, v in learner.items.state.items()})
    learner.version += 1  # the poisoned state is a new candidate version
    poisoned = learner.version
    results = [learner.learn(stream[i : i + 20]) for i in range(1500, 1700, 20)]
    records = [rb for r in results for rb in r.rollbacks]
    assert len(records) >= 1
    rb = records[0]
    assert rb.rejected_version >= poisoned and rb.candidate_logloss > rb.good_logloss
    deltas = learner.take_deltas()
    assert any(d.is_rollback for d in deltas)


def test_gate_scores_the_last_good_version_exactly():
    """The gate's "good" predictions (undo log + saved dense tower) equal those of a copy of the learner
    taken when that version was promoted, including ids admitted or evicted since."""
    c = cfg(gate=True, gate_window=10**9, table=TableConfig(dim=8, ttl_ms=400))
    learner = IncrementalLearner(c)
    stream = topic_stream(900)
    replay(learner, stream[:300], 30)
    learner.promote()
    good_copy = IncrementalLearner.from_bytes(learner.to_bytes())
    replay(learner, stream[300:600], 30)  # new rows, changed rows and TTL evictions since the good version
    assert learner.users.evictions + learner.items.evictions > 0
    batch = learner.batches.build(stream[600:700], negatives=False)
    expected = good_copy.score_batch(good_copy.batches.build(stream[600:700], negatives=False))
    assert torch.allclose(learner.score_batch(batch, good=True), expected, atol=1e-6)
    assert not torch.allclose(learner.score_batch(batch), expected, atol=1e-3)


def test_sampled_negatives_score_as_one_example_events_of_their_user():
    """The user side (user row, history, user features) is computed once per event and shared by the
    event's sampled negatives: every example scores as an event of its own with that user and its item,
    for the live version and for the last good one."""
    learner = IncrementalLearner(cfg(gate=True, gate_window=10**9, negatives=3))
    stream = topic_stream(700)
    for i, ev in enumerate(stream):  # distinct user features, so that the dense user term matters too
        ev["user_features"] = [((i * 7 + j) % 11) / 11.0 for j in range(FEATURES.user_width)]
    replay(learner, stream[:300], 30)
    learner.promote()
    replay(learner, stream[300:600], 30)
    events = stream[600:660]
    batch = learner.batches.build(events)
    assert batch.owner is not None and len(batch.items) > len(events)
    owner = batch.owner.tolist()
    singles = [{**events[o], "item_id": batch.items[x], "item_features": batch.item_feats[x].tolist()}
               for x, o in enumerate(owner)]
    single = learner.batches.build(singles, negatives=False)
    assert single.owner is None
    for good in (False, True):
        assert torch.allclose(learner.score_batch(batch, good=good), learner.score_batch(single, good=good),
                              atol=1e-6)


def test_internal_negatives_come_after_the_events_and_never_repeat_their_own_item():
    learner = IncrementalLearner(cfg(negatives=3))
    stream = topic_stream(400)
    replay(learner, stream[:300], 50)
    events = stream[300:340]
    batch = learner.batches.build(events)
    n = len(events)
    assert batch.positive_index == list(range(n)) and batch.items[:n] == [e["item_id"] for e in events]
    owner = batch.owner.tolist()
    assert owner[:n] == list(range(n)) and owner[n:] == sorted(owner[n:])
    positives = [k for k, e in enumerate(events) if learner.label_of(e) > 0.5]
    assert sorted(set(owner[n:])) == positives and len(owner) == n + 3 * len(positives)
    assert batch.labels[n:].eq(0).all() and all(batch.items[x] != events[owner[x]]["item_id"] for x in range(n, len(owner)))
    assert all(x in learner.items for x in batch.items[n:])
    # a table of one live item has nothing else to draw: no negatives
    lone = IncrementalLearner(cfg(negatives=3))
    lone.learn([stream[0]])
    assert lone.batches.build([stream[0]]).owner is None


def test_rollback_restores_exact_last_good_rows():
    learner = IncrementalLearner(cfg(gate=True))
    stream = topic_stream(200)
    learner.learn(stream[:50])
    learner.promote()
    good = learner.parameters_snapshot()
    learner.learn(stream[50:100])
    learner.learn(stream[100:150])
    assert learner.parameters_snapshot() != good
    rec = learner.rollback(reason="test")
    restored = learner.parameters_snapshot()
    for name in ("user", "item", "dense"):
        assert restored[name] == good[name], name
    assert rec.new_version == learner.version and rec.restored_version < rec.new_version


def test_l2_towards_last_good_parameters_limits_drift():
    stream = topic_stream(400)
    def drift(l2):
        learner = IncrementalLearner(cfg(gate=False, l2_to_good=l2, lr=0.3))
        learner.learn(stream[:100]); learner.promote()
        start = learner.users.weights.clone()
        replay(learner, stream[100:], 20)
        n = start.shape[0]
        return float((learner.users.weights[:n] - start).norm())
    assert drift(5.0) < drift(0.0)


# ------------------------------------------------------------------ checkpoints and deltas
def test_checkpoint_is_atomic_versioned_and_loads_weights_only(tmp_path):
    learner = IncrementalLearner(cfg())
    replay(learner, topic_stream(300), 25)
    path = save_checkpoint(learner, tmp_path)
    assert path.name == f"shard-0000-v{learner.version:012d}.pt"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    sd = torch.load(path, weights_only=True)  # raises if anything needs unpickling of code
    assert sd["version"] == learner.version
    loaded = load_checkpoint(path)
    assert loaded.parameters_snapshot() == learner.parameters_snapshot()
    assert latest_checkpoint(tmp_path, 0) == path
    # the restored learner continues exactly like the original
    more = topic_stream(100, seed=5, start_ms=2_000_000_000_000)
    a, b = learner.learn(more), loaded.learn(more)
    assert a.probs == b.probs and learner.parameters_snapshot() == loaded.parameters_snapshot()


def test_snapshot_plus_delta_replay_gives_the_same_parameters(tmp_path):
    c = cfg(table=TableConfig(dim=8, ttl_ms=120_000))
    learner = IncrementalLearner(c)
    stream = topic_stream(1200)
    replay(learner, stream[:400], 20)
    learner.take_deltas()
    snap = save_checkpoint(learner, tmp_path)
    deltas = []
    for i in range(400, 1200, 20):
        learner.learn(stream[i : i + 20])
        deltas.extend(learner.take_deltas())
    assert any(d.tombstones for d in deltas), "TTL evictions must appear as tombstones"
    restored = replay_deltas(load_checkpoint(snap), deltas)
    got, want = restored.published_snapshot(), learner.published_snapshot()
    got["user"], want["user"] = restored.parameters_snapshot()["user"], learner.parameters_snapshot()["user"]
    for name in ("user", "item", "user_query", "dense"):
        assert set(got[name]) == set(want[name]), name
        for key in want[name]:
            assert got[name][key] == pytest.approx(want[name][key], abs=1e-6)


def test_delta_contains_exactly_the_rows_that_changed():
    learner = IncrementalLearner(cfg(negatives=0, history=0))
    learner.learn([featurized(1, "u1", "a", 1_700_000_000_000), featurized(2, "u2", "b", 1_700_000_001_000)])
    learner.take_deltas()
    learner.learn([featurized(3, "u1", "a", 1_700_000_002_000)])
    by_table = {d.table: d for d in learner.take_deltas()}
    assert by_table["user"].row_ids == ["u1"]
    assert by_table["item"].row_ids == ["a"]
    assert by_table["user_query"].row_ids == ["u1"]
    assert by_table["user"].base_version == 1 and by_table["user"].model_version == 2


def test_checkpoints_are_pruned_to_the_newest_few_with_their_checksums(tmp_path):
    from model.checkpoint import checkpoints, prune_checkpoints

    learner = IncrementalLearner(cfg())
    stream = topic_stream(400)
    for i in range(0, 400, 50):
        learner.learn(stream[i : i + 50])
        save_checkpoint(learner, tmp_path)
    assert len(checkpoints(tmp_path, 0)) == 8
    removed = prune_checkpoints(tmp_path, 0, keep=5)
    kept = checkpoints(tmp_path, 0)
    assert len(removed) == 3 and len(kept) == 5 and kept[0] == latest_checkpoint(tmp_path, 0)
    assert all(int(p.name[12:24]) < int(k.name[12:24]) for p in removed for k in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([k.name for k in kept] + [k.name + ".sha256" for k in kept])
    assert load_checkpoint(kept[0]).version == learner.version


def test_a_checkpoint_lists_the_unacknowledged_ids_and_a_resumed_run_carries_them_for_the_dedupe_ttl(tmp_path):
    """``remember_unacked``: the ids applied since the read last acknowledged (a new ack epoch forgets the
    earlier ones); a resumed shard carries its checkpoint's list over until those events are ``ttl_ms`` of
    event time older than the newest it applied, and ``unacked_event_ids`` reads the list back."""
    from model.checkpoint import remember_unacked, resume_shard, unacked_event_ids, unacked_in

    ev = lambda i, t: {"event_id": f"e{i}", "event_time_ms": t}  # noqa: E731
    meta: dict = {}
    remember_unacked(meta, [ev(1, 1_000), ev(2, 2_000)], ack_epoch=0, ttl_ms=10_000)
    assert unacked_in(meta) == {"e1": 1_000, "e2": 2_000}
    remember_unacked(meta, [ev(3, 3_000)], ack_epoch=1, ttl_ms=10_000)  # e1, e2 were acknowledged
    assert unacked_in(meta) == {"e3": 3_000}

    learner = IncrementalLearner(cfg(), shard=0)
    save_checkpoint(learner, tmp_path, {"delta_sequence": 4, "score_sequence": 9, "events_applied": 3,
                                        "unacked_event_ids": unacked_in(meta)}, run_id="r1")
    assert unacked_event_ids(tmp_path, "r1", shards=2, cfg=cfg()) == {"e3"}
    resumed: dict = {}
    assert resume_shard(tmp_path, 0, "r1", cfg(), resumed) is not None
    assert (resumed["delta_seq"], resumed["score_seq"], resumed["applied"]) == (4, 9, 3)
    remember_unacked(resumed, [ev(4, 12_000)], ack_epoch=0, ttl_ms=10_000)
    assert unacked_in(resumed) == {"e3": 3_000, "e4": 12_000}  # carried over, whatever the new epoch
    remember_unacked(resumed, [ev(5, 13_001)], ack_epoch=0, ttl_ms=10_000)
    assert unacked_in(resumed) == {"e4": 12_000, "e5": 13_001}  # e3 is over the TTL behind


def test_a_shard_the_resumed_run_left_no_checkpoint_of_resumes_from_the_run_before(tmp_path):
    """A resumed run that got none of a shard's events writes no checkpoint of it: resuming from that run
    starts the shard from the newest earlier run's checkpoint, not afresh."""
    from model.checkpoint import resume_state

    learner = IncrementalLearner(cfg(), shard=1)
    learner.learn(topic_stream(16, seed=1))
    save_checkpoint(learner, tmp_path, {"events_applied": 16}, run_id="20261206T000000-aaaa")
    save_checkpoint(IncrementalLearner(cfg(), shard=0), tmp_path, {}, run_id="20261206T010000-bbbb")
    found = resume_state(tmp_path, 1, "20261206T010000-bbbb")
    assert found is not None and found[0].version == learner.version and found[1]["events_applied"] == 16
    assert resume_state(tmp_path, 1, "20261205T000000-cccc") is None  # a later run's is never an earlier one's
