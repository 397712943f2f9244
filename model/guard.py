"""The stability guard of a shard: an undo log back to the last good version, a quality gate that
compares the live version against it, and promote / rollback (Ekko-style rollback of harmful updates).

Before a row first changes after the last good version, the tables call ``record`` (their
``on_change`` hook) and the row's old values, side features and optimizer state go into the undo
log; the dense tower's good parameters and optimizer state are kept whole. So the last good version
can score a batch (``good_values``) without a second model, and a rollback restores exactly the rows
that changed. The gate sums both versions' logloss over ``gate_window`` prequential examples and
rejects the live version if its loss exceeds the good one's by more than ``gate_tolerance``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.config import LearnerConfig
from model.embedding import DynamicEmbeddingTable, RowSnapshot

Undo = dict[str, Mapping[str, torch.Tensor] | None]  # id -> row as it was (None: it had no row)


def copy_dense(dense: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copies of a module's parameters and its optimizer's state (tensors cloned, the rest deep-copied)."""
    params = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    sd = opt.state_dict()
    state = {k: {n: (t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t)) for n, t in v.items()}
             for k, v in sd["state"].items()}
    return params, {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}


def _logloss(y: torch.Tensor, p: torch.Tensor) -> float:
    p = p.clamp(1e-7, 1 - 1e-7)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())


class StabilityGuard:
    """Undo log, gate sums and the last good dense state of one learner's tables."""

    def __init__(self, cfg: LearnerConfig, tables: dict[str, DynamicEmbeddingTable], dense: nn.Module,
                 dense_opt: torch.optim.Optimizer):
        self.cfg, self.tables, self.dense, self.dense_opt = cfg, tables, dense, dense_opt
        self.good_version = 0
        self.undo: dict[str, Undo] = {name: {} for name in tables}
        self.good_dense, self.good_dense_opt = copy_dense(dense, dense_opt)
        self.gate_sums = [0.0, 0.0, 0]  # candidate loss, good loss, examples
        self.attach()

    @property
    def tracking(self) -> bool:
        return self.cfg.gate or self.cfg.l2_to_good > 0

    def attach(self) -> None:
        for table in self.tables.values():
            table.on_change = self.record if self.tracking else None

    def record(self, table: DynamicEmbeddingTable, keys: list[str]) -> None:
        """``on_change`` hook: snapshot the rows of ``keys`` not yet in the undo log."""
        undo = self.undo[table.name]
        new = list(dict.fromkeys(k for k in keys if k not in undo))
        if new:
            undo.update(zip(new, table.snapshot_rows(new), strict=True))

    # ------------------------------------------------------------------ the last good version's values
    def good_values(self, table: DynamicEmbeddingTable, rows: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None, key_at: Any,
                    real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``values`` (table rows gathered at ``rows``; -1 = unknown id, zeros) as they were in the last good
        version, with ``mask`` (1 = the row existed) updated alike. The undo log is consulted once per distinct
        row, and per position only where the id has no row now (``key_at(position)`` gives its id; ``real``
        marks the positions that hold an id at all, the others being padding)."""
        undo = self.undo[table.name]
        if not undo:
            return values, mask
        uniq, inverse = torch.unique(rows, return_inverse=True)
        ids = table.ids
        sel: list[int] = []
        snaps: list[Mapping[str, torch.Tensor] | None] = []
        for j, r in enumerate(uniq.tolist()):
            if r >= 0 and (k := ids[r]) in undo:
                sel.append(j)
                snaps.append(undo[k])
        values = values.clone()
        mask = mask.clone() if mask is not None else None
        if sel:
            good = values.new_zeros(len(uniq), values.shape[-1])
            exists = values.new_ones(len(uniq))
            changed = torch.zeros(len(uniq), dtype=torch.bool, device=values.device)
            sel_t = torch.tensor(sel, dtype=torch.long, device=values.device)
            changed[sel_t] = True
            good[sel_t] = torch.stack([snap["weights"] if snap is not None else torch.zeros_like(values[0]) for snap in snaps])
            exists[sel_t] = torch.tensor([0.0 if snap is None else 1.0 for snap in snaps], device=values.device)
            at = changed[inverse]
            values[at] = good[inverse[at]]
            if mask is not None:
                mask[at] = exists[inverse[at]]
        unknown = rows < 0 if real is None else (rows < 0) & real
        for p in torch.nonzero(unknown).reshape(-1).tolist():  # ids without a row now that had one then
            snap = undo.get(key_at(p))
            if snap is not None:
                values[p] = snap["weights"]
                if mask is not None:
                    mask[p] = 1.0
        return values, mask

    def good_rows(self, table: DynamicEmbeddingTable, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` (of existing ``rows``) as they were in the last good version (for ``l2_to_good``)."""
        good = weights.clone()
        undo = self.undo[table.name]
        hits: list[tuple[int, Mapping[str, torch.Tensor]]] = []
        for i, r in enumerate(rows.tolist()):
            snap = undo.get(table.ids[r])  # type: ignore[arg-type]
            if snap is not None:
                hits.append((i, snap))
        if hits:
            good[torch.tensor([i for i, _ in hits], device=weights.device)] = torch.stack([s["weights"] for _, s in hits])
        return good

    # ------------------------------------------------------------------ gate, promote, rollback
    def judge(self, labels: torch.Tensor, probs: torch.Tensor, good_probs: torch.Tensor) -> tuple[str, float, float] | None:
        """Add a batch's prequential losses of both versions; once ``gate_window`` examples are in,
        ("promote" | "rollback", candidate logloss, good logloss), else None."""
        sums = self.gate_sums
        sums[0] += _logloss(labels, probs)
        sums[1] += _logloss(labels, good_probs)
        sums[2] += len(labels)
        if sums[2] < self.cfg.gate_window:
            return None
        cand, good = sums[0] / sums[2], sums[1] / sums[2]
        self.gate_sums = [0.0, 0.0, 0]
        if not math.isfinite(cand) or cand > good * (1 + self.cfg.gate_tolerance):
            return "rollback", cand, good
        return "promote", cand, good

    def promote(self, version: int) -> None:
        """Declare ``version`` good: the undo log starts over from here."""
        for undo in self.undo.values():
            undo.clear()
        self.good_dense, self.good_dense_opt = copy_dense(self.dense, self.dense_opt)
        self.good_version = version

    def restore(self, now_ms: int) -> None:
        """Put every row changed since the last good version back, and the good dense state; the undo
        log is then empty (what is restored is the new good state, under the caller's new version)."""
        for table in self.tables.values():
            table.on_change = None
        for name, undo in self.undo.items():
            for key, snap in undo.items():
                self.tables[name].restore_row(key, snap, now_ms)
            undo.clear()
        self.dense.load_state_dict(self.good_dense)
        self.dense_opt.load_state_dict(self.good_dense_opt)
        self.attach()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"good_version": self.good_version, "good_dense": {k: v.cpu() for k, v in self.good_dense.items()},
                "good_dense_opt": self.good_dense_opt, "gate_sums": list(self.gate_sums),
                "undo": {name: _undo_block(undo) for name, undo in self.undo.items()}}

    def load_state_dict(self, sd: dict[str, Any], device: torch.device) -> None:
        self.good_version = int(sd["good_version"])
        self.good_dense, self.good_dense_opt = sd["good_dense"], sd["good_dense_opt"]
        self.gate_sums = list(sd["gate_sums"])
        self.undo = {name: {} for name in self.tables}
        for name, block in sd["undo"].items():
            self.undo[name] = _undo_from_block(block, device)
        self.attach()


