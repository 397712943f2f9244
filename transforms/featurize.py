"""FeaturizeEvents: item popularity (keyed by item group) then per-user windowed features (keyed by user
group), each on micro-batches (see ``transforms.batching``).

The DoFns only move state in and out; the arithmetic is in ``transforms.featurizers``.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from transforms.batching import GroupStates, KeyGroupStep, batch_by, key_group
from transforms.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer


class AnnotateItemPopularity(KeyGroupStep):
    """Keyed by key group of the item id, on micro-batches: item popularity features before each event."""

    STEP = "AnnotateItemPopularity"

    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int):
        super().__init__(state_ttl_ms)
        self.featurizer = ItemPopularity(cfg)

    def handle_batch(self, group, events):
        featurizer = self.featurizer
        for event in events:
            state = GroupStates.state_for(group, event["item_id"], event["event_time_ms"], featurizer.new_state)
            yield {**event, "item_features": featurizer.transform_learn(state, event)}


class AnnotateUserFeatures(KeyGroupStep):
    """Keyed by key group of the user id, on micro-batches: windowed user features and history before each event."""

    STEP = "AnnotateUserFeatures"

    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int):
        super().__init__(state_ttl_ms)
        self.featurizer = UserFeaturizer(cfg)

    def handle_batch(self, group, events):
        featurizer = self.featurizer
        for event in events:
            state = GroupStates.state_for(group, event["user_id"], event["event_time_ms"], featurizer.new_state)
            features, history = featurizer.transform_learn(state, event)
            yield {**event, "user_features": features, "history": history}


class FeaturizeEvents(beam.PTransform):
    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int, key_groups: int = 1024):
        super().__init__()
        self.cfg, self.state_ttl_ms, self.key_groups = cfg, state_ttl_ms, key_groups

    def expand(self, events):
        groups = self.key_groups
        return (
            events
            | "BatchByItemGroup" >> batch_by(lambda e: key_group(e["item_id"], groups))
            | "AnnotateItemPopularity" >> beam.ParDo(AnnotateItemPopularity(self.cfg, self.state_ttl_ms))
            | "BatchByUserGroup" >> batch_by(lambda e: key_group(e["user_id"], groups))
            | "AnnotateUserFeatures" >> beam.ParDo(AnnotateUserFeatures(self.cfg, self.state_ttl_ms))
        )


FEATURIZED_FIELDS = ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "value", "context",
                     "user_features", "item_features", "history")
_FEATURIZED_SET = frozenset(FEATURIZED_FIELDS)


def featurized_record(event: dict[str, Any]) -> dict[str, Any]:
    """The event with exactly the fields of ``schemas/featurized_event.avsc`` (the event itself when it
    has exactly those; the featurizers' output does)."""
    if event.keys() == _FEATURIZED_SET:
        return event
    return {k: event.get(k) for k in FEATURIZED_FIELDS}
