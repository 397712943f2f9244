from __future__ import annotations

import pytest

from transforms.featurizers import HOUR_MS, FeatureConfig, ItemPopularity, UserFeaturizer

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
