"""The model's arithmetic: the user tower, the logit, and the user rows that serving reads.

    q_u   = e_u + mean(e_j for j in u's last N items)          (user tower)
    logit = q_u . e_i + b_u + b_i + g + f_u(user feats) + f_i(item feats)

Rows hold an embedding of ``dim`` values followed by a bias. Serving never sees user features: each
user's side is folded into one published row (q_u, c_u = b_u + g + f_u), recomputed whenever the
user acts (``user_query_rows``), so the serving score is q_u . e_i + c_u + b_i + f_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.dense import DenseTower


def user_tower(U: torch.Tensor, H: torch.Tensor, hmask: torch.Tensor, dim: int) -> torch.Tensor:
    """q_u = e_u + mean of the embeddings of the user's last items (``hmask``: which history slots hold one)."""
    return U[:, :dim] + (H[..., :dim] * hmask.unsqueeze(-1)).sum(1) / hmask.sum(1).clamp(min=1).unsqueeze(-1)


def logits(dense: DenseTower, dim: int, U: torch.Tensor, I: torch.Tensor, H: torch.Tensor, hmask: torch.Tensor,
           uf: torch.Tensor, itf: torch.Tensor, owner: torch.Tensor | None = None,
           dense_params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Serving logit s(u, i); training and prequential scores use s - log_q (``model.batch.log_q``). The
    user side (U, H, hmask, uf) is per event, the item side (I, itf) per example; ``owner`` maps examples
    to events (None: one example per event); ``dense_params`` replace the dense tower's live parameters."""
    q = user_tower(U, H, hmask, dim)
    c = U[:, dim] + dense.user_term(uf, dense_params)
    if owner is not None:
        q, c = q[owner], c[owner]
    return (q * I[:, :dim]).sum(-1) + c + I[:, dim] + dense.item_term(itf, dense_params)


def latest_per_user(events: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each user's newest real (not externally sampled) event among ``events`` (in time order)."""
    latest: dict[str, dict[str, Any]] = {}
    for ev in events:
        if not ev.get("sampled"):
            latest[ev["user_id"]] = ev
    return latest


def user_query_rows(dense: DenseTower, dim: int, U: torch.Tensor, H: torch.Tensor, hmask: torch.Tensor,
                    uf: torch.Tensor) -> torch.Tensor:
    """The published (q_u, c_u) rows of users from their rows ``U``, history rows ``H`` and features ``uf``."""
    with torch.no_grad():
        q = user_tower(U, H, hmask, dim)
        c = U[:, dim] + dense.user_term(uf)
        return torch.cat([q, c.unsqueeze(-1)], dim=1)
