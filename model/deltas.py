"""What a shard publishes and reports, as small dataclasses: the rows that changed (``ModelDelta``),
a rejected version (``RollbackRecord``), and what one ``learn`` call saw and did (``LearnResult``).

A delta carries whole rows, never gradients, so a consumer applies it by overwriting: applying the
same delta twice is harmless, and a consumer that saw every delta of a shard up to version ``v``
serves exactly that shard's published tables at ``v``.

>>> import torch
>>> delta = ModelDelta(shard=0, model_version=3, base_version=2, table=ITEM, row_ids=["i1"],
...                    row_values=torch.tensor([[0.5, -0.25]]), tombstones=["i9"])
>>> record = delta.to_record(sequence=7, emit_time_ms=0)
>>> record["row_values"], record["tombstones"]
([[0.5, -0.25]], ['i9'])
>>> ModelDelta.from_record(record).row_ids
['i1']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The published tables: user rows (private to the learner), item rows (e_i, b_i, item features),
# the folded user tower (q_u, c_u) and the dense item-side parameters.
USER, ITEM, QUERY, DENSE = "user", "item", "user_query", "dense"


@dataclass
class ModelDelta:
    """The rows of one table that changed between ``base_version`` and ``model_version``."""

    shard: int
    model_version: int
    base_version: int
    table: str
    row_ids: list[str]
    row_values: torch.Tensor  # (len(row_ids), width)
    tombstones: list[str]
    is_rollback: bool = False

    def to_record(self, sequence: int, emit_time_ms: int) -> dict[str, Any]:
        """A ``schemas/model_delta.avsc`` record, numbered ``sequence`` in its shard's delta stream."""
        return {
            "shard": self.shard, "model_version": self.model_version, "base_version": self.base_version,
            "sequence": sequence, "table": self.table, "row_ids": list(self.row_ids),
            "row_values": self.row_values.tolist(), "tombstones": list(self.tombstones),
            "is_rollback": self.is_rollback, "emit_time_ms": emit_time_ms,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ModelDelta:
        values = torch.tensor(rec["row_values"], dtype=torch.float32) if rec["row_values"] else torch.zeros(0, 0)
        return cls(rec["shard"], rec["model_version"], rec["base_version"], rec["table"], list(rec["row_ids"]),
                   values, list(rec["tombstones"]), bool(rec.get("is_rollback", False)))


@dataclass
class RollbackRecord:
    """A version the quality gate rejected (``schemas/rollback.avsc``)."""

    shard: int
    rejected_version: int
    restored_version: int
    new_version: int
    candidate_logloss: float
    good_logloss: float
    reason: str

    def to_record(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LearnResult:
    """What one ``learn`` call saw and did. labels/probs are prequential: scored before learning."""

    labels: list[float]
    probs: list[float]
    positive_index: list[int]  # index into labels/probs of each event's own (not internally sampled) example
    loss: float
    steps: int
    version: int
    skipped_nonfinite: int
    rollbacks: list[RollbackRecord]
