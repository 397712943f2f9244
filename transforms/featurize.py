"""FeaturizeEvents: item popularity (keyed by item) then per-user windowed features (keyed by user).

The DoFns only move state in and out; the arithmetic is in ``transforms.featurizers``.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.coders.coders import FastPrimitivesCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from transforms.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer
from transforms.runtime import tune_state_cache_sizing


class AnnotateItemPopularity(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("item_state", FastPrimitivesCoder())
    EXPIRY = TimerSpec("item_expiry", TimeDomain.WATERMARK)

    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int):
        self.cfg, self.state_ttl_ms = cfg, state_ttl_ms

    def setup(self):
        tune_state_cache_sizing()
        self.featurizer = ItemPopularity(self.cfg)

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                state=beam.DoFn.StateParam(STATE), expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, event = element
        current = state.read() or self.featurizer.new_state()
        features = self.featurizer.transform_one(current, event)
        state.write(self.featurizer.learn_one(current, event))
        expiry.set(timestamp + self.state_ttl_ms / 1000.0)
        yield {**event, "item_features": features}

    @on_timer(EXPIRY)
    def expire(self, state=beam.DoFn.StateParam(STATE)):
        state.clear()


class AnnotateUserFeatures(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("user_state", FastPrimitivesCoder())
    EXPIRY = TimerSpec("user_expiry", TimeDomain.WATERMARK)

    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int):
        self.cfg, self.state_ttl_ms = cfg, state_ttl_ms

    def setup(self):
        tune_state_cache_sizing()
        self.featurizer = UserFeaturizer(self.cfg)

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                state=beam.DoFn.StateParam(STATE), expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, event = element
        current = state.read() or self.featurizer.new_state()
        features, history = self.featurizer.transform_one(current, event)
        state.write(self.featurizer.learn_one(current, event))
        expiry.set(timestamp + self.state_ttl_ms / 1000.0)
        yield {**event, "user_features": features, "history": history}

    @on_timer(EXPIRY)
    def expire(self, state=beam.DoFn.StateParam(STATE)):
        state.clear()


class FeaturizeEvents(beam.PTransform):
    def __init__(self, cfg: FeatureConfig, state_ttl_ms: int):
        super().__init__()
        self.cfg, self.state_ttl_ms = cfg, state_ttl_ms

    def expand(self, events):
        return (
            events
            | "KeyByItem" >> beam.Map(lambda e: (e["item_id"], e)).with_output_types(tuple[str, Any])
            | "AnnotateItemPopularity" >> beam.ParDo(AnnotateItemPopularity(self.cfg, self.state_ttl_ms))
            | "KeyByUser" >> beam.Map(lambda e: (e["user_id"], e)).with_output_types(tuple[str, Any])
            | "AnnotateUserFeatures" >> beam.ParDo(AnnotateUserFeatures(self.cfg, self.state_ttl_ms))
        )


def featurized_record(event: dict[str, Any]) -> dict[str, Any]:
    """The event with exactly the fields of ``schemas/featurized_event.avsc``."""
    keys = ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "value", "context",
            "user_features", "item_features", "history")
    return {k: event.get(k) for k in keys}
