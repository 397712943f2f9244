from __future__ import annotations

import pytest

from core.featurizers import HOUR_MS, FeatureConfig, ItemPopularity, UserFeaturizer

T0 = 1_700_000_000_000


def ev(t, etype="click", item="i", value=None):
    return {"event_time_ms": t, "event_type": etype, "item_id": item, "value": value}


def test_user_features_count_by_type_over_sliding_windows():
    cfg = FeatureConfig(windows_ms=(HOUR_MS, 24 * HOUR_MS), bucket_ms=60_000, history=3)
    f = UserFeaturizer(cfg)
    s = f.new_state()
    for i, (t, et) in enumerate([(0, "view"), (10, "click"), (20, "click"), (30, "purchase")]):
        f.learn_one(s, ev(T0 + t * 60_000, et, item=f"i{i}"))
    feats, history = f.transform_one(s, ev(T0 + 40 * 60_000))
    assert len(feats) == cfg.user_width
    import math
    hour = [round(math.expm1(x)) for x in feats[:4]]
    assert hour == [1, 2, 0, 1]  # view, click, rating, purchase within the last hour
    assert history == ["i1", "i2", "i3"]  # last N=3 items, oldest first
    # two hours later the 1 h window is empty but the 24 h window still counts them
    feats2, _ = f.transform_one(s, ev(T0 + 160 * 60_000))
    assert [round(math.expm1(x)) for x in feats2[:4]] == [0, 0, 0, 0]
    assert [round(math.expm1(x)) for x in feats2[4:8]] == [1, 2, 0, 1]


def test_recency_and_rating_features():
    f = UserFeaturizer(FeatureConfig())
    s = f.new_state()
    first, _ = f.transform_one(s, ev(T0))
    f.learn_one(s, ev(T0, "rating", value=5.0))
    soon, _ = f.transform_one(s, ev(T0 + 1000))
    later, _ = f.transform_one(s, ev(T0 + 10**7))
    assert soon[-2] < later[-2]
    assert soon[-1] == pytest.approx(1.0) and first[-1] == 0.0


def test_item_popularity_window_and_merge():
    cfg = FeatureConfig(windows_ms=(HOUR_MS,), bucket_ms=60_000)
    p = ItemPopularity(cfg)
    a, b = p.new_state(), p.new_state()
    for t in range(5):
        p.learn_one(a, ev(T0 + t * 60_000))
    for t in range(3):
        p.learn_one(b, ev(T0 + t * 60_000))
    merged = ItemPopularity.merge(a, b)
    import math
    assert round(math.expm1(p.transform_one(merged, ev(T0 + 10 * 60_000))[0])) == 8
    assert round(math.expm1(p.transform_one(merged, ev(T0 + 3 * HOUR_MS))[0])) == 0


def test_an_expired_state_reads_as_new_however_often_its_group_is_swept():
    """A TTL'd state is gone for the event that finds it idle too long, whether the group was swept after
    every event (the PyFlink job), once per micro-batch (the Beam steps) or never: the same features."""
    from core.keyed_state import GroupStates

    ttl = 10 * 60_000
    # users u0..u4 in one group, each back after a gap that is sometimes longer than the TTL
    events = [{**ev(T0 + 60_000 * m, item=f"i{m % 7}"), "user_id": f"u{m % 5}"}
              for m in [*range(0, 12), *range(30, 36), *range(37, 60, 3)]]

    def features(sweep_every: int | None) -> list[tuple[list[float], list[str]]]:
        f, group, out = UserFeaturizer(FeatureConfig()), GroupStates.new(), []
        for n, e in enumerate(events, 1):
            annotated = f.annotate(group, e, ttl)
            out.append((annotated["user_features"], annotated["history"]))
            if sweep_every and n % sweep_every == 0:
                GroupStates.sweep(group, ttl)
        return out

    never = features(None)
    assert features(1) == never and features(4) == never
    last: dict[str, int] = {}
    gaps = []
    for e in events:
        gaps.append(e["event_time_ms"] - last.get(e["user_id"], -10**15))
        last[e["user_id"]] = e["event_time_ms"]
    assert any(ttl <= g < 10**14 for g in gaps)  # some users come back after their state expired
    assert [history == [] for _, history in never] == [g >= ttl for g in gaps]


def test_user_state_merge_adds_counts():
    f = UserFeaturizer(FeatureConfig())
    a, b = f.new_state(), f.new_state()
    f.learn_one(a, ev(T0, item="x"))
    f.learn_one(b, ev(T0 + 5, item="y"))
    m = UserFeaturizer.merge(a, b)
    assert m["total"] == 2 and m["history"] == ["y"]


def test_feature_config_validation():
    with pytest.raises(ValueError):
        FeatureConfig(windows_ms=())
    with pytest.raises(ValueError):
        FeatureConfig(windows_ms=(1000,), bucket_ms=5000)


# --- running window totals ------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from core.featurizers import _Buckets  # noqa: E402
from schemas import EVENT_TYPES  # noqa: E402

steps = st.lists(st.tuples(st.integers(-3 * HOUR_MS, 30 * HOUR_MS), st.sampled_from(EVENT_TYPES)), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_running_window_totals_equal_a_full_recount(moves):
    """Features from the running sums (incl. out-of-order events and long gaps) equal a recount of every bucket."""
    cfg = FeatureConfig(windows_ms=(HOUR_MS, 24 * HOUR_MS), bucket_ms=5 * 60_000)
    users, items = UserFeaturizer(cfg), ItemPopularity(cfg)
    us, its = users.new_state(), items.new_state()
    t = T0
    for i, (dt, etype) in enumerate(moves):
        t = max(T0, t + dt)
        e = ev(t, etype, item=f"i{i % 7}", value=4.0 if etype == "rating" else None)
        recount_u = _Buckets.window_sums(us["buckets"], t, cfg.windows_ms, len(EVENT_TYPES))
        recount_i = _Buckets.window_sums(its["buckets"], t, cfg.windows_ms, 1)
        expected_u, expected_i = users._features(us, t, recount_u), ItemPopularity._features(its, t, recount_i)
        assert users.transform_one(us, e) == expected_u
        assert items.transform_one(its, e) == expected_i
        assert users.transform_learn(us, e) == expected_u
        assert items.transform_learn(its, e) == expected_i
    assert len(us["buckets"]) <= (24 * HOUR_MS + cfg.bucket_ms) // cfg.bucket_ms + 2  # pruned: bounded state
