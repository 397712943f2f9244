"""The learning core without any runner: tables, optimizers, modes, stability guard, checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from model.checkpoint import latest_checkpoint, load_checkpoint, replay_deltas, save_checkpoint
from model.config import LearnerConfig, TableConfig
from model.embedding import DynamicEmbeddingTable
from model.learner import IncrementalLearner
from model.metrics import BinaryStats, exact_auc
from model.optim import FTRL, Adagrad
from tests.helpers import FEATURES, featurized, topic_stream


def cfg(**kw) -> LearnerConfig:
    table = kw.pop("table", TableConfig(dim=8))
    base = dict(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=table,
                item_table=table, gate=False, lr=0.1, negatives=3)
    base.update(kw)
    return LearnerConfig(**base)


def replay(learner: IncrementalLearner, events, batch: int):
    labels, probs = [], []
    for i in range(0, len(events), batch):
        r = learner.learn(events[i : i + batch])
        labels += r.labels
        probs += r.probs
    return labels, probs


# ------------------------------------------------------------------ config
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mode"):
        LearnerConfig(mode="sometimes")
    with pytest.raises(ValueError, match="accumulate_steps"):
        LearnerConfig(accumulate_steps=0)
    with pytest.raises(ValueError, match="admit_after"):
        TableConfig(admit_after=0)
    assert LearnerConfig.from_dict(LearnerConfig().to_dict()) == LearnerConfig()


# ------------------------------------------------------------------ dynamic table
def table(**kw) -> DynamicEmbeddingTable:
    return DynamicEmbeddingTable("t", TableConfig(dim=4, **kw), Adagrad(lr=0.1), extra=0, initial_rows=2)


def test_table_is_collisionless_and_grows():
    t = table()
    keys = [f"id{i}" for i in range(100)]
    t.observe(keys, now_ms=1)
    rows = t.rows(keys).tolist()
    assert len(set(rows)) == 100 and min(rows) >= 0
    assert len(t) == 100


def test_admission_after_n_occurrences():
    t = table(admit_after=3)
    t.observe(["a"], 1); t.observe(["a"], 2)
    assert "a" not in t and t.row_of("a") == -1
    t.observe(["a"], 3)
    assert "a" in t


def test_ttl_eviction_tombstones_and_capacity_bound():
    t = table(ttl_ms=100, capacity=8)
    t.observe(["old"], now_ms=0)
    t.observe(["new"], now_ms=150)
    assert t.evict_expired(now_ms=150) == ["old"]
    ids, _, tombs = t.take_changes()
    assert tombs == ["old"] and ids == ["new"]
    for i in range(50):  # far more ids than capacity: least recently seen rows make room
        t.observe([f"k{i}"], now_ms=200 + i)
    assert len(t) == 8 and t.weights.shape[0] <= 8
    assert "k49" in t and "k0" not in t


def test_memory_stays_bounded_as_id_space_grows():
    t = table(ttl_ms=1_000, capacity=10_000)
    for step in range(20):
        t.observe([f"s{step}-{i}" for i in range(500)], now_ms=step * 2_000)
        t.evict_expired(step * 2_000)
    assert len(t) == 500  # only the ids of the last TTL survive
    assert t.weights.shape[0] <= 1024


def test_batched_admission_gives_each_id_the_same_initial_row_in_any_batch():
    a, b = table(), table()
    a.observe(["x", "y", "z"], now_ms=1)
    for key in ["z", "y", "x", "x"]:
        b.observe([key], now_ms=1)
    for key in "xyz":
        assert torch.equal(a.weights[a.row_of(key)], b.weights[b.row_of(key)])
        assert a.weights[a.row_of(key)][-1] == 0.0  # bias starts at zero
    assert not torch.equal(a.weights[a.row_of("x")], a.weights[a.row_of("y")])
    init = torch.cat([a.weights[a.row_of(k)][:-1] for k in "xyz"])
    assert 0.0 < float(init.std()) < 1.0 and bool(torch.isfinite(init).all())


def test_many_new_ids_in_one_step_evict_the_least_recently_seen():
    t = table(capacity=8)
    t.observe([f"old{i}" for i in range(6)], now_ms=10)
    t.observe(["old0", "old1"], now_ms=20)  # refreshed: they must survive
    t.observe([f"new{i}" for i in range(4)], now_ms=30)
    assert len(t) == 8 and {"old0", "old1"} <= set(t.index)
    assert sum(k.startswith("old") for k in t.index) == 4
    t.observe([f"burst{i}" for i in range(20)], now_ms=40)  # more new ids than rows in one step
    assert sorted(t.index) == sorted(f"burst{i}" for i in range(12, 20))
    assert t.weights.shape[0] <= 8


def test_write_extra_keeps_the_last_finite_value_per_id():
    t = DynamicEmbeddingTable("t", TableConfig(dim=2), Adagrad(lr=0.1), extra=1)
    t.observe(["a", "b"], now_ms=1)
    t.write_extra(["a", "a", "b", "b", "unknown"], torch.tensor([[1.0], [2.0], [3.0], [float("nan")], [9.0]]))
    assert t.extra[t.row_of("a")].item() == 2.0 and t.extra[t.row_of("b")].item() == 3.0
    assert "unknown" not in t


def test_sampling_bias_correction_lets_serving_scores_rank_by_popularity():
    """Negatives drawn in proportion to popularity teach an uncorrected model p(i|u)/q(i), which is flat
    across items; with sample_log_q = log(k q(i)) the serving score learns p(i|u), so the item users click
    most ranks first (the Globo Recall@K failure before the correction)."""
    import random
    from collections import deque

    def run(correct: bool) -> list[float]:
        learner = IncrementalLearner(cfg(negatives=0, lr=0.05, history=0, user_features=0, item_features=0))
        rng = random.Random(0)
        items = ["hot"] * 12 + [f"rare{j}" for j in range(8)]  # hot: 60% of clicks
        ring: deque[str] = deque(maxlen=500)
        for step in range(150):
            batch = []
            for n in range(32):
                t = step * 100 + n
                item = rng.choice(items)
                ev = {**featurized(t, f"u{rng.randrange(300)}", item, t), "user_features": [], "item_features": [],
                      "history": []}
                k = 4
                def log_q(i: str) -> float:
                    return math.log(k * (ring.count(i) + 0.5) / (len(ring) + 0.5))
                if correct:
                    ev["sample_log_q"] = log_q(item)
                batch.append(ev)
                for _ in range(k if ring else 0):
                    neg = ring[rng.randrange(len(ring))]
                    batch.append({**ev, "event_id": f"{t}-n", "item_id": neg, "label": 0.0, "sampled": True,
                                  **({"sample_log_q": log_q(neg)} if correct else {})})
                ring.append(item)
            learner.learn(batch)
        return learner.score_candidates("a-new-user", ["hot"] + [f"rare{j}" for j in range(8)])

    def margin(scores: list[float]) -> float:  # the hot item's lead over the best rare item
        return scores[0] - max(scores[1:])

    assert margin(run(True)) > 0.3
    assert margin(run(False)) < 0.1  # without it, popularity is not what the serving score learns


def test_wrong_feature_shapes_name_the_event_and_the_expected_width():
    learner = IncrementalLearner(cfg())
    good = featurized(0, "u", "i", 0)
    with pytest.raises(ValueError, match=rf"event 'bad'\) user_features: expected {FEATURES.user_width} feature values, got 2"):
        learner.learn([good, {**featurized(1, "u", "i", 1), "event_id": "bad", "user_features": [0.0, 1.0]}])
    with pytest.raises(ValueError, match=rf"event 'txt'\) item_features: expected {FEATURES.item_width} numbers"):
        learner.learn([{**good, "event_id": "txt", "item_features": ["x"] * FEATURES.item_width}])
    assert learner.counters["events"] == 0  # nothing was learned from a rejected batch


def test_sample_log_q_must_be_finite():
    learner = IncrementalLearner(cfg())
    ev = {**featurized(0, "u", "i", 0), "sample_log_q": float("nan")}
    with pytest.raises(ValueError, match=r"event .*sample_log_q must be finite"):
        learner.learn([ev])


# ------------------------------------------------------------------ optimizers
def test_ftrl_starts_at_initial_weights_and_descends():
    opt = FTRL(alpha=0.1, beta=1.0)
    w0 = torch.tensor([[0.5, -0.2]])
    state = opt.init_state(w0)
    w1, state = opt.step(w0, torch.zeros_like(w0), state)
    assert torch.allclose(w1, w0, atol=1e-6)
    w2, _ = opt.step(w0, torch.tensor([[1.0, -1.0]]), state)
    assert w2[0, 0] < w0[0, 0] and w2[0, 1] > w0[0, 1]


@pytest.mark.parametrize("optimizer", ["adagrad", "ftrl", "sgd"])
def test_each_optimizer_learns_the_topic_stream(optimizer):
    events = topic_stream(3000)
    learner = IncrementalLearner(cfg(optimizer=optimizer, lr=0.1 if optimizer != "sgd" else 0.5, ftrl_alpha=0.1))
    labels, probs = replay(learner, events, 32)
    n = len(labels) // 4
    early, late = exact_auc(labels[: n // 2], probs[: n // 2]), exact_auc(labels[-n:], probs[-n:])
    assert late > 0.75 and late > early + 0.1, (optimizer, early, late)


# ------------------------------------------------------------------ modes and accumulation
def test_online_mode_steps_once_per_event_and_incremental_once_per_batch():
    events = topic_stream(64)
    online = IncrementalLearner(cfg(mode="online"))
    r = online.learn(events[:16])
    assert r.steps == 16 and online.version == 16
    inc = IncrementalLearner(cfg(mode="incremental"))
    r = inc.learn(events[:16])
    assert r.steps == 1 and inc.version == 1


def test_gradient_accumulation_steps_every_k_micro_batches():
    learner = IncrementalLearner(cfg(accumulate_steps=3))
    events = topic_stream(40)
    steps = [learner.learn(events[i : i + 4]).steps for i in range(0, 24, 4)]
    assert steps == [0, 0, 1, 0, 0, 1]
    assert learner.version == 2
    deltas = learner.take_deltas()
    assert deltas and all(d.model_version == 2 for d in deltas)


def test_prequential_scores_come_before_learning():
    learner = IncrementalLearner(cfg(negatives=0))
    ev = topic_stream(1)
    first = learner.learn(ev)
    assert first.probs == [pytest.approx(0.5)]  # unseen ids, untrained dense part: prior 0.5
    again = learner.predict(ev)
    assert again[0] > 0.5  # learning happened after scoring


def test_ratings_map_to_labels_by_threshold():
    learner = IncrementalLearner(cfg(rating_threshold=4.0))
    assert learner.label_of({"event_type": "rating", "value": 4.0}) == 1.0
    assert learner.label_of({"event_type": "rating", "value": 3.0}) == 0.0
    assert learner.label_of({"event_type": "view", "value": None}) == 1.0


def test_retrain_mode_rebuilds_from_its_replay_buffer_on_schedule():
    learner = IncrementalLearner(cfg(mode="retrain", retrain_every_ms=60_000, retrain_epochs=1))
    events = topic_stream(300)  # 1 s apart: 300 s -> retrains at 60 s intervals
    replay(learner, events, 10)
    assert learner.counters["retrains"] == 4
    assert learner.version == 4
    assert {d.table for d in learner.take_deltas()} >= {"user", "item", "dense"}


# ------------------------------------------------------------------ numerical faults
def test_non_finite_gradients_skip_the_step_and_never_reach_a_delta():
    learner = IncrementalLearner(cfg())
    good = topic_stream(20)
    learner.learn(good)
    learner.take_deltas()
    before = learner.parameters_snapshot()
    bad = [dict(e, user_features=[float("nan")] * FEATURES.user_width) for e in topic_stream(8, seed=3)]
    r = learner.learn(bad)
    assert r.skipped_nonfinite == 1 and r.steps == 0
    for d in learner.take_deltas():
        assert torch.isfinite(d.row_values).all()
    after = learner.parameters_snapshot()
    for name in ("user", "item", "dense"):
        for key, vals in after[name].items():
            assert all(math.isfinite(v) for v in vals)
            if key in before[name] and name != "item":
                assert vals == before[name][key]


def test_exploding_gradients_are_clipped():
    learner = IncrementalLearner(cfg(clip_norm=0.01, optimizer="sgd", lr=1.0))
    events = topic_stream(10)
    huge = [dict(e, item_features=[1e6] * FEATURES.item_width) for e in events]
    learner.learn(huge)
    for d in learner.take_deltas():
        assert torch.isfinite(d.row_values).all()
    u = learner.users.weights[: len(learner.users)]
    assert float(u.abs().max()) < 1.0


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
    batch = learner._build(stream[600:700], negatives=False)
    expected = good_copy._predict_batch(good_copy._build(stream[600:700], negatives=False))
    assert torch.allclose(learner._predict_batch(batch, good=True), expected, atol=1e-6)
    assert not torch.allclose(learner._predict_batch(batch), expected, atol=1e-3)


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
    batch = learner._build(events)
    assert batch.owner is not None and len(batch.items) > len(events)
    owner = batch.owner.tolist()
    singles = [{**events[o], "item_id": batch.items[x], "item_features": batch.item_feats[x].tolist()}
               for x, o in enumerate(owner)]
    single = learner._build(singles, negatives=False)
    assert single.owner is None
    for good in (False, True):
        assert torch.allclose(learner._predict_batch(batch, good=good), learner._predict_batch(single, good=good),
                              atol=1e-6)


def test_internal_negatives_come_after_the_events_and_never_repeat_their_own_item():
    learner = IncrementalLearner(cfg(negatives=3))
    stream = topic_stream(400)
    replay(learner, stream[:300], 50)
    events = stream[300:340]
    batch = learner._build(events)
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
    assert lone._build([stream[0]]).owner is None


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


# ------------------------------------------------------------------ metrics
def test_histogram_auc_matches_exact_auc_and_merges():
    import random
    rng = random.Random(0)
    y = [float(rng.random() < 0.3) for _ in range(5000)]
    p = [min(0.999, max(0.001, 0.3 * yi + rng.random() * 0.7)) for yi in y]
    a, b = BinaryStats(), BinaryStats()
    a.update(y[:2500], p[:2500]); b.update(y[2500:], p[2500:])
    merged = a.merge(b)
    assert merged.count == 5000
    assert merged.auc() == pytest.approx(exact_auc(y, p), abs=2e-3)
    assert exact_auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert math.isnan(exact_auc([1, 1], [0.2, 0.3]))


def test_device_auto_falls_back_to_cpu():
    learner = IncrementalLearner(cfg(device="auto"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert learner.device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            IncrementalLearner(replace(cfg(), device="cuda"))
