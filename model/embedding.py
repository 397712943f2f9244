"""A collisionless, dynamically sized embedding table with admission and expiry (as in Monolith).

Ids map to rows through a dict, never modulo hashing, so two ids never share a row. An id gets a
row only after it has been seen ``admit_after`` times (counted in a fixed-size count-min sketch, so
the filter's memory does not grow with the id space). Rows idle in event time for longer than
``ttl_ms`` are evicted, and when the table is at ``capacity`` the least recently seen row makes
room. Every eviction is remembered as a tombstone until the next delta is taken.

A row holds ``width`` trainable values (embedding then bias) plus ``extra`` non-trainable values
(side features that serving needs, e.g. an item's popularity), and the optimizer's state beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from model.config import TableConfig
from model.hashing import hash64, stable_hash
from model.optim import RowOptimizer


class CountMinSketch:
    """Bounded-memory occurrence counter (overestimates, never underestimates)."""

    def __init__(self, width: int, depth: int):
        self.width, self.depth = width, depth
        self.table = np.zeros((depth, width), dtype=np.int32)

    def _cols(self, key: str) -> list[int]:
        return [hash64(key, salt) % self.width for salt in range(self.depth)]

    def add(self, key: str) -> int:
        cols = self._cols(key)
        rows = np.arange(self.depth)
        self.table[rows, cols] = np.minimum(self.table[rows, cols] + 1, np.iinfo(np.int32).max)
        return int(self.table[rows, cols].min())


class RowSnapshot(Mapping[str, torch.Tensor]):
    """One row's values and optimizer state as they were: row ``j`` of a block gathered for many rows at
    once, indexed only when read (a dict of per-row views would cost a tensor view per field and row)."""

    __slots__ = ("_block", "_j")

    def __init__(self, block: dict[str, torch.Tensor], j: int):
        self._block, self._j = block, j

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._block[name][self._j]

    def __iter__(self) -> Iterator[str]:
        return iter(self._block)

    def __len__(self) -> int:
        return len(self._block)


class DynamicEmbeddingTable:
    def __init__(
        self,
        name: str,
        cfg: TableConfig,
        optimizer: RowOptimizer,
        extra: int = 0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        initial_rows: int = 1024,
    ):
        self.name, self.cfg, self.optimizer = name, cfg, optimizer
        self.width = cfg.dim + 1
        self.extra_width = extra
        self.device = torch.device(device)
        self.seed = seed
        cap = min(initial_rows, cfg.capacity)
        self.weights = torch.zeros(cap, self.width, device=self.device)
        self.extra = torch.zeros(cap, extra, device=self.device)
        self.state = {k: torch.zeros(cap, self.width, device=self.device) for k in optimizer.state_names}
        self.ids: list[str | None] = [None] * cap
        self.index: dict[str, int] = {}
        self.last_seen = np.zeros(cap, dtype=np.int64)
        self.live = np.zeros(cap, dtype=bool)  # which physical rows hold an id
        self.free: list[int] = list(range(cap - 1, -1, -1))
        self.sketch = CountMinSketch(cfg.sketch_width, cfg.sketch_depth) if cfg.admit_after > 1 else None
        self.dirty: set[str] = set()
        self.tombstones: set[str] = set()
        self.evictions = 0
        # bumped whenever an id gets or loses a row / only when one may lose it (a removal or a load):
        # cached row lookups are stale after the first, and only their unknown ids after admissions alone
        self.layout = 0
        self.removals = 0
        self._oldest_seen: int | None = None  # a lower bound of live rows' last-seen times (evict_expired)
        # callback(table, ids) before those ids' rows change, appear or disappear (the learner's undo log)
        self.on_change: Callable[[DynamicEmbeddingTable, list[str]], None] | None = None

    # ---------------------------------------------------------------- ids and rows
    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def row_of(self, key: str) -> int:
        return self.index.get(key, -1)

    def rows(self, keys: list[str]) -> torch.Tensor:
        return torch.tensor([self.index.get(k, -1) for k in keys], dtype=torch.long, device=self.device)

    def live_rows(self) -> np.ndarray:
        """Physical rows holding an id, ascending (the same after a checkpoint restore)."""
        return np.flatnonzero(self.live)

    def active_rows(self) -> torch.Tensor:
        return torch.from_numpy(self.live_rows()).to(self.device)

    def observe(self, keys: list[str], now_ms: int, admit: bool = True) -> None:
        """Count each occurrence, admit ids that reached ``admit_after`` and refresh last-seen."""
        index, seen = self.index, self.last_seen
        admitted: dict[str, None] = {}
        for key in keys:
            row = index.get(key)
            if row is None:
                if not admit or key in admitted:
                    continue
                if self.sketch is not None and self.sketch.add(key) < self.cfg.admit_after:
                    continue
                admitted[key] = None
            elif seen[row] < now_ms:
                seen[row] = now_ms
        if admitted:
            self._allocate_many(list(admitted), now_ms)

    def _initial_rows(self, keys: list[str]) -> torch.Tensor:
        """Deterministic N(0, init_std) rows per id (the same id always starts the same), bias 0.

        Counter-based (splitmix64 of the id's hash and the column, then Box-Muller), so a batch of new
        ids costs a few vectorised numpy operations, not one generator per id."""
        seeds = np.array([(stable_hash(k) * 1_000_003 + self.seed) & 0x7FFFFFFF for k in keys], dtype=np.uint64)
        cols = np.arange(2 * self.width, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = seeds[:, None] * np.uint64(0x9E3779B97F4A7C15) + (cols[None, :] + np.uint64(1)) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
        u1, u2 = u[:, : self.width], u[:, self.width :]
        normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        rows = torch.from_numpy((normal * self.cfg.init_std).astype(np.float32))
        rows[:, -1] = 0.0  # bias starts at zero
        return rows.to(self.device)

    def _grow(self) -> None:
        old = self.weights.shape[0]
        new = min(old * 2, self.cfg.capacity)
        if new <= old:
            return
        pad = new - old
        self.weights = torch.cat([self.weights, torch.zeros(pad, self.width, device=self.device)])
        self.extra = torch.cat([self.extra, torch.zeros(pad, self.extra_width, device=self.device)])
        self.state = {k: torch.cat([v, torch.zeros(pad, self.width, device=self.device)]) for k, v in self.state.items()}
        self.ids.extend([None] * pad)
        self.last_seen = np.concatenate([self.last_seen, np.zeros(pad, dtype=np.int64)])
        self.live = np.concatenate([self.live, np.zeros(pad, dtype=bool)])
        self.free.extend(range(new - 1, old - 1, -1))

    def _allocate(self, key: str, now_ms: int) -> int:
        return self._allocate_many([key], now_ms)[0]

    def _allocate_many(self, keys: list[str], now_ms: int) -> list[int]:
        """Rows for new (distinct, absent) ids; at capacity the least recently seen rows make room. With
        more new ids than ``capacity`` only the last ``capacity`` get rows (one at a time, the earlier
        ones would have been evicted by the later ones within the same step)."""
        keys = keys[-self.cfg.capacity:]
        while len(self.free) < len(keys) and self.weights.shape[0] < self.cfg.capacity:
            self._grow()
        short = len(keys) - len(self.free)
        if short > 0:
            live = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
            victims = live[np.argsort(self.last_seen[live], kind="stable")[:short]]
            for r in victims.tolist():
                self.remove(self.ids[r])  # type: ignore[arg-type]
        if self.on_change is not None:
            self.on_change(self, keys)
        rows = [self.free.pop() for _ in keys]
        self.layout += 1
        for key, row in zip(keys, rows, strict=True):
            self.index[key] = row
            self.ids[row] = key
            self.tombstones.discard(key)
        self.dirty.update(keys)
        self.last_seen[rows] = now_ms
        self.live[rows] = True
        init = self._initial_rows(keys)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.weights[idx] = init
        self.extra[idx] = 0.0
        for name, value in self.optimizer.init_state(init).items():
            self.state[name][idx] = value
        return rows

    def remove(self, key: str) -> None:
        row = self.index.get(key)
        if row is None:
            return
        if self.on_change is not None:
            self.on_change(self, [key])
        del self.index[key]
        self.ids[row] = None
        self.weights[row] = 0.0
        self.extra[row] = 0.0
        for v in self.state.values():
            v[row] = 0.0
        self.last_seen[row] = 0
        self.live[row] = False
        self.free.append(row)
        self.dirty.discard(key)
        self.tombstones.add(key)
        self.evictions += 1
        self.layout += 1
        self.removals += 1

    def evict_expired(self, now_ms: int) -> list[str]:
        """Evict rows idle for longer than ``ttl_ms`` of event time; returns their ids."""
        if self.cfg.ttl_ms is None or not self.index:
            return []
        cutoff = now_ms - self.cfg.ttl_ms
        # last-seen times only grow and new rows start at "now", so nothing can expire before the oldest
        # last-seen time found by the previous scan: skip the scan until then
        if self._oldest_seen is not None and cutoff <= self._oldest_seen:
            return []
        keys = list(self.index)
        seen = self.last_seen[np.fromiter(self.index.values(), dtype=np.int64, count=len(keys))]
        stale = seen < cutoff
        expired = [keys[i] for i in np.flatnonzero(stale).tolist()]
        for key in expired:
            self.remove(key)
        self._oldest_seen = int(seen[~stale].min()) if len(expired) < len(keys) else None
        return expired

    # ---------------------------------------------------------------- values
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows' trainable values; row index -1 (unknown id) gives zeros."""
        valid = (rows >= 0).unsqueeze(-1).to(self.weights.dtype)
        # index_select on the flat indices: about twice as fast as advanced indexing for 2-d ``rows``
        flat = self.weights.index_select(0, rows.clamp(min=0).reshape(-1))
        return flat.view(*rows.shape, self.width) * valid

    def gather_extra(self, rows: torch.Tensor) -> torch.Tensor:
        valid = (rows >= 0).unsqueeze(-1).to(self.extra.dtype)
        return self.extra[rows.clamp(min=0)] * valid

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        keys: list[str] = [self.ids[r] for r in rows.tolist()]  # type: ignore[misc]
        if self.on_change is not None:
            self.on_change(self, keys)
        self.weights[rows] = values
        for name, value in state.items():
            self.state[name][rows] = value
        self.dirty.update(keys)

    def write_extra(self, keys: list[str], values: torch.Tensor) -> None:
        """Store side features (the last value per id wins); non-finite ones are never written (the row
        keeps its last finite values)."""
        if not self.extra_width or not keys:
            return
        finite = torch.isfinite(values).all(dim=1).tolist()
        last: dict[str, int] = {}
        for i, (key, ok) in enumerate(zip(keys, finite, strict=True)):
            if ok and key in self.index:
                last[key] = i
        if not last:
            return
        kept = list(last)
        if self.on_change is not None:
            self.on_change(self, kept)
        rows = torch.tensor([self.index[k] for k in kept], dtype=torch.long, device=self.device)
        self.extra[rows] = values[list(last.values())]
        self.dirty.update(kept)

    def snapshot_rows(self, keys: list[str]) -> list[Mapping[str, torch.Tensor] | None]:
        """Each id's values, side features and optimizer state as they are now (None for ids without a
        row), gathered with one index per tensor."""
        present = [(i, self.index[k]) for i, k in enumerate(keys) if k in self.index]
        out: list[Mapping[str, torch.Tensor] | None] = [None] * len(keys)
        if not present:
            return out
        idx = torch.tensor([r for _, r in present], dtype=torch.long, device=self.device)
        block = {"weights": self.weights[idx], "extra": self.extra[idx]}
        block.update({f"state.{k}": v[idx] for k, v in self.state.items()})
        for j, (i, _) in enumerate(present):
            out[i] = RowSnapshot(block, j)
        return out

    def restore_row(self, key: str, snap: Mapping[str, torch.Tensor] | None, now_ms: int) -> None:
        if snap is None:
            self.remove(key)
            return
        row = self.index.get(key)
        if row is None:
            row = self._allocate(key, now_ms)
        self.weights[row] = snap["weights"]
        self.extra[row] = snap["extra"]
        for k in self.state:
            self.state[k][row] = snap[f"state.{k}"]
        self.dirty.add(key)

    def set_values(self, key: str, values: torch.Tensor, now_ms: int) -> None:
        """Write a row's published values (trainable then extra), admitting the id if needed."""
        row = self.index.get(key)
        if row is None:
            row = self._allocate(key, now_ms)
        self.weights[row] = values[: self.width]
        self.extra[row] = values[self.width:]
        self.dirty.add(key)

    def published_values(self, key: str) -> torch.Tensor:
        row = self.index[key]
        return torch.cat([self.weights[row], self.extra[row]])

    def clear_changes(self) -> None:
        """Forget which rows changed or were evicted (their values were written from elsewhere, or go out another way)."""
        self.dirty.clear()
        self.tombstones.clear()

    def take_changes(self) -> tuple[list[str], torch.Tensor, list[str]]:
        """(ids, published values, tombstones) changed since the last call."""
        ids = sorted(k for k in self.dirty if k in self.index)
        if ids:
            rows = self.rows(ids)
            values = torch.cat([self.weights[rows], self.extra[rows]], dim=1).detach().cpu()
        else:
            values = torch.zeros(0, self.width + self.extra_width)
        tombs = sorted(self.tombstones)
        self.clear_changes()
        return ids, values, tombs

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.index)
        rows = self.rows(keys)
        out: dict[str, Any] = {
            "ids": json.dumps(keys),  # one string, not one pickled object per id
            "rows": rows.cpu().clone(),
            "capacity": int(self.weights.shape[0]),
            "free": torch.tensor(self.free, dtype=torch.long),
            "weights": self.weights[rows].cpu().clone(),
            "extra": self.extra[rows].cpu().clone(),
            "last_seen": torch.from_numpy(self.last_seen[rows.cpu().numpy()].copy()),
            "evictions": self.evictions,
            "dirty": json.dumps(sorted(self.dirty)),
            "tombstones": json.dumps(sorted(self.tombstones)),
        }
        for k, v in self.state.items():
            out[f"state.{k}"] = v[rows].cpu().clone()
        if self.sketch is not None:
            out["sketch"] = torch.from_numpy(self.sketch.table.copy())
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the exact physical layout (rows, free list), so sampling and allocation replay identically."""
        keys: list[str] = _id_list(sd["ids"])
        rows = sd["rows"].to(torch.long)
        cap = int(sd["capacity"])
        self.weights = torch.zeros(cap, self.width, device=self.device)
        self.extra = torch.zeros(cap, self.extra_width, device=self.device)
        self.state = {k: torch.zeros(cap, self.width, device=self.device) for k in self.optimizer.state_names}
        self.ids = [None] * cap
        self.last_seen = np.zeros(cap, dtype=np.int64)
        self.live = np.zeros(cap, dtype=bool)
        if keys:
            dev_rows = rows.to(self.device)
            self.weights[dev_rows] = sd["weights"].to(self.device)
            self.extra[dev_rows] = sd["extra"].to(self.device)
            for k in self.state:
                self.state[k][dev_rows] = sd[f"state.{k}"].to(self.device)
            self.last_seen[rows.numpy()] = sd["last_seen"].numpy()
            self.live[rows.numpy()] = True
        for key, row in zip(keys, rows.tolist(), strict=False):
            self.ids[row] = key
        self.index = {k: r for k, r in zip(keys, rows.tolist(), strict=False)}
        free = sd["free"]
        self.free = free.tolist() if isinstance(free, torch.Tensor) else [int(r) for r in free]
        self.evictions = int(sd["evictions"])
        self.dirty = set(_id_list(sd["dirty"]))
        self.tombstones = set(_id_list(sd["tombstones"]))
        self._oldest_seen = None
        self.layout += 1
        self.removals += 1
        if self.sketch is not None and "sketch" in sd:
            self.sketch.table = sd["sketch"].numpy().copy()

    def memory_bytes(self) -> int:
        tensors = [self.weights, self.extra, *self.state.values()]
        total = sum(t.numel() * t.element_size() for t in tensors) + self.last_seen.nbytes
        if self.sketch is not None:
            total += self.sketch.table.nbytes
        return total


def _id_list(value: Any) -> list[str]:
    """Ids as saved: a JSON array of strings in one string."""
    ids = json.loads(value) if isinstance(value, str) else None
    if not isinstance(ids, list) or not all(isinstance(k, str) for k in ids):
        raise ValueError("checkpoint: a table's ids must be a JSON array of strings")
    return ids
