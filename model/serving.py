"""Serving from published rows: top-k from the ``item``, ``user_query`` and ``dense`` tables.

The learner and the consumer score the same way, through ``topk_from_tables``, so a consumer that
applied a shard's deltas up to version ``v`` returns the learner's scores at ``v``. ``ServingModel``
is that consumer's copy of one shard: the published tables alone, kept current by ``apply_delta``,
with no user rows, optimizer state, undo log or sketches (it never learns).

The score of user u for item i, from published rows only:

    s(u, i) = q_u . e_i + c_u + b_i + f_i(item features)

where ``user_query`` holds (q_u, c_u) and ``item`` holds (e_i, b_i, item features).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from model.config import LearnerConfig
from model.deltas import DENSE, ITEM, QUERY, USER, ModelDelta
from model.dense import DenseTower, load_dense_rows
from model.embedding import DynamicEmbeddingTable
from model.optim import SGD


def item_logits(qc: torch.Tensor, W: torch.Tensor, item_term: torch.Tensor, d: int) -> torch.Tensor:
    """Serving score of one published user row (q_u, c_u) against item rows (e_i, b_i) and f_i(item feats)."""
    return W[:, :d] @ qc[:d] + W[:, d] + item_term + qc[d]


@torch.no_grad()
def topk_from_tables(
    queries: Any, items: Any, dense: DenseTower, user_ids: list[str], k: int
) -> dict[str, list[tuple[str, float]]]:
    """Top-k (item, probability) per user; users without a published row get []."""
    out: dict[str, list[tuple[str, float]]] = {}
    item_rows = items.active_rows()
    if item_rows.numel() == 0:
        return {u: [] for u in user_ids}
    d = items.cfg.dim
    W = items.weights[item_rows]
    item_term = dense.item_term(items.extra[item_rows])
    kk = min(k, len(item_rows))
    known = [(u, queries.row_of(u)) for u in user_ids]
    known = [(u, r) for u, r in known if r >= 0]
    for user in user_ids:
        out[user] = []
    if not known:
        return out
    qc = queries.weights[torch.tensor([r for _, r in known], dtype=torch.long, device=W.device)]
    # all users of the batch against all items in one matmul (item_logits for many users)
    logits = qc[:, :d] @ W[:, :d].T + (W[:, d] + item_term).unsqueeze(0) + qc[:, d : d + 1]
    top = torch.topk(logits, kk, dim=1)
    probs = torch.sigmoid(top.values).tolist()
    ids = items.ids
    rows = item_rows[top.indices].tolist()
    for (user, _), r_row, p_row in zip(known, rows, probs, strict=True):
        out[user] = [(ids[r], p) for r, p in zip(r_row, p_row, strict=True)]
    return out


@torch.no_grad()
def score_candidates(queries: Any, items: Any, dense: DenseTower, user_id: str, item_ids: list[str]) -> list[float]:
    """Logits of one user's published row against the given items (unknown users and items score from zeros)."""
    row = queries.row_of(user_id)
    qc = queries.weights[row] if row >= 0 else torch.zeros(queries.width, device=queries.weights.device)
    rows = items.rows(item_ids)
    return item_logits(qc, items.gather(rows), dense.item_term(items.gather_extra(rows)), items.cfg.dim).tolist()


def write_delta(tables: dict[str, DynamicEmbeddingTable], dense: DenseTower, delta: ModelDelta, now_ms: int) -> bool:
    """Overwrite ``tables``/``dense`` with a delta's rows and tombstones; False for a table not held here."""
    if delta.table == DENSE:
        load_dense_rows(dense, delta.row_ids, delta.row_values)
        return True
    table = tables.get(delta.table)
    if table is None:
        return False
    for key, values in zip(delta.row_ids, delta.row_values, strict=False):
        table.set_values(key, values.to(table.device), now_ms)
    for key in delta.tombstones:
        table.remove(key)
    table.clear_changes()
    return True


