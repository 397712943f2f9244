"""The learning core without any runner: tables, optimizers, modes, stability guard, checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bench.retrain import PeriodicRetrain, RetrainConfig
from model.config import LearnerConfig, TableConfig
from model.embedding import DynamicEmbeddingTable
from model.learner import IncrementalLearner
from model.metrics import BinaryStats, exact_auc
from model.optim import FTRL, Adagrad
from tests.helpers import FEATURES, cfg, featurized, replay, topic_stream


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


def test_periodic_retrain_baseline_rebuilds_from_its_replay_buffer_on_schedule():
    baseline = PeriodicRetrain(cfg(), RetrainConfig(every_ms=60_000, epochs=1, batch=50))
    events = topic_stream(300)  # 1 s apart: 300 s -> retrains at 60 s intervals
    first = baseline.learner
    replay(baseline, events, 10)
    assert baseline.retrains == 4 and baseline.learner is not first
    assert baseline.learner.frozen and first.version == 0  # frozen between retrains: no step of its own
    assert baseline.learner.counters["events"] == 240 + 60  # trained on the first 240 s, then scored the rest
    # the last retrain took one step per 50 events of the 240 s before it, from fresh tables
    assert baseline.learner.version == 240 // 50 + 1 and len(baseline.learner.items) > 0


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
