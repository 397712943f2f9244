"""Row-wise optimizers for sparse online learning; their state lives beside the rows it belongs to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import LearnerConfig


class RowOptimizer:
    """Updates a block of rows given their summed gradients. State tensors have the rows' shape."""

    state_names: tuple[str, ...] = ()

    def init_state(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def step(
        self, weights: torch.Tensor, grads: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class SGD(RowOptimizer):
    lr: float

    def step(self, weights, grads, state):
        return weights - self.lr * grads, {}


@dataclass
class Adagrad(RowOptimizer):
    lr: float
    initial_accumulator: float = 0.01
    eps: float = 1e-10
    state_names = ("accum",)

    def init_state(self, weights):
        return {"accum": torch.full_like(weights, self.initial_accumulator)}

    def step(self, weights, grads, state):
        accum = state["accum"] + grads * grads
        return weights - self.lr * grads / (accum.sqrt() + self.eps), {"accum": accum}


@dataclass
class FTRL(RowOptimizer):
    """Per-coordinate FTRL-Proximal (McMahan et al. 2013), the optimizer of Alink's online LR.

    New rows start from their random initial weights: z is set so that the proximal solution with
    n = 0 equals the initial weights (plain FTRL would start embeddings at 0, where the dot-product
    gradient vanishes).
    """

    alpha: float
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    state_names = ("z", "n")

    def _denominator(self, n: torch.Tensor) -> torch.Tensor:
        return (self.beta + n.sqrt()) / self.alpha + self.l2

    def init_state(self, weights):
        n = torch.zeros_like(weights)
        z = -(weights * self._denominator(n) + torch.sign(weights) * self.l1)
        return {"z": z, "n": n}

    def step(self, weights, grads, state):
        z, n = state["z"], state["n"]
        n_new = n + grads * grads
        sigma = (n_new.sqrt() - n.sqrt()) / self.alpha
        z_new = z + grads - sigma * weights
        shrunk = z_new.abs() > self.l1
        w_new = torch.where(
            shrunk,
            -(z_new - torch.sign(z_new) * self.l1) / self._denominator(n_new),
            torch.zeros_like(z_new),
        )
        return w_new, {"z": z_new, "n": n_new}


def make_row_optimizer(cfg: LearnerConfig) -> RowOptimizer:
    if cfg.optimizer == "adagrad":
        return Adagrad(lr=cfg.lr, initial_accumulator=cfg.adagrad_init)
    if cfg.optimizer == "ftrl":
        return FTRL(alpha=cfg.ftrl_alpha, beta=cfg.ftrl_beta, l1=cfg.ftrl_l1, l2=cfg.ftrl_l2)
    return SGD(lr=cfg.lr)


def clip_rows(grads: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Scale each row's gradient down to at most ``max_norm`` (L2)."""
    if max_norm is None or grads.numel() == 0:
        return grads
    norms = grads.norm(dim=1, keepdim=True)
    scale = torch.clamp(max_norm / (norms + 1e-12), max=1.0)
    return grads * scale


def all_finite(*tensors: torch.Tensor) -> bool:
    flat = [t.reshape(-1) for t in tensors if t.numel()]
    return not flat or bool(torch.isfinite(torch.cat(flat)).all())


def finite_float(x: float) -> bool:
    return math.isfinite(x)