class BadDelta(ValueError):
    """A delta a serving copy refuses (``reason`` is short and stable, for counters)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ServingModel:
    """One shard's published tables, as a consumer holds them."""

    def __init__(self, cfg: LearnerConfig, shard: int = 0):
        self.cfg, self.shard = cfg, shard
        # no admission sketch and no optimizer state: rows are written, never learned
        frozen = SGD(lr=0.0)
        self.items = DynamicEmbeddingTable(ITEM, replace(cfg.item_table, admit_after=1), frozen, cfg.item_features)
        self.queries = DynamicEmbeddingTable(QUERY, replace(cfg.user_table, admit_after=1, init_std=0.0), frozen)
        self.dense = DenseTower(cfg.user_features, cfg.item_features, cfg.dense_hidden)
        self.version = 0

    def tables(self) -> dict[str, DynamicEmbeddingTable]:
        return {ITEM: self.items, QUERY: self.queries}

    def check_delta(self, delta: ModelDelta) -> None:
        """BadDelta unless ``delta`` fits these tables: a known table, rows of its width, finite values."""
        values, n = delta.row_values, len(delta.row_ids)
        if delta.table == DENSE:
            params = dict(self.dense.named_parameters())
            unknown = [name for name in delta.row_ids if name not in params]
            if unknown:
                raise BadDelta("unknown_parameter", f"dense rows {unknown[:3]} are not parameters of this model")
            width = max((params[name].numel() for name in delta.row_ids), default=0)
        elif delta.table in (ITEM, QUERY, USER):
            width = self.items.width + self.items.extra_width if delta.table == ITEM else self.queries.width
        else:
            raise BadDelta("unknown_table", f"table {delta.table!r} (expected {ITEM}, {QUERY}, {USER} or {DENSE})")
        if n and (values.dim() != 2 or values.shape[0] != n or values.shape[1] < width
                  or (delta.table != DENSE and values.shape[1] != width)):
            raise BadDelta("wrong_width", f"{delta.table} rows of shape {tuple(values.shape)}, expected ({n}, {width})")
        if n and not bool(torch.isfinite(values).all()):
            raise BadDelta("non_finite", f"{delta.table} delta of version {delta.model_version} holds NaN or Inf")

    def apply_delta(self, delta: ModelDelta) -> None:
        """Apply a published delta (user rows are the learner's own and are skipped); ``check_delta`` first."""
        self.check_delta(delta)
        if delta.table != USER and not write_delta(self.tables(), self.dense, delta, 0):
            raise ValueError(f"ServingModel: delta for unknown table {delta.table!r}")
        self.version = max(self.version, delta.model_version)

    def topk(self, user_ids: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
        return topk_from_tables(self.queries, self.items, self.dense, user_ids, k)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """The published tables out of a learner's checkpoint (``IncrementalLearner.state_dict``; a synced
        shard's item rows and dense tower are its ``SharedServing`` ones)."""
        self.shard = int(sd["shard"])
        served = sd.get("served")
        for name, table in self.tables().items():
            table.load_state_dict(served["items"] if served and name == ITEM else sd["tables"][name])
        self.dense.load_state_dict(served["dense"] if served else sd["dense"])
        self.version = int(sd["version"])

    @classmethod
    def from_state(cls, sd: dict[str, Any], cfg: LearnerConfig | None = None) -> ServingModel:
        """From a learner's state dict (``model.checkpoint.verified_state`` reads one from a file)."""
        model = cls(cfg or LearnerConfig.from_dict(sd["config"]), int(sd["shard"]))
        model.load_state_dict(sd)
        return model

    def published_snapshot(self) -> dict[str, dict[str, list[float]]]:
        """Every served value, by table and id (compare with ``IncrementalLearner.published_snapshot``)."""
        out = {name: {k: t.published_values(k).tolist() for k in sorted(t.index)} for name, t in self.tables().items()}
        out[DENSE] = {k: v.reshape(-1).tolist() for k, v in self.dense.state_dict().items()
                      if k.startswith("item.") or k == "bias"}
        return out


class SharedServing:
    """What a synced shard serves: the item rows and the item side of the dense tower as merged across the
    shards (``model.shard_sync``), not its live copy. Every shard applies the same merged epochs in the same
    order, so every shard publishes the same item rows, and a consumer serves an item alike whichever shard
    a user lives on. A shard's own changes reach serving with the merge that holds them."""

    def __init__(self, cfg: LearnerConfig, dense: DenseTower, device: torch.device):
        self.items = DynamicEmbeddingTable(ITEM, replace(cfg.item_table, admit_after=1), SGD(lr=0.0), cfg.item_features,
                                           device, cfg.seed + 1)  # the live item table's seed: the same initial rows
        self.dense = copy.deepcopy(dense)  # the dense tower as it started, then every merge
        self.dense_dirty = False

    @torch.no_grad()
    def add(self, ids: list[str], weights: torch.Tensor, facts: dict[str, torch.Tensor],
            dense: dict[str, torch.Tensor], now_ms: int) -> None:
        """Add a merged update: item values (rows of ``ids``), the newest side features, dense parameters."""
        table = self.items
        if ids:
            new = [k for k in ids if k not in table.index]
            if new:
                table._allocate_many(new, now_ms)
            kept = [i for i, k in enumerate(ids) if k in table.index]
            rows = table.rows([ids[i] for i in kept])
            table.weights[rows] += weights[torch.tensor(kept, dtype=torch.long)].to(table.device)
            table.dirty.update(ids[i] for i in kept)
        fresh = [(table.index[k], v) for k, v in facts.items() if k in table.index]
        if fresh and table.extra_width:
            table.extra[torch.tensor([r for r, _ in fresh], device=table.device)] = torch.stack([v for _, v in fresh]).to(table.device)
        for name, param in self.dense.named_parameters():
            if name in dense:
                param.add_(dense[name].to(param.device))
                self.dense_dirty = True

    def state_dict(self) -> dict[str, Any]:
        return {"items": self.items.state_dict(), "dense": {k: v.cpu() for k, v in self.dense.state_dict().items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.items.load_state_dict(sd["items"])
        self.dense.load_state_dict(sd["dense"])
