"""Model configuration of the PyFlink job, importable without PyFlink (tests rebuild parameters with it)."""

from __future__ import annotations

from model.config import LearnerConfig, TableConfig
from transforms.featurizers import FeatureConfig


def learner_config(features: FeatureConfig, dim: int) -> LearnerConfig:
    table = TableConfig(dim=dim)
    return LearnerConfig(user_features=features.user_width, item_features=features.item_width, history=features.history,
                         user_table=table, item_table=table, negatives=2, gate=False, device="cpu")
