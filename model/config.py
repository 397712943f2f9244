"""Configuration dataclasses for the learning core, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

MODES = ("online", "incremental")
OPTIMIZERS = ("adagrad", "ftrl", "sgd")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class TableConfig:
    """A collisionless embedding table (Monolith-style).

    admit_after: occurrences of an id (counted in a bounded count-min sketch) before it gets a row.
    ttl_ms: rows idle (in event time) longer than this are evicted and tombstoned; None keeps them.
    capacity: hard bound on rows; when full the least recently seen row is evicted.
    """

    dim: int = 16
    capacity: int = 200_000
    admit_after: int = 1
    ttl_ms: int | None = None
    init_std: float = 0.05
    sketch_width: int = 1 << 16
    sketch_depth: int = 2

    def __post_init__(self) -> None:
        _check(self.dim > 0, f"TableConfig.dim must be > 0, got {self.dim}")
        _check(self.capacity > 0, f"TableConfig.capacity must be > 0, got {self.capacity}")
        _check(self.admit_after >= 1, f"TableConfig.admit_after must be >= 1, got {self.admit_after}")
        _check(self.ttl_ms is None or self.ttl_ms > 0, f"TableConfig.ttl_ms must be > 0 or None, got {self.ttl_ms}")
        _check(self.init_std >= 0, "TableConfig.init_std must be >= 0")
        _check(self.sketch_width > 0 and self.sketch_depth > 0, "TableConfig sketch sizes must be > 0")


@dataclass(frozen=True)
class LearnerConfig:
    """How one shard learns.

    mode: 'online' = one optimizer step per event; 'incremental' = one step per micro-batch handed
    to ``learn`` (the caller decides its size: k events or a window). The periodic full retrain
    that both are compared against is a benchmark baseline (``bench/retrain.py``).
    accumulate_steps: micro-batches whose gradients are summed before one optimizer step.
    """

    mode: str = "incremental"
    optimizer: str = "adagrad"
    lr: float = 0.05
    dense_lr: float = 0.01
    ftrl_alpha: float = 0.05
    ftrl_beta: float = 1.0
    ftrl_l1: float = 0.0
    ftrl_l2: float = 0.0
    adagrad_init: float = 0.01
    accumulate_steps: int = 1
    clip_norm: float | None = 5.0
    negatives: int = 4
    rating_threshold: float = 4.0
    type_weights: dict[str, float] = field(
        default_factory=lambda: {"view": 1.0, "click": 1.0, "rating": 1.0, "purchase": 2.0}
    )
    user_features: int = 11
    item_features: int = 3
    history: int = 10
    dense_hidden: int = 8
    user_table: TableConfig = field(default_factory=TableConfig)
    item_table: TableConfig = field(default_factory=TableConfig)
    # stability
    gate: bool = True
    gate_window: int = 400
    gate_tolerance: float = 0.15
    l2_to_good: float = 0.0
    seed: int = 0
    device: str = "auto"
    cpu_threads: int | None = 1  # torch intra-op threads on CPU; small sparse steps run fastest on one

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"LearnerConfig.mode must be one of {MODES}, got {self.mode!r}")
        _check(self.optimizer in OPTIMIZERS, f"LearnerConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.lr > 0 and self.dense_lr > 0, "LearnerConfig learning rates must be > 0")
        _check(self.accumulate_steps >= 1, f"LearnerConfig.accumulate_steps must be >= 1, got {self.accumulate_steps}")
        _check(self.clip_norm is None or self.clip_norm > 0, "LearnerConfig.clip_norm must be > 0 or None")
        _check(self.negatives >= 0, "LearnerConfig.negatives must be >= 0")
        _check(self.user_features >= 0 and self.item_features >= 0, "feature widths must be >= 0")
        _check(self.history >= 0, "LearnerConfig.history must be >= 0")
        _check(self.dense_hidden > 0, "LearnerConfig.dense_hidden must be > 0")
        _check(self.user_table.dim == self.item_table.dim, "user and item tables must share dim")
        _check(self.gate_window > 0, "LearnerConfig.gate_window must be > 0")
        _check(self.gate_tolerance >= 0, "LearnerConfig.gate_tolerance must be >= 0")
        _check(self.l2_to_good >= 0, "LearnerConfig.l2_to_good must be >= 0")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"LearnerConfig.device must be auto, cpu or cuda[:N], got {self.device!r}")
        unknown = set(self.type_weights) - {"view", "click", "rating", "purchase"}
        _check(not unknown, f"LearnerConfig.type_weights has unknown event types {sorted(unknown)}")

    @property
    def dim(self) -> int:
        return self.user_table.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        _check(not unknown, f"LearnerConfig got unknown keys {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("user_table", "item_table"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = TableConfig(**kwargs[key])
        return cls(**kwargs)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when this worker has a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)