def _undo_block(undo: Undo) -> dict[str, Any]:
    """A table's undo log for a checkpoint: ids (one JSON string), which had a row, and each field of
    those rows stacked into one tensor (thousands of per-row tensors cost torch.save a pickle each)."""
    keys = list(undo)
    snaps = [s for s in undo.values() if s is not None]
    names = sorted(snaps[0]) if snaps else []
    for snap in snaps:
        if sorted(snap) != names:
            raise ValueError(f"undo log: rows with fields {sorted(snap)} and {names}")
    fields = {n: torch.stack([snap[n] for snap in snaps]).cpu() for n in names}
    return {"ids": json.dumps(keys), "exists": torch.tensor([undo[k] is not None for k in keys], dtype=torch.bool),
            "fields": fields}


def _undo_from_block(block: dict[str, Any], device: torch.device) -> Undo:
    keys = json.loads(block["ids"])
    exists = block["exists"].tolist()
    if len(exists) != len(keys):
        raise ValueError("checkpoint: undo log ids and rows differ in length")
    fields = {n: t.to(device) for n, t in block["fields"].items()}
    out: Undo = {}
    j = 0
    for key, had_row in zip(keys, exists, strict=True):
        if had_row:
            out[key] = RowSnapshot(fields, j)
            j += 1
        else:
            out[key] = None
    return out
