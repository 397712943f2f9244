"""Micro-batches as tensors: labels, sampled negatives and row lookups for one ``learn`` call.

A batch's examples are each event's own (user, item) pair, in event order (example k is event k),
then the negatives sampled for its positive events, grouped by event. The user side (user row,
history, user features) is computed once per event and the examples index it by ``owner``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.config import LearnerConfig
from model.embedding import DynamicEmbeddingTable


def time_order(event: dict[str, Any]) -> tuple[int, int]:
    """Sort key of an event in its stream: its event time, then its position in its input (``seq``, which a
    reader stamps; -1 where there is none, so ties keep their arrival order under a stable sort). Every step
    that sorts events sorts by it, so that events of one time reach the model in the input's order however
    a runner has shuffled them between keyed steps (the key groups)."""
    seq = event.get("seq")
    return event["event_time_ms"], -1 if seq is None else seq


def event_label(event: dict[str, Any], rating_threshold: float) -> float:
    """1/0 for an event: an explicit ``label`` wins (externally sampled negatives), ratings by threshold,
    other behaviour is implicit positive feedback."""
    if event.get("label") is not None:
        return float(event["label"])
    if event["event_type"] == "rating":
        value = event.get("value")
        return 1.0 if value is not None and value >= rating_threshold else 0.0
    return 1.0


@dataclass
class Batch:
    """A micro-batch as tensors (see the module docstring for the example order)."""

    users: list[str]  # per event
    items: list[str]  # per example
    histories: list[list[str]]  # per event
    labels: torch.Tensor
    weights: torch.Tensor
    user_feats: torch.Tensor  # per event
    item_feats: torch.Tensor
    positive_index: list[int]
    log_q: torch.Tensor  # sampling-bias correction subtracted from each example's training logit
    owner: torch.Tensor | None  # the event of each example; None when every example is its own event's
    rows: Any = None  # cached BatchBuilder.gathered() result with the table layouts it was computed at


def history_positions(hists: list[list[str]], width: int, device: torch.device) -> torch.Tensor:
    """Flat (len(hists) * width) mask of the history slots that hold an id (the rest is padding)."""
    lengths = torch.tensor([len(h) for h in hists], device=device)
    return (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).reshape(-1)


def log_q(event: dict[str, Any]) -> float:
    """Sampling-bias (logQ) correction of one example, as in Yi et al. 2019 and TFRS's
    ``candidate_sampling_probability``: when negatives are drawn from a non-uniform distribution q
    (e.g. popularity-proportional), an example may carry ``sample_log_q`` = log(k * q(item)), the log of
    the expected number of times the sampler draws its item per positive. Training fits
    s(u, i) - log(k q(i)), so the serving score s(u, i) estimates log p(i | u) instead of the
    popularity-free ratio p(i | u) / q(i), which ranks rare items above the ones users click."""
    value = event.get("sample_log_q")
    if value is None:
        return 0.0
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"learn(event {event.get('event_id')!r}): sample_log_q must be finite, got {value!r}")
    return value


def feature_matrix(rows: list[Any], width: int, events: Sequence[dict[str, Any]], field: str) -> torch.Tensor:
    """(len(rows), width) float32 from per-example feature lists; a wrong width names the event."""
    try:
        arr = np.asarray(rows, dtype=np.float32)
        if arr.shape == (len(rows), width) or (width == 0 and arr.size == 0):
            return torch.from_numpy(arr.reshape(len(rows), width))
    except (TypeError, ValueError):
        pass
    for ev in events:
        vals = list(ev.get(field) or ())
        step = f"learn(event {ev.get('event_id')!r}) {field}"
        if len(vals) != width:
            raise ValueError(f"{step}: expected {width} feature values, got {len(vals)}")
        try:
            [float(v) for v in vals]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{step}: expected {width} numbers, got {vals!r}") from exc
    raise ValueError(f"learn: {field} must be {width} numbers per example")


class BatchBuilder:
    """Builds ``Batch``es against one learner's tables, and looks up (and caches) their rows."""

    def __init__(self, cfg: LearnerConfig, users: DynamicEmbeddingTable, items: DynamicEmbeddingTable,
                 rng: random.Random, device: torch.device):
        self.cfg, self.users, self.items, self.rng, self.device = cfg, users, items, rng, device

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host batch -> device; on CUDA through pinned memory with an asynchronous copy."""
        if self.device.type == "cuda" and t.device != self.device:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def sample_negatives(self, exclude: list[str], n: int, live: np.ndarray) -> tuple[list[int], list[int]]:
        """For each id in ``exclude`` (a positive example's own item), n rows drawn uniformly from the table's
        live rows (by physical row, so that a restored checkpoint draws the same ones), never that item's own
        row: (index into ``exclude``, row) per negative, in ``exclude`` order. A draw of the own row is
        redrawn (at most 8 times, then dropped: only a table of about one row gets there)."""
        size = len(live)
        if n == 0 or size < 2 or not exclude:
            return [], []
        rand = self.rng.random
        draws = np.fromiter((rand() for _ in range(len(exclude) * n)), dtype=np.float64, count=len(exclude) * n)
        rows = live[(draws * size).astype(np.int64)].reshape(len(exclude), n)
        get = self.items.index.get
        own = np.fromiter((get(k, -1) for k in exclude), dtype=np.int64, count=len(exclude))
        keep = np.ones(rows.shape, dtype=bool)
        for p, j in zip(*np.nonzero(rows == own[:, None]), strict=True):
            for _ in range(8):
                row = int(live[int(rand() * size)])
                if row != own[p]:
                    rows[p, j] = row
                    break
            else:
                keep[p, j] = False
        which = np.repeat(np.arange(len(exclude)), n)
        flat_keep = keep.reshape(-1)
        return which[flat_keep].tolist(), rows.reshape(-1)[flat_keep].tolist()

    def build(self, events: Sequence[dict[str, Any]], negatives: bool = True) -> Batch:
        cfg = self.cfg
        users: list[str] = []  # per event
        hists: list[list[str]] = []
        ufs: list[Sequence[float]] = []
        ifs: list[Sequence[float]] = []
        items: list[str] = []  # per example
        labels: list[float] = []
        weights: list[float] = []
        corrections: list[float] = []
        positives: list[int] = []
        type_weights, hlen, threshold = cfg.type_weights, cfg.history, cfg.rating_threshold
        for ev in events:
            hist = ev.get("history") or []
            if len(hist) > hlen:
                hist = hist[-hlen:] if hlen else []
            label = event_label(ev, threshold)
            if label > 0.5:
                positives.append(len(users))
            users.append(ev["user_id"]); hists.append(hist)
            ufs.append(ev.get("user_features") or ()); ifs.append(ev.get("item_features") or ())
            items.append(ev["item_id"]); labels.append(label); weights.append(type_weights.get(ev["event_type"], 1.0))
            corrections.append(log_q(ev))
        user_feats = feature_matrix(ufs, cfg.user_features, events, "user_features")
        item_feats = feature_matrix(ifs, cfg.item_features, events, "item_features")
        own, event_index = None, list(range(len(events)))
        if negatives and cfg.negatives and positives:
            which, neg_rows = self.sample_negatives([items[k] for k in positives], cfg.negatives, self.items.live_rows())
            if neg_rows:
                m, ids = len(neg_rows), self.items.ids
                items.extend([ids[r] for r in neg_rows])  # type: ignore[misc]
                labels.extend([0.0] * m); weights.extend([1.0] * m)
                corrections.extend([0.0] * m)  # the internal sampler is uniform over the table: no correction
                own = self.to_device(torch.tensor(event_index + [positives[p] for p in which]))
                # a negative has its own item's stored features
                stored = self.items.extra[torch.tensor(neg_rows, device=self.device)]
                item_feats = torch.cat([self.to_device(item_feats), stored])
        to = self.to_device
        return Batch(users, items, hists, to(torch.tensor(labels)), to(torch.tensor(weights)), to(user_feats),
                     to(item_feats), event_index, to(torch.tensor(corrections)), own)

    def history_rows(self, hists: list[list[str]]) -> torch.Tensor:
        width = max(1, max((len(h) for h in hists), default=0))
        get = self.items.index.get
        memo: dict[int, list[int]] = {}  # events that share one history list (negatives built from their event)
        rows = []
        for h in hists:
            r = memo.get(id(h))
            if r is None:
                r = memo[id(h)] = [get(k, -1) for k in h] + [-1] * (width - len(h))
            rows.append(r)
        return torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(len(hists), width)).to(self.device)

    def gathered(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices of the batch's users, items and history items. Cached on the batch: reused as they
        are while no id got or lost a row, and only the unknown (-1) entries are looked up again when ids
        were admitted but none removed."""
        tables = (self.users, self.items)
        layout = tuple((id(t), t.layout, t.removals) for t in tables)
        if batch.rows is not None:
            old, (u_rows, i_rows, h_rows) = batch.rows
            if old == layout:
                return u_rows, i_rows, h_rows
            if all(o[0] == n[0] and o[2] == n[2] for o, n in zip(old, layout, strict=True)):  # admissions only
                u_rows = _relookup(self.users, u_rows, batch.users.__getitem__)
                i_rows = _relookup(self.items, i_rows, batch.items.__getitem__)
                width = h_rows.shape[1]
                hists = batch.histories
                flat = _relookup(self.items, h_rows.reshape(-1), lambda p: hists[p // width][p % width],
                                 real=history_positions(hists, width, self.device))
                h_rows = flat.view_as(h_rows)
                batch.rows = (layout, (u_rows, i_rows, h_rows))
                return u_rows, i_rows, h_rows
        u_rows = self.users.rows(batch.users)
        i_rows = self.items.rows(batch.items)
        h_rows = self.history_rows(batch.histories)
        batch.rows = (layout, (u_rows, i_rows, h_rows))
        return u_rows, i_rows, h_rows


def _relookup(table: DynamicEmbeddingTable, rows: torch.Tensor, key_at: Any, real: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` with the unknown (-1) positions (among ``real`` ones) looked up again."""
    unknown = rows < 0 if real is None else (rows < 0) & real
    pos = torch.nonzero(unknown).reshape(-1).tolist()
    if not pos:
        return rows
    found = [(p, r) for p in pos if (r := table.index.get(key_at(p), -1)) >= 0]
    if not found:
        return rows
    rows = rows.clone()
    rows[torch.tensor([p for p, _ in found], device=rows.device)] = torch.tensor([r for _, r in found], device=rows.device)
    return rows
