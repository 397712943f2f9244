"""The dense part of the score: f_u(user features) + f_i(item features) + a global bias.

Two small MLPs whose output layers start at zero, so a fresh model scores from the embeddings
alone. Only the item side and the bias are published (``dense_rows``): the user side is folded
into each user's published query row, so serving never needs user features.
"""

from __future__ import annotations

import torch
from torch import nn


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        out = nn.Linear(hidden, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class DenseTower(nn.Module):
    """Additive dense part: f_u(user features) + f_i(item features) + global bias, as ``user_term(uf) + item_term(itf)``."""

    def __init__(self, user_features: int, item_features: int, hidden: int):
        super().__init__()
        self.user = _MLP(user_features, hidden) if user_features else None
        self.item = _MLP(item_features, hidden) if item_features else None
        self.bias = nn.Parameter(torch.zeros(1))

    def user_term(self, uf: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Global bias + f_u(user features); with ``params`` (e.g. the last good version's) instead of the live ones."""
        base = (self.bias if params is None else params["bias"]).expand(uf.shape[0])
        return base + self._mlp("user", uf, params) if self.user is not None else base

    def item_term(self, itf: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """f_i(item features), with ``params`` as in ``user_term``."""
        return self._mlp("item", itf, params) if self.item is not None else torch.zeros(itf.shape[0], device=itf.device)

    def _mlp(self, name: str, x: torch.Tensor, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if params is None:
            return getattr(self, name)(x)
        h = nn.functional.relu(nn.functional.linear(x, params[f"{name}.net.0.weight"], params[f"{name}.net.0.bias"]))
        return nn.functional.linear(h, params[f"{name}.net.2.weight"], params[f"{name}.net.2.bias"]).squeeze(-1)

    def item_parameters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_parameters() if k.startswith("item.")}


def dense_rows(dense: DenseTower) -> tuple[list[str], torch.Tensor]:
    """The published dense parameters (item side and bias) as named rows, each flattened and zero-padded."""
    params = dense.item_parameters()
    names = list(params) + ["bias"]
    flat = [params[n].detach().reshape(-1).cpu() for n in params] + [dense.bias.detach().cpu()]
    width = max(len(f) for f in flat)
    values = torch.zeros(len(flat), width)
    for i, f in enumerate(flat):
        values[i, : len(f)] = f
    return names, values


def load_dense_rows(dense: DenseTower, names: list[str], values: torch.Tensor) -> None:
    """Write published dense rows (``dense_rows``) back into a DenseTower."""
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, row in zip(names, values, strict=False):
            p = params[name]
            p.copy_(row[: p.numel()].reshape(p.shape).to(p.device))
