"""The learning core of one shard: predict first, then learn; publish exactly the rows that changed.

Score of user u for item i (the model is a two-tower / factorisation-machine hybrid):

    q_u   = e_u + mean(e_j for j in u's last N items)          (user tower)
    logit = q_u . e_i + b_u + b_i + g + f_u(user feats) + f_i(item feats)

``e``/``b`` live in collisionless dynamic tables (``model.embedding``) trained with a row-wise sparse
optimizer (Adagrad, FTRL or SGD); ``f_u``/``f_i`` are small MLPs trained with dense Adagrad.
Serving needs only published rows: the ``item`` table (e_i, b_i, item feats), the ``user_query``
table (q_u, c_u = b_u + g + f_u) and the ``dense`` table (f_i's parameters); see ``model.serving``.

Runner-free: the Beam DoFn, the PyFlink function and the benchmarks all drive this class.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from model.config import LearnerConfig, TableConfig
from model.embedding import DynamicEmbeddingTable, RowSnapshot
from model.optim import SGD, all_finite, clip_rows, make_row_optimizer

FORMAT_VERSION = 2  # 2: ids as JSON strings and the undo log as stacked blocks (1 still loads)
USER, ITEM, QUERY, DENSE = "user", "item", "user_query", "dense"


def event_label(event: dict[str, Any], rating_threshold: float) -> float:
    """1/0 for an event: an explicit ``label`` wins (externally sampled negatives), ratings by threshold,
    other behaviour is implicit positive feedback."""
    if event.get("label") is not None:
        return float(event["label"])
    if event["event_type"] == "rating":
        value = event.get("value")
        return 1.0 if value is not None and value >= rating_threshold else 0.0
    return 1.0


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when this worker has a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)


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


@dataclass
class _Batch:
    """A micro-batch as tensors. The user side (user, history, user features) is per event and computed
    once per event; the examples (each event's own item and its sampled negatives) index it by ``owner``."""

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
    rows: Any = None  # cached _gathered() result with the table layouts it was computed at


def _history_positions(hists: list[list[str]], width: int, device: torch.device) -> torch.Tensor:
    """Flat (len(hists) * width) mask of the history slots that hold an id (the rest is padding)."""
    lengths = torch.tensor([len(h) for h in hists], device=device)
    return (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).reshape(-1)


def _unknown_positions(rows: torch.Tensor, real: torch.Tensor | None) -> list[int]:
    """Positions whose id has no row (-1), among those marked ``real`` (not padding) when given."""
    unknown = rows < 0 if real is None else (rows < 0) & real
    return torch.nonzero(unknown).reshape(-1).tolist()


def _log_q(event: dict[str, Any]) -> float:
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


def _feature_matrix(rows: list[Any], width: int, events: Sequence[dict[str, Any]], field: str) -> torch.Tensor:
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


class IncrementalLearner:
    """One shard's model partition, its optimizer state and its stability guard."""

    def __init__(self, cfg: LearnerConfig, shard: int = 0):
        self.cfg, self.shard = cfg, shard
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        opt = make_row_optimizer(cfg)
        self.users = DynamicEmbeddingTable(USER, cfg.user_table, opt, 0, self.device, cfg.seed)
        self.items = DynamicEmbeddingTable(ITEM, cfg.item_table, opt, cfg.item_features, self.device, cfg.seed + 1)
        query_cfg = replace(cfg.user_table, admit_after=1, init_std=0.0)
        self.queries = DynamicEmbeddingTable(QUERY, query_cfg, SGD(lr=0.0), 0, self.device, cfg.seed + 2)
        self.dense = DenseTower(cfg.user_features, cfg.item_features, cfg.dense_hidden).to(self.device)
        self.dense_opt = torch.optim.Adagrad(self.dense.parameters(), lr=cfg.dense_lr)
        self.rng = random.Random(cfg.seed)
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.version = 0
        self.published_version = 0
        self.now_ms = 0
        self.frozen = False
        self.counters: Counter[str] = Counter()
        self._dense_dirty = False
        self._acc: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {USER: [], ITEM: []}
        self._acc_batches = 0
        self._acc_examples = 0
        self._pending: list[ModelDelta] = []
        # stability guard: undo log of rows changed since the last good version
        self.good_version = 0
        self._undo: dict[str, dict[str, Mapping[str, torch.Tensor] | None]] = {USER: {}, ITEM: {}, QUERY: {}}
        self._good_dense, self._good_dense_opt = self._copy_dense()
        self._gate_sums = [0.0, 0.0, 0]  # candidate loss, good loss, examples
        self._replay: list[dict[str, Any]] = []
        self._last_retrain_ms: int | None = None
        self._attach_undo()

    # ------------------------------------------------------------------ helpers
    def tables(self) -> dict[str, DynamicEmbeddingTable]:
        return {USER: self.users, ITEM: self.items, QUERY: self.queries}

    def _copy_dense(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Copies of the dense tower's parameters and optimizer state (tensors cloned, the rest deep-copied)."""
        params = {k: v.detach().clone() for k, v in self.dense.state_dict().items()}
        opt = self.dense_opt.state_dict()
        state = {k: {n: (t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t)) for n, t in v.items()}
                 for k, v in opt["state"].items()}
        return params, {"state": state, "param_groups": copy.deepcopy(opt["param_groups"])}

    def _attach_undo(self) -> None:
        track = self.cfg.gate or self.cfg.l2_to_good > 0
        for table in self.tables().values():
            table.on_change = self._record_undo if track else None

    def _record_undo(self, table: DynamicEmbeddingTable, keys: list[str]) -> None:
        undo = self._undo[table.name]
        new = list(dict.fromkeys(k for k in keys if k not in undo))
        if new:
            undo.update(zip(new, table.snapshot_rows(new), strict=True))

    def label_of(self, event: dict[str, Any]) -> float:
        return event_label(event, self.cfg.rating_threshold)

    def _sample_negatives(self, exclude: list[str], n: int, live: np.ndarray) -> tuple[list[int], list[int]]:
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

    def _build(self, events: Sequence[dict[str, Any]], negatives: bool = True) -> _Batch:
        """Examples: each event's own (user, item) first, in event order (example k is event k), then the
        internally sampled negatives of the positive events, grouped by event."""
        cfg = self.cfg
        users: list[str] = []  # per event
        hists: list[list[str]] = []
        ufs: list[Sequence[float]] = []
        ifs: list[Sequence[float]] = []
        items: list[str] = []  # per example
        labels: list[float] = []
        weights: list[float] = []
        log_q: list[float] = []
        positives: list[int] = []
        type_weights, hlen = cfg.type_weights, cfg.history
        for ev in events:
            hist = ev.get("history") or []
            if len(hist) > hlen:
                hist = hist[-hlen:] if hlen else []
            label = self.label_of(ev)
            if label > 0.5:
                positives.append(len(users))
            users.append(ev["user_id"]); hists.append(hist)
            ufs.append(ev.get("user_features") or ()); ifs.append(ev.get("item_features") or ())
            items.append(ev["item_id"]); labels.append(label); weights.append(type_weights.get(ev["event_type"], 1.0))
            log_q.append(_log_q(ev))
        user_feats = _feature_matrix(ufs, cfg.user_features, events, "user_features")
        item_feats = _feature_matrix(ifs, cfg.item_features, events, "item_features")
        own, event_index = None, list(range(len(events)))
        if negatives and cfg.negatives and positives:
            which, neg_rows = self._sample_negatives([items[k] for k in positives], cfg.negatives, self.items.live_rows())
            if neg_rows:
                m, ids = len(neg_rows), self.items.ids
                items.extend([ids[r] for r in neg_rows])  # type: ignore[misc]
                labels.extend([0.0] * m); weights.extend([1.0] * m)
                log_q.extend([0.0] * m)  # the internal sampler is uniform over the table: no correction
                own = self._to_device(torch.tensor(event_index + [positives[p] for p in which]))
                # a negative has its own item's stored features
                stored = self.items.extra[torch.tensor(neg_rows, device=self.device)]
                item_feats = torch.cat([self._to_device(item_feats), stored])
        return _Batch(
            users, items, hists,
            self._to_device(torch.tensor(labels)), self._to_device(torch.tensor(weights)),
            self._to_device(user_feats), self._to_device(item_feats),
            event_index, self._to_device(torch.tensor(log_q)), own,
        )

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host batch -> device; on CUDA through pinned memory with an asynchronous copy."""
        if self.device.type == "cuda" and t.device != self.device:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _history_rows(self, hists: list[list[str]]) -> torch.Tensor:
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

    def _user_tower(self, U: torch.Tensor, H: torch.Tensor, hmask: torch.Tensor) -> torch.Tensor:
        """q_u = e_u + mean of the embeddings of the user's last items (masked)."""
        d = self.cfg.dim
        return U[:, :d] + (H[..., :d] * hmask.unsqueeze(-1)).sum(1) / hmask.sum(1).clamp(min=1).unsqueeze(-1)

    def _logits(self, U, I, H, hmask, uf, itf, owner=None, dense_params=None) -> torch.Tensor:
        """Serving logit s(u, i); training and prequential scores use s - log_q (see ``_log_q``). The user
        side (U, H, hmask, uf) is per event, the item side (I, itf) per example; ``owner`` maps examples
        to events (None: one example per event)."""
        d = self.cfg.dim
        q = self._user_tower(U, H, hmask)
        c = U[:, d] + self.dense.user_term(uf, dense_params)
        if owner is not None:
            q, c = q[owner], c[owner]
        return (q * I[:, :d]).sum(-1) + c + I[:, d] + self.dense.item_term(itf, dense_params)

    def _gathered(self, batch: _Batch):
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
                u_rows = self._relookup(self.users, u_rows, batch.users.__getitem__)
                i_rows = self._relookup(self.items, i_rows, batch.items.__getitem__)
                width = h_rows.shape[1]
                hists = batch.histories
                flat = self._relookup(self.items, h_rows.reshape(-1), lambda p: hists[p // width][p % width],
                                      real=_history_positions(hists, width, self.device))
                h_rows = flat.view_as(h_rows)
                batch.rows = (layout, (u_rows, i_rows, h_rows))
                return u_rows, i_rows, h_rows
        u_rows = self.users.rows(batch.users)
        i_rows = self.items.rows(batch.items)
        h_rows = self._history_rows(batch.histories)
        batch.rows = (layout, (u_rows, i_rows, h_rows))
        return u_rows, i_rows, h_rows

    @staticmethod
    def _relookup(table: DynamicEmbeddingTable, rows: torch.Tensor, key_at: Any,
                  real: torch.Tensor | None = None) -> torch.Tensor:
        pos = _unknown_positions(rows, real)
        if not pos:
            return rows
        found = [(p, r) for p in pos if (r := table.index.get(key_at(p), -1)) >= 0]
        if not found:
            return rows
        rows = rows.clone()
        rows[torch.tensor([p for p, _ in found], device=rows.device)] = torch.tensor([r for _, r in found], device=rows.device)
        return rows

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def _predict_batch(self, batch: _Batch, good: bool = False) -> torch.Tensor:
        u_rows, i_rows, h_rows = self._gathered(batch)
        U, I, H = self.users.gather(u_rows), self.items.gather(i_rows), self.items.gather(h_rows)
        hmask = (h_rows >= 0).float()
        if not good:
            return torch.sigmoid(self._logits(U, I, H, hmask, batch.user_feats, batch.item_feats, batch.owner) - batch.log_q)
        # the last good version: rows changed since then come from the undo log (None = row did not exist)
        width = H.shape[1]

        def hist_key(p: int) -> str:
            return batch.histories[p // width][p % width]

        in_history = _history_positions(batch.histories, width, self.device)
        U, _ = self._good_values(self.users, u_rows, U, None, batch.users.__getitem__)
        I, _ = self._good_values(self.items, i_rows, I, None, batch.items.__getitem__)
        Hf, hm = self._good_values(self.items, h_rows.reshape(-1), H.reshape(-1, H.shape[-1]), hmask.reshape(-1), hist_key,
                                   real=in_history)
        H, hmask = Hf.view_as(H), hm.view_as(hmask)  # type: ignore[union-attr]
        return torch.sigmoid(self._logits(U, I, H, hmask, batch.user_feats, batch.item_feats, batch.owner, self._good_dense)
                             - batch.log_q)

    def _good_values(self, table: DynamicEmbeddingTable, rows: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None, key_at: Any,
                     real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``values`` (table rows gathered at ``rows``; -1 = unknown id, zeros) as they were in the last good
        version, with ``mask`` (1 = the row existed) updated alike. The undo log is consulted once per distinct
        row, and per position only where the id has no row now (``key_at(position)`` gives its id; ``real``
        marks the positions that hold an id at all, the others being padding)."""
        undo = self._undo[table.name]
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
        for p in _unknown_positions(rows, real):  # ids without a row now that had one then
            snap = undo.get(key_at(p))
            if snap is not None:
                values[p] = snap["weights"]
                if mask is not None:
                    mask[p] = 1.0
        return values, mask

    def predict(self, events: Sequence[dict[str, Any]]) -> list[float]:
        """P(label = 1) for each event's own (user, item) pair, without learning."""
        if not events:
            return []
        return self._predict_batch(self._build(events, negatives=False)).tolist()

    def evaluate(self, events: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(labels, probs) for the events and their sampled negatives, without learning."""
        batch = self._build(events)
        return batch.labels.tolist(), self._predict_batch(batch).tolist()

    # ------------------------------------------------------------------ learn
    def learn(self, events: Sequence[dict[str, Any]]) -> LearnResult:
        """Score the events with the current version (prequential), then learn from them."""
        events = sorted(events, key=lambda e: e["event_time_ms"])
        if self.cfg.mode == "online" and len(events) > 1:
            # one step per event; externally sampled negatives ride with the event before them
            groups: list[list[dict[str, Any]]] = []
            for ev in events:
                if ev.get("sampled") and groups:
                    groups[-1].append(ev)
                else:
                    groups.append([ev])
            parts = [self._learn_batch(g) for g in groups]
            offset, pos = 0, cast(list[int], [])
            for p in parts:
                pos.extend(offset + i for i in p.positive_index)
                offset += len(p.labels)
            return LearnResult(
                [x for p in parts for x in p.labels], [x for p in parts for x in p.probs], pos,
                sum(p.loss for p in parts) / len(parts), sum(p.steps for p in parts), self.version,
                sum(p.skipped_nonfinite for p in parts), [r for p in parts for r in p.rollbacks],
            )
        return self._learn_batch(events)

    def _learn_batch(self, events: Sequence[dict[str, Any]]) -> LearnResult:
        result = LearnResult([], [], [], float("nan"), 0, self.version, 0, [])
        if not events:
            return result
        self.now_ms = max(self.now_ms, max(int(e["event_time_ms"]) for e in events))
        batch = self._build(events)
        probs = self._predict_batch(batch)
        result.labels, result.probs, result.positive_index = batch.labels.tolist(), probs.tolist(), batch.positive_index
        self.counters["events"] += len(events)
        self.counters["examples"] += len(batch.labels)
        if self.frozen:  # parameters frozen; features and the user tower's history still flow
            self._store_item_features(events, batch)
            self._refresh_queries(events)
            return result
        if self.cfg.mode == "retrain":
            self._retrain_if_due(events)
            self._refresh_queries(events)
            result.version = self.version
            return result
        rollback = self._gate(batch, probs)
        if rollback is not None:
            result.rollbacks.append(rollback)
        skipped_before = self.counters["skipped_nonfinite"]
        result.loss = self._accumulate(events, batch)
        if self._acc_batches >= self.cfg.accumulate_steps:
            result.steps += int(self._apply())
        self._refresh_queries(events)
        if not self._acc_batches:
            self._evict(self.now_ms)
        result.skipped_nonfinite = self.counters["skipped_nonfinite"] - skipped_before
        result.version = self.version
        return result

    def _store_item_features(self, events: Sequence[dict[str, Any]], batch: _Batch) -> None:
        """Keep each (real, not sampled) event's item features beside the item's row, for ranking."""
        real = [i for i, e in enumerate(events) if not e.get("sampled")]
        self.items.write_extra([events[i]["item_id"] for i in real], batch.item_feats[[batch.positive_index[i] for i in real]])

    def _accumulate(self, events: Sequence[dict[str, Any]], batch: _Batch) -> float:
        # Externally sampled negatives ("sampled": true) are not behaviour: they neither count towards
        # admission nor keep rows alive, and they never enter a user's history.
        real = [e for e in events if not e.get("sampled")]
        self.users.observe([e["user_id"] for e in real], self.now_ms)
        self.items.observe([e["item_id"] for e in real], self.now_ms)
        self._store_item_features(events, batch)
        u_rows, i_rows, h_rows = self._gathered(batch)
        U = self.users.gather(u_rows).requires_grad_()
        I = self.items.gather(i_rows).requires_grad_()
        H = self.items.gather(h_rows).requires_grad_()
        hmask = (h_rows >= 0).float()
        logits = self._logits(U, I, H, hmask, batch.user_feats, batch.item_feats, batch.owner) - batch.log_q
        losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        loss = (losses * batch.weights).sum()
        loss.backward()
        assert U.grad is not None and I.grad is not None and H.grad is not None
        self._acc[USER].append((u_rows, U.grad))
        self._acc[ITEM].append((torch.cat([i_rows, h_rows.reshape(-1)]),
                                torch.cat([I.grad, H.grad.reshape(-1, H.shape[-1])])))
        self._acc_batches += 1
        self._acc_examples += len(batch.labels)
        return float(loss.detach()) / max(1, len(batch.labels))

    def _reset_accumulators(self) -> None:
        self._acc = {USER: [], ITEM: []}
        self._acc_batches = self._acc_examples = 0
        self.dense_opt.zero_grad(set_to_none=True)

    def _apply(self) -> bool:
        """One optimizer step from the accumulated gradients; skipped (and counted) if non-finite."""
        cfg = self.cfg
        updates: list[tuple[DynamicEmbeddingTable, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        n = max(1, self._acc_examples)
        for table in (self.users, self.items):
            parts = self._acc[table.name]
            if not parts:
                continue
            rows = torch.cat([r for r, _ in parts])
            grads = torch.cat([g for _, g in parts])
            keep = rows >= 0
            rows, grads = rows[keep], grads[keep]
            if rows.numel() == 0:
                continue
            uniq, inverse = torch.unique(rows, return_inverse=True)
            summed = torch.zeros(len(uniq), table.width, device=self.device).index_add_(0, inverse, grads)
            updates.append((table, uniq, summed, {}))
        dense_grads = [p.grad for p in self.dense.parameters() if p.grad is not None]
        if not all_finite(*(u[2] for u in updates), *dense_grads):
            self.counters["skipped_nonfinite"] += 1
            self._reset_accumulators()
            return False
        staged = []
        for table, rows, grads, _ in updates:
            grads = clip_rows(grads, cfg.clip_norm)
            weights = table.weights[rows]
            if cfg.l2_to_good > 0:
                grads = grads + cfg.l2_to_good * (weights - self._good_rows(table, rows, weights))
            state = {k: v[rows] for k, v in table.state.items()}
            new_w, new_state = table.optimizer.step(weights, grads, state)
            staged.append((table, rows, new_w, new_state))
        for p in self.dense.parameters():
            if p.grad is not None:
                p.grad /= n
        if cfg.l2_to_good > 0:
            for name, p in self.dense.named_parameters():
                if p.grad is not None:
                    p.grad += cfg.l2_to_good * (p.detach() - self._good_dense[name])
        if cfg.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.dense.parameters(), cfg.clip_norm)
        if not all_finite(*(s[2] for s in staged), *(t for s in staged for t in s[3].values())):
            self.counters["skipped_nonfinite"] += 1
            self._reset_accumulators()
            return False
        params = list(self.dense.parameters())
        before = [p.detach().clone() for p in params]
        sums_before = {id(p): self.dense_opt.state[p]["sum"].clone() for p in params if "sum" in self.dense_opt.state[p]}
        self.dense_opt.step()
        if not all_finite(*(p.detach() for p in params)):
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
                    if id(p) in sums_before:
                        self.dense_opt.state[p]["sum"].copy_(sums_before[id(p)])
            self.counters["skipped_nonfinite"] += 1
            self._reset_accumulators()
            return False
        for table, rows, new_w, new_state in staged:
            table.write_rows(rows, new_w, new_state)
        self._dense_dirty = True
        self._reset_accumulators()
        self.version += 1
        self.counters["steps"] += 1
        return True

    def _good_rows(self, table: DynamicEmbeddingTable, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        good = weights.clone()
        undo = self._undo[table.name]
        hits: list[tuple[int, Mapping[str, torch.Tensor]]] = []
        for i, r in enumerate(rows.tolist()):
            snap = undo.get(table.ids[r])  # type: ignore[arg-type]
            if snap is not None:
                hits.append((i, snap))
        if hits:
            good[torch.tensor([i for i, _ in hits], device=self.device)] = torch.stack([snap["weights"] for _, snap in hits])
        return good

    def _refresh_queries(self, events: Sequence[dict[str, Any]]) -> None:
        """Recompute the published user tower (q_u, c_u) for the users these events touched."""
        latest: dict[str, dict[str, Any]] = {}
        for ev in events:
            if not ev.get("sampled"):
                latest[ev["user_id"]] = ev
        if not latest:
            return
        keys, newest = list(latest), list(latest.values())
        hists = [(list(e.get("history") or []) + [e["item_id"]])[-self.cfg.history:] if self.cfg.history else []
                 for e in newest]
        uf = self._to_device(_feature_matrix([e.get("user_features") or () for e in newest], self.cfg.user_features, newest,
                                             "user_features"))
        self.queries.observe(keys, self.now_ms)
        with torch.no_grad():
            h_rows = self._history_rows(hists)
            H = self.items.gather(h_rows)
            hmask = (h_rows >= 0).float()
            U = self.users.gather(self.users.rows(keys))
            q = self._user_tower(U, H, hmask)
            c = U[:, self.cfg.dim] + self.dense.user_term(uf)
            values = torch.cat([q, c.unsqueeze(-1)], dim=1)
        finite = torch.isfinite(values).all(dim=1)
        if not bool(finite.all()):  # a user with non-finite features keeps its last published tower
            self.counters["nonfinite_user_tower"] += int((~finite).sum())
            keys = [k for k, ok in zip(keys, finite.tolist(), strict=True) if ok]
            values = values[finite]
            if not keys:
                return
        rows = self.queries.rows(keys)
        self.queries.write_rows(rows, values, {})

    def _evict(self, now_ms: int) -> None:
        for key in self.users.evict_expired(now_ms):
            self.queries.remove(key)
        self.items.evict_expired(now_ms)
        self.queries.evict_expired(now_ms)

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def topk(self, user_ids: Iterable[str], k: int) -> dict[str, list[tuple[str, float]]]:
        """Top-k items (by probability) for each user from the published rows of this version."""
        return topk_from_tables(self.queries, self.items, self.dense, list(user_ids), k)

    @torch.no_grad()
    def score_candidates(self, user_id: str, item_ids: list[str]) -> list[float]:
        """Logits of the published user tower against the given items (unknown items score from zeros)."""
        row = self.queries.row_of(user_id)
        qc = self.queries.weights[row] if row >= 0 else torch.zeros(self.queries.width, device=self.device)
        rows = self.items.rows(item_ids)
        W = self.items.gather(rows)
        return item_logits(qc, W, self.dense.item_term(self.items.gather_extra(rows)), self.cfg.dim).tolist()

    # ------------------------------------------------------------------ stability guard
    def _gate(self, batch: _Batch, probs: torch.Tensor) -> RollbackRecord | None:
        cfg = self.cfg
        if not cfg.gate or self.version == self.good_version:
            return None
        good_probs = self._predict_batch(batch, good=True)
        y = batch.labels
        eps = 1e-7
        def ll(p: torch.Tensor) -> float:
            p = p.clamp(eps, 1 - eps)
            return float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())
        self._gate_sums[0] += ll(probs)
        self._gate_sums[1] += ll(good_probs)
        self._gate_sums[2] += len(y)
        if self._gate_sums[2] < cfg.gate_window:
            return None
        cand, good = self._gate_sums[0] / self._gate_sums[2], self._gate_sums[1] / self._gate_sums[2]
        self._gate_sums = [0.0, 0.0, 0]
        if not math.isfinite(cand) or cand > good * (1 + cfg.gate_tolerance):
            return self.rollback(cand, good, "candidate logloss above tolerance" if math.isfinite(cand) else "non-finite loss")
        self.promote()
        return None

    def promote(self) -> None:
        """Declare the current version good: the undo log starts over from here."""
        for undo in self._undo.values():
            undo.clear()
        self._good_dense, self._good_dense_opt = self._copy_dense()
        self.good_version = self.version
        self.counters["promotions"] += 1

    def rollback(self, cand: float = float("nan"), good: float = float("nan"), reason: str = "manual") -> RollbackRecord:
        """Restore the last good version's rows; the restored state gets a new version number."""
        self._flush_pending_delta()
        rejected = self.version
        tables = self.tables()
        for table in tables.values():
            table.on_change = None
        for name, undo in self._undo.items():
            for key, snap in undo.items():
                tables[name].restore_row(key, snap, self.now_ms)
        self.dense.load_state_dict(self._good_dense)
        self.dense_opt.load_state_dict(self._good_dense_opt)
        self._dense_dirty = True
        self._attach_undo()
        self._reset_accumulators()
        self.version += 1
        record = RollbackRecord(self.shard, rejected, self.good_version, self.version, cand, good, reason)
        for undo in self._undo.values():
            undo.clear()
        self.good_version = self.version
        self.counters["rollbacks"] += 1
        self._pending.extend(self._collect_deltas(is_rollback=True))
        return record

    # ------------------------------------------------------------------ periodic retrain baseline
    def _retrain_if_due(self, events: Sequence[dict[str, Any]]) -> None:
        self._replay.extend(dict(e) for e in events)
        if self._last_retrain_ms is None:
            self._last_retrain_ms = self.now_ms
        if self.now_ms - self._last_retrain_ms < self.cfg.retrain_every_ms:
            return
        self._last_retrain_ms = self.now_ms
        if self.cfg.retrain_window_ms is not None:
            cutoff = self.now_ms - self.cfg.retrain_window_ms
            self._replay = [e for e in self._replay if e["event_time_ms"] >= cutoff]
        fresh = IncrementalLearner(replace(self.cfg, mode="incremental", gate=False, l2_to_good=0.0), self.shard)
        for _ in range(self.cfg.retrain_epochs):
            for i in range(0, len(self._replay), self.cfg.retrain_batch):
                fresh._learn_batch(self._replay[i : i + self.cfg.retrain_batch])
        old_ids = {name: set(t.index) for name, t in self.tables().items()}
        self.users, self.items, self.queries = fresh.users, fresh.items, fresh.queries
        self.dense, self.dense_opt = fresh.dense, fresh.dense_opt
        for name, table in self.tables().items():
            table.dirty = set(table.index)
            table.tombstones = old_ids[name] - set(table.index)
        self._attach_undo()
        self._dense_dirty = True
        self.version += 1
        self.counters["retrains"] += 1

    # ------------------------------------------------------------------ deltas
    def _collect_deltas(self, is_rollback: bool = False) -> list[ModelDelta]:
        if self.version == self.published_version and not is_rollback:
            return []
        out = []
        for name, table in self.tables().items():
            ids, values, tombs = table.take_changes()
            if ids or tombs:
                out.append(ModelDelta(self.shard, self.version, self.published_version, name, ids, values, tombs, is_rollback))
        if self._dense_dirty:
            params = self.dense.item_parameters()
            names = list(params) + ["bias"]
            flat = [params[n].detach().reshape(-1).cpu() for n in params] + [self.dense.bias.detach().cpu()]
            width = max(len(f) for f in flat)
            values = torch.zeros(len(flat), width)
            for i, f in enumerate(flat):
                values[i, : len(f)] = f
            out.append(ModelDelta(self.shard, self.version, self.published_version, DENSE, names, values, [], is_rollback))
            self._dense_dirty = False
        self.published_version = self.version
        return out

    def _flush_pending_delta(self) -> None:
        self._pending.extend(self._collect_deltas())

    def take_deltas(self) -> list[ModelDelta]:
        """Every row changed since the previous call, grouped per table and version."""
        self._flush_pending_delta()
        out, self._pending = self._pending, []
        return out

    def apply_delta(self, delta: ModelDelta) -> None:
        """Write a published delta's rows into this learner (replay after a snapshot restore)."""
        if delta.table == DENSE:
            load_dense_rows(self.dense, delta.row_ids, delta.row_values)
        else:
            table = self.tables()[delta.table]
            for key, values in zip(delta.row_ids, delta.row_values, strict=False):
                table.set_values(key, values.to(self.device), self.now_ms)
            for key in delta.tombstones:
                table.remove(key)
            table.dirty.clear()
            table.tombstones.clear()
        self.version = self.published_version = max(self.version, delta.model_version)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._acc_batches:
            raise RuntimeError("state_dict: gradients are still being accumulated; checkpoint after a step")
        return {
            "format": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "shard": self.shard,
            "version": self.version,
            "published_version": self.published_version,
            "good_version": self.good_version,
            "now_ms": self.now_ms,
            "tables": {name: t.state_dict() for name, t in self.tables().items()},
            "dense": {k: v.cpu() for k, v in self.dense.state_dict().items()},
            "dense_opt": self.dense_opt.state_dict(),
            "good_dense": {k: v.cpu() for k, v in self._good_dense.items()},
            "good_dense_opt": self._good_dense_opt,
            "undo": {name: _undo_block(undo) for name, undo in self._undo.items()},
            "gate_sums": list(self._gate_sums),
            "rng": _rng_state(self.rng),
            "counters": dict(self.counters),
            "dense_dirty": self._dense_dirty,
            "replay": list(self._replay),
            "last_retrain_ms": self._last_retrain_ms,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") not in (1, FORMAT_VERSION):
            raise ValueError(f"checkpoint format {sd.get('format')!r} is not 1 or {FORMAT_VERSION}")
        self.shard = int(sd["shard"])
        self.version, self.published_version = int(sd["version"]), int(sd["published_version"])
        self.good_version, self.now_ms = int(sd["good_version"]), int(sd["now_ms"])
        for name, table in self.tables().items():
            table.load_state_dict(sd["tables"][name])
        self.dense.load_state_dict(sd["dense"])
        self.dense_opt.load_state_dict(sd["dense_opt"])
        self._good_dense = sd["good_dense"]
        self._good_dense_opt = sd["good_dense_opt"]
        self._undo = {USER: {}, ITEM: {}, QUERY: {}}
        if isinstance(sd["undo"], dict):
            for name, block in sd["undo"].items():
                self._undo[name] = _undo_from_block(block, self.device)
        else:  # format 1: [table, id, {field: tensor} or None] per entry
            for name, key, snap in sd["undo"]:
                self._undo[name][key] = snap
        self._gate_sums = list(sd["gate_sums"])
        self.rng.setstate(_rng_from_state(sd["rng"]))
        self.counters = Counter(sd["counters"])
        self._dense_dirty = bool(sd["dense_dirty"])
        self._replay = list(sd["replay"])
        self._last_retrain_ms = sd["last_retrain_ms"]
        self._reset_accumulators()
        self._attach_undo()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: LearnerConfig | None = None) -> IncrementalLearner:
        sd = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        learner = cls(cfg or LearnerConfig.from_dict(sd["config"]), int(sd["shard"]))
        learner.load_state_dict(sd)
        return learner

    def parameters_snapshot(self) -> dict[str, dict[str, list[float]]]:
        """Published values of every row, by table and id (for equality checks)."""
        out = {name: {k: t.published_values(k).tolist() for k in sorted(t.index)} for name, t in self.tables().items()}
        out[DENSE] = {k: v.reshape(-1).tolist() for k, v in self.dense.state_dict().items()}
        return out

    def published_snapshot(self) -> dict[str, dict[str, list[float]]]:
        """parameters_snapshot() restricted to what deltas publish (the user-side MLP is folded into user_query)."""
        snap = self.parameters_snapshot()
        snap[DENSE] = {k: v for k, v in snap[DENSE].items() if k.startswith("item.") or k == "bias"}
        return snap

    def memory_bytes(self) -> int:
        return sum(t.memory_bytes() for t in self.tables().values())


def _undo_block(undo: dict[str, Mapping[str, torch.Tensor] | None]) -> dict[str, Any]:
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


def _undo_from_block(block: dict[str, Any], device: torch.device) -> dict[str, Mapping[str, torch.Tensor] | None]:
    keys = json.loads(block["ids"])
    exists = block["exists"].tolist()
    if len(exists) != len(keys):
        raise ValueError("checkpoint: undo log ids and rows differ in length")
    fields = {n: t.to(device) for n, t in block["fields"].items()}
    out: dict[str, Mapping[str, torch.Tensor] | None] = {}
    j = 0
    for key, had_row in zip(keys, exists, strict=True):
        if had_row:
            out[key] = RowSnapshot(fields, j)
            j += 1
        else:
            out[key] = None
    return out


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _rng_from_state(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal.tolist()), gauss)


def load_dense_rows(dense: DenseTower, names: list[str], values: torch.Tensor) -> None:
    """Write published dense rows (flattened parameters, zero-padded) back into a DenseTower."""
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, row in zip(names, values, strict=False):
            p = params[name]
            p.copy_(row[: p.numel()].reshape(p.shape).to(p.device))


def item_logits(qc: torch.Tensor, W: torch.Tensor, item_term: torch.Tensor, d: int) -> torch.Tensor:
    """Serving score of one published user row (q_u, c_u) against item rows (e_i, b_i) and f_i(item feats)."""
    return W[:, :d] @ qc[:d] + W[:, d] + item_term + qc[d]


@torch.no_grad()
def topk_from_tables(
    queries: Any, items: Any, dense: DenseTower, user_ids: list[str], k: int
) -> dict[str, list[tuple[str, float]]]:
    """Shared by the learner and the serving copy so that both compute scores the same way."""
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


__all__ = [
    "IncrementalLearner", "LearnResult", "ModelDelta", "RollbackRecord", "DenseTower", "TableConfig",
    "resolve_device", "topk_from_tables", "load_dense_rows",
]
