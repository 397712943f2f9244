"""The learning core of one shard: predict first, then learn; publish exactly the rows that changed.

The model is a two-tower / factorisation-machine hybrid (``model.towers``). Its embeddings and biases
live in collisionless dynamic tables (``model.embedding``) trained with a row-wise sparse optimizer
(Adagrad, FTRL or SGD); the dense MLPs over user and item features (``model.dense``) with dense Adagrad;
steps may accumulate gradients over micro-batches (``model.step``). Serving needs only published rows:
the ``item`` table (e_i, b_i, item feats), the ``user_query`` table (q_u, c_u) and the ``dense`` table
(f_i's parameters); see ``model.serving``. The stability guard (undo log, gate, rollback) is ``model.guard``.

Runner-free: the Beam DoFn, the PyFlink function and the benchmarks all drive this class.

>>> from model.config import LearnerConfig, TableConfig
>>> table = TableConfig(dim=4)
>>> learner = IncrementalLearner(LearnerConfig(user_features=0, item_features=0, user_table=table,
...                                            item_table=table, negatives=1, device="cpu"))
>>> events = [{"event_id": f"e{n}", "user_id": f"u{n % 3}", "item_id": f"i{n % 5}", "event_type": "click",
...            "event_time_ms": 1_000 * n} for n in range(20)]
>>> first = learner.learn(events[:10])    # scored first (first.probs), then one optimizer step
>>> second = learner.learn(events[10:])   # now with one negative per event from the item table
>>> len(first.probs), len(second.probs), learner.version
(10, 20, 2)
>>> sorted({d.table for d in learner.take_deltas()})  # exactly the rows that changed, per table
['dense', 'item', 'user', 'user_query']
>>> [item for item, _ in learner.topk(["u0"], k=2)["u0"]]
['i0', 'i3']
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from model.batch import Batch, BatchBuilder, event_label, feature_matrix, history_positions, time_order
from model.config import LearnerConfig, resolve_device
from model.deltas import DENSE, ITEM, QUERY, USER, LearnResult, ModelDelta, RollbackRecord
from model.dense import DenseTower, dense_rows
from model.embedding import DynamicEmbeddingTable
from model.guard import StabilityGuard
from model.optim import SGD, make_row_optimizer
from model.serving import SharedServing, score_candidates, topk_from_tables, write_delta
from model.step import GradientAccumulator
from model.sync import SyncState, dense_values
from model.towers import latest_per_user, logits, user_query_rows

FORMAT_VERSION = 3  # the checkpoint layout; a checkpoint of another layout is refused


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
        self.frozen = False  # parameters frozen (a static baseline); features and user towers still flow
        self.counters: Counter[str] = Counter()
        self._dense_dirty = False
        self._pending: list[ModelDelta] = []
        self.batches = BatchBuilder(cfg, self.users, self.items, self.rng, self.device)
        self.guard = StabilityGuard(cfg, self.tables(), self.dense, self.dense_opt)
        self.grads = GradientAccumulator(cfg, (self.users, self.items), self.dense, self.dense_opt, self.guard)
        self.sync = SyncState()  # the shared rows' sync position and reference (``model.sync``)
        self.served: SharedServing | None = None  # with the sync: the merged rows it serves (``share_serving``)
        self.sync.ref_dense = dense_values(self)

    def tables(self) -> dict[str, DynamicEmbeddingTable]:
        return {USER: self.users, ITEM: self.items, QUERY: self.queries}

    @property
    def accumulating(self) -> bool:
        """True while gradients of micro-batches are summed towards a step (no checkpoint then)."""
        return self.grads.batches > 0

    @property
    def good_version(self) -> int:
        return self.guard.good_version

    def label_of(self, event: dict[str, Any]) -> float:
        return event_label(event, self.cfg.rating_threshold)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_batch(self, batch: Batch, good: bool = False) -> torch.Tensor:
        """P(label = 1) of each example, by the live version or (``good``) the last good one."""
        u_rows, i_rows, h_rows = self.batches.gathered(batch)
        U, I, H = self.users.gather(u_rows), self.items.gather(i_rows), self.items.gather(h_rows)
        hmask = (h_rows >= 0).float()
        if not good:
            return torch.sigmoid(logits(self.dense, self.cfg.dim, U, I, H, hmask, batch.user_feats, batch.item_feats,
                                        batch.owner) - batch.log_q)
        # rows changed since the last good version come from the undo log (None = row did not exist)
        width, guard = H.shape[1], self.guard
        U, _ = guard.good_values(self.users, u_rows, U, None, batch.users.__getitem__)
        I, _ = guard.good_values(self.items, i_rows, I, None, batch.items.__getitem__)
        Hf, hm = guard.good_values(self.items, h_rows.reshape(-1), H.reshape(-1, H.shape[-1]), hmask.reshape(-1),
                                   lambda p: batch.histories[p // width][p % width],
                                   real=history_positions(batch.histories, width, self.device))
        H, hmask = Hf.view_as(H), hm.view_as(hmask)  # type: ignore[union-attr]
        return torch.sigmoid(logits(self.dense, self.cfg.dim, U, I, H, hmask, batch.user_feats, batch.item_feats,
                                    batch.owner, guard.good_dense) - batch.log_q)

    def predict(self, events: Sequence[dict[str, Any]]) -> list[float]:
        """P(label = 1) for each event's own (user, item) pair, without learning."""
        if not events:
            return []
        return self.score_batch(self.batches.build(events, negatives=False)).tolist()

    def evaluate(self, events: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(labels, probs) for the events and their sampled negatives, without learning."""
        batch = self.batches.build(events)
        return batch.labels.tolist(), self.score_batch(batch).tolist()

    def serving_view(self) -> tuple[DynamicEmbeddingTable, DenseTower]:
        """The item rows and dense tower this shard publishes: its own, or with the sync the merged ones."""
        return (self.served.items, self.served.dense) if self.served is not None else (self.items, self.dense)

    def share_serving(self) -> None:
        """Serve the shards' merged item rows and dense tower from now on (before the first batch learned)."""
        if self.served is None:
            self.served = SharedServing(self.cfg, self.dense, self.device)

    @torch.no_grad()
    def topk(self, user_ids: Iterable[str], k: int) -> dict[str, list[tuple[str, float]]]:
        """Top-k items (by probability) for each user from the published rows of this version."""
        return topk_from_tables(self.queries, *self.serving_view(), list(user_ids), k)

    def score_candidates(self, user_id: str, item_ids: list[str]) -> list[float]:
        """Logits of the published user tower against the given items (unknown items score from zeros)."""
        return score_candidates(self.queries, *self.serving_view(), user_id, item_ids)

    # ------------------------------------------------------------------ learning
    def learn(self, events: Sequence[dict[str, Any]]) -> LearnResult:
        """Score the events with the current version (prequential), then learn from them."""
        events = sorted(events, key=time_order)
        if self.cfg.mode != "online" or len(events) <= 1:
            return self._learn_batch(events)
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
            sum(p.skipped_nonfinite for p in parts), [r for p in parts for r in p.rollbacks])

    def _learn_batch(self, events: Sequence[dict[str, Any]]) -> LearnResult:
        result = LearnResult([], [], [], float("nan"), 0, self.version, 0, [])
        if not events:
            return result
        self.now_ms = max(self.now_ms, max(int(e["event_time_ms"]) for e in events))
        batch = self.batches.build(events)
        probs = self.score_batch(batch)
        result.labels, result.probs, result.positive_index = batch.labels.tolist(), probs.tolist(), batch.positive_index
        self.counters["events"] += len(events)
        self.counters["examples"] += len(batch.labels)
        if self.frozen:
            self._store_item_features(events, batch)
            self._refresh_queries(events)
            return result
        rollback = self._gate(batch, probs)
        if rollback is not None:
            result.rollbacks.append(rollback)
        skipped_before = self.counters["skipped_nonfinite"]
        result.loss = self._accumulate(events, batch)
        if self.grads.ready:
            result.steps += int(self._apply())
        self._refresh_queries(events)
        if not self.grads.batches:
            self._evict(self.now_ms)
        result.skipped_nonfinite = self.counters["skipped_nonfinite"] - skipped_before
        result.version = self.version
        return result

    def _store_item_features(self, events: Sequence[dict[str, Any]], batch: Batch) -> None:
        """Keep each (real, not sampled) event's item features beside the item's row, for ranking."""
        real = [i for i, e in enumerate(events) if not e.get("sampled")]
        self.items.write_extra([events[i]["item_id"] for i in real], batch.item_feats[[batch.positive_index[i] for i in real]])

    def _accumulate(self, events: Sequence[dict[str, Any]], batch: Batch) -> float:
        # Externally sampled negatives ("sampled": true) are not behaviour: they neither count towards
        # admission nor keep rows alive, and they never enter a user's history.
        real = [e for e in events if not e.get("sampled")]
        self.users.observe([e["user_id"] for e in real], self.now_ms)
        self.items.observe([e["item_id"] for e in real], self.now_ms)
        self._store_item_features(events, batch)
        u_rows, i_rows, h_rows = self.batches.gathered(batch)
        U = self.users.gather(u_rows).requires_grad_()
        I = self.items.gather(i_rows).requires_grad_()
        H = self.items.gather(h_rows).requires_grad_()
        hmask = (h_rows >= 0).float()
        z = logits(self.dense, self.cfg.dim, U, I, H, hmask, batch.user_feats, batch.item_feats, batch.owner) - batch.log_q
        losses = nn.functional.binary_cross_entropy_with_logits(z, batch.labels, reduction="none")
        loss = (losses * batch.weights).sum()
        loss.backward()
        assert U.grad is not None and I.grad is not None and H.grad is not None
        self.grads.add({USER: (u_rows, U.grad), ITEM: (torch.cat([i_rows, h_rows.reshape(-1)]),
                                                      torch.cat([I.grad, H.grad.reshape(-1, H.shape[-1])]))},
                       len(batch.labels))
        return float(loss.detach()) / max(1, len(batch.labels))

    def _apply(self) -> bool:
        """One optimizer step from the accumulated gradients; a skipped (non-finite) one is counted."""
        if not self.grads.step():
            self.counters["skipped_nonfinite"] += 1
            return False
        self._dense_dirty = True
        self.version += 1
        self.counters["steps"] += 1
        return True

    def _refresh_queries(self, events: Sequence[dict[str, Any]]) -> None:
        """Recompute the published user tower (q_u, c_u) for the users these events touched."""
        latest = latest_per_user(events)
        if not latest:
            return
        keys, newest, h = list(latest), list(latest.values()), self.cfg.history
        hists = [(list(e.get("history") or []) + [e["item_id"]])[-h:] if h else [] for e in newest]
        uf = self.batches.to_device(feature_matrix([e.get("user_features") or () for e in newest],
                                                   self.cfg.user_features, newest, "user_features"))
        self.queries.observe(keys, self.now_ms)
        h_rows = self.batches.history_rows(hists)
        values = user_query_rows(self.dense, self.cfg.dim, self.users.gather(self.users.rows(keys)),
                                 self.items.gather(h_rows), (h_rows >= 0).float(), uf)
        finite = torch.isfinite(values).all(dim=1)
        if not bool(finite.all()):  # a user with non-finite features keeps its last published tower
            self.counters["nonfinite_user_tower"] += int((~finite).sum())
            keys = [k for k, ok in zip(keys, finite.tolist(), strict=True) if ok]
            values = values[finite]
            if not keys:
                return
        self.queries.write_rows(self.queries.rows(keys), values, {})

    def _evict(self, now_ms: int) -> None:
        for key in self.users.evict_expired(now_ms):
            self.queries.remove(key)
        self.items.evict_expired(now_ms)
        self.queries.evict_expired(now_ms)

    def merged_update(self) -> None:
        """The shards' merged update was written into the shared rows: a new version, declared good (a
        rollback never undoes a merge: the other shards hold it too)."""
        self.version += 1
        self.counters["sync_merges"] += 1
        self.guard.promote(self.version)

    # ------------------------------------------------------------------ stability guard
    def _gate(self, batch: Batch, probs: torch.Tensor) -> RollbackRecord | None:
        if not self.cfg.gate or self.version == self.guard.good_version:
            return None
        verdict = self.guard.judge(batch.labels, probs, self.score_batch(batch, good=True))
        if verdict is None:
            return None
        decision, cand, good = verdict
        if decision == "promote":
            self.promote()
            return None
        return self.rollback(cand, good, "candidate logloss above tolerance" if math.isfinite(cand) else "non-finite loss")

    def promote(self) -> None:
        """Declare the current version good: the undo log starts over from here."""
        self.guard.promote(self.version)
        self.counters["promotions"] += 1

    def rollback(self, cand: float = float("nan"), good: float = float("nan"), reason: str = "manual") -> RollbackRecord:
        """Restore the last good version's rows; the restored state gets a new version number."""
        self._pending.extend(self._collect_deltas())
        rejected = self.version
        self.guard.restore(self.now_ms)
        self._dense_dirty = True
        self.grads.reset()
        self.version += 1
        record = RollbackRecord(self.shard, rejected, self.guard.good_version, self.version, cand, good, reason)
        self.guard.good_version = self.version
        self.counters["rollbacks"] += 1
        self._pending.extend(self._collect_deltas(is_rollback=True))
        return record

    # ------------------------------------------------------------------ deltas
    def _collect_deltas(self, is_rollback: bool = False) -> list[ModelDelta]:
        if self.version == self.published_version and not is_rollback:
            return []
        out = []
        tables = self.tables()
        if self.served is not None:  # live item rows go out through the sync; serving gets the merged ones
            self.items.clear_changes()
            tables[ITEM] = self.served.items
        for name, table in tables.items():
            ids, values, tombs = table.take_changes()
            if ids or tombs:
                out.append(ModelDelta(self.shard, self.version, self.published_version, name, ids, values, tombs, is_rollback))
        dirty = self._dense_dirty if self.served is None else self.served.dense_dirty
        if dirty:
            names, values = dense_rows(self.serving_view()[1])
            out.append(ModelDelta(self.shard, self.version, self.published_version, DENSE, names, values, [], is_rollback))
            self._dense_dirty = False
            if self.served is not None:
                self.served.dense_dirty = False
        self.published_version = self.version
        return out

    def take_deltas(self) -> list[ModelDelta]:
        """Every row changed since the previous call, grouped per table and version."""
        self._pending.extend(self._collect_deltas())
        out, self._pending = self._pending, []
        return out

    def apply_delta(self, delta: ModelDelta) -> None:
        """Write a published delta's rows into this learner (replay after a snapshot restore)."""
        write_delta(self.tables(), self.dense, delta, self.now_ms)
        self.version = self.published_version = max(self.version, delta.model_version)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.accumulating:
            raise RuntimeError("state_dict: gradients are still being accumulated; checkpoint after a step")
        version, internal, gauss = self.rng.getstate()
        return {
            "format": FORMAT_VERSION, "config": self.cfg.to_dict(), "shard": self.shard, "version": self.version,
            "published_version": self.published_version, "now_ms": self.now_ms,
            "tables": {name: t.state_dict() for name, t in self.tables().items()},
            "dense": {k: v.cpu() for k, v in self.dense.state_dict().items()},
            "dense_opt": self.dense_opt.state_dict(), "guard": self.guard.state_dict(),
            "rng": [version, torch.tensor(internal, dtype=torch.int64), gauss],
            "counters": dict(self.counters), "dense_dirty": self._dense_dirty, "sync": self.sync.state_dict(),
            "served": self.served.state_dict() if self.served is not None else {},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {sd.get('format')!r} is not {FORMAT_VERSION}")
        self.shard = int(sd["shard"])
        self.version, self.published_version = int(sd["version"]), int(sd["published_version"])
        self.now_ms = int(sd["now_ms"])
        for name, table in self.tables().items():
            table.load_state_dict(sd["tables"][name])
        self.dense.load_state_dict(sd["dense"])
        self.dense_opt.load_state_dict(sd["dense_opt"])
        self.guard.load_state_dict(sd["guard"], self.device)
        version, internal, gauss = sd["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
        self.counters = Counter(sd["counters"])
        self._dense_dirty = bool(sd["dense_dirty"])
        self.sync.load_state_dict(sd["sync"])
        self.served = None
        if sd.get("served"):
            self.share_serving()
            assert self.served is not None
            self.served.load_state_dict(sd["served"])
        self.grads.reset()

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
        """What serving holds (``ServingModel.published_snapshot``): item and user-query rows, and the
        item side of the dense tower with the bias (the user side is folded into user_query)."""
        snap = self.parameters_snapshot()
        del snap[USER]
        items, dense = self.serving_view()
        snap[ITEM] = {k: items.published_values(k).tolist() for k in sorted(items.index)}
        snap[DENSE] = {k: v.reshape(-1).tolist() for k, v in dense.state_dict().items()
                       if k.startswith("item.") or k == "bias"}
        return snap

    def memory_bytes(self) -> int:
        return sum(t.memory_bytes() for t in self.tables().values())
