"""Gradient accumulation and the optimizer step of one shard, all or nothing.

Row gradients of each micro-batch are kept per table (the dense tower's accumulate in ``.grad``)
until ``accumulate_steps`` micro-batches are in; the step then sums them per row, clips them, adds
the pull towards the last good version (``l2_to_good``) and applies the row-wise optimizer and the
dense Adagrad. If any gradient, new row, optimizer state or dense parameter is not finite, nothing
is written and the step is skipped: a poisoned batch never reaches the model or a delta.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import LearnerConfig
from model.embedding import DynamicEmbeddingTable
from model.guard import StabilityGuard
from model.optim import all_finite, clip_rows


class GradientAccumulator:
    """The gradients since the last step of ``tables`` and ``dense``, and the step that applies them."""

    def __init__(self, cfg: LearnerConfig, tables: tuple[DynamicEmbeddingTable, ...], dense: nn.Module,
                 dense_opt: torch.optim.Optimizer, guard: StabilityGuard):
        self.cfg, self.tables, self.dense, self.dense_opt, self.guard = cfg, tables, dense, dense_opt, guard
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in self.tables}
        self.batches = self.examples = 0
        self.dense_opt.zero_grad(set_to_none=True)

    def add(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], examples: int) -> None:
        """One micro-batch: (row indices, row gradients) per table name, over ``examples`` examples."""
        for name, part in rows.items():
            self.parts[name].append(part)
        self.batches += 1
        self.examples += examples

    @property
    def ready(self) -> bool:
        return self.batches >= self.cfg.accumulate_steps

    def step(self) -> bool:
        """Apply the accumulated gradients (True), or skip a non-finite step (False); reset either way."""
        try:
            return self._step()
        finally:
            self.reset()

    def _summed(self) -> list[tuple[DynamicEmbeddingTable, torch.Tensor, torch.Tensor]]:
        out = []
        for table in self.tables:
            parts = self.parts[table.name]
            if not parts:
                continue
            rows, grads = torch.cat([r for r, _ in parts]), torch.cat([g for _, g in parts])
            keep = rows >= 0
            rows, grads = rows[keep], grads[keep]
            if rows.numel():
                uniq, inverse = torch.unique(rows, return_inverse=True)
                out.append((table, uniq, grads.new_zeros(len(uniq), table.width).index_add_(0, inverse, grads)))
        return out

    def _step(self) -> bool:
        cfg, l2, dense = self.cfg, self.cfg.l2_to_good, self.dense
        updates = self._summed()
        if not all_finite(*(u[2] for u in updates), *(p.grad for p in dense.parameters() if p.grad is not None)):
            return False
        staged = []
        for table, rows, grads in updates:
            grads = clip_rows(grads, cfg.clip_norm)
            weights = table.weights[rows]
            if l2 > 0:
                grads = grads + l2 * (weights - self.guard.good_rows(table, rows, weights))
            new_w, new_state = table.optimizer.step(weights, grads, {k: v[rows] for k, v in table.state.items()})
            staged.append((table, rows, new_w, new_state))
        for name, p in dense.named_parameters():
            if p.grad is not None:
                p.grad /= max(1, self.examples)
                if l2 > 0:
                    p.grad += l2 * (p.detach() - self.guard.good_dense[name])
        if cfg.clip_norm is not None:
            nn.utils.clip_grad_norm_(dense.parameters(), cfg.clip_norm)
        if not all_finite(*(s[2] for s in staged), *(t for s in staged for t in s[3].values())):
            return False
        params, opt_state = list(dense.parameters()), self.dense_opt.state
        before = [p.detach().clone() for p in params]
        sums_before = {id(p): opt_state[p]["sum"].clone() for p in params if "sum" in opt_state[p]}
        self.dense_opt.step()
        if not all_finite(*(p.detach() for p in params)):
            with torch.no_grad():
                for p, b in zip(params, before, strict=True):
                    p.copy_(b)
                    if id(p) in sums_before:
                        opt_state[p]["sum"].copy_(sums_before[id(p)])
            return False
        for table, rows, new_w, new_state in staged:
            table.write_rows(rows, new_w, new_state)
        return True
