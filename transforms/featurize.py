"""FeaturizeEvents: item popularity (keyed by item group) then per-user windowed features (keyed by user
group), each on micro-batches (see ``transforms.batching``): micro-batches in, micro-batches out.

The DoFns only move state in and out; the arithmetic is in ``core.featurizers``.
"""

from __future__ import annotations

import apache_beam as beam

from core.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer
from core.keyed_state import key_group
from transforms.batching import KeyGroupStep, rebatch_by


class AnnotateFeatures(KeyGroupStep):
    """Keyed by key group of the id a featurizer keeps state for (the item for ``ItemPopularity``, the user
    for ``UserFeaturizer``), on micro-batches: each event with its features before it."""

    STEP = "AnnotateFeatures"

    def __init__(self, featurizer: ItemPopularity | UserFeaturizer, state_ttl_ms: int):
        super().__init__(state_ttl_ms)
        self.featurizer = featurizer

    def handle_batch(self, group, events, dead):
        annotate, ttl_ms = self.featurizer.annotate, self.ttl_ms
        return [annotate(group, event, ttl_ms) for event in events]


class FeaturizeEvents(beam.PTransform):
    """Micro-batches of clean events (lists, as ``CleanEvents`` emits them) -> micro-batches of featurized events."""

    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int, key_groups: int = 1024):
        super().__init__()
        self.cfg, self.state_ttl_ms, self.key_groups = cfg, state_ttl_ms, key_groups

    def expand(self, events):
        groups = self.key_groups
        return (
            events
            | "BatchByItemGroup" >> rebatch_by(lambda e: key_group(e["item_id"], groups), "BatchByItemGroup")
            | "AnnotateItemPopularity" >> beam.ParDo(AnnotateFeatures(ItemPopularity(self.cfg), self.state_ttl_ms))
            | "BatchByUserGroup" >> rebatch_by(lambda e: key_group(e["user_id"], groups), "BatchByUserGroup")
            | "AnnotateUserFeatures" >> beam.ParDo(AnnotateFeatures(UserFeaturizer(self.cfg), self.state_ttl_ms))
        )

