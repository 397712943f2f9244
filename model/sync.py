"""Shared parameters across shards: what leaves a shard, how the shards' changes merge, how a merge lands.

A shard's user rows are its own. What every shard reads is shared: the values of the item rows, the
items' side features, the global bias and the item-feature MLP. Each shard trains its copy on its own
users' events and publishes what it changed since its last publication (``ShardChange``: only the rows
that moved, with the events behind each) to a ``Medium`` every worker reaches, once its events pass into a later sync
epoch (``event_time_ms // interval_ms``). A publication carries the epoch in which it began and the
newest event time behind it. Epoch ``e`` is complete once every shard has published at ``e`` or later
(a shard only publishes at rising epochs), and its merged update is then the same on every shard:
``merge_changes`` of the publications labelled ``e``. A shard that gets no events still publishes once
event time leaves its epoch (``ShardSync.on_time``: what it has pending, or an empty publication saying
it has nothing), told how far event time got by the pipeline's ticks (``transforms.batching.RebatchByKey``);
otherwise one quiet shard would hold back every merge until its next event (on MovieLens at 16 shards,
where a shard's users rate in bursts days apart, these publications raised Recall@10 from 1.04x to 1.23x
of one shard's in ``bench/sync_variants.py --heartbeat``).

A shard applies complete epochs in order before it learns a batch, and only those whose newest event
time is not after the batch's oldest one: it never learns from another shard's future. It adds
``merged - own`` to its copy (its own change is in it already), so every copy equals the initial rows
plus every merged epoch it applied plus its own changes not yet merged.

The medium stays bounded (``SyncConfig.keep_ms``, ``--sync_keep_s``): a publication's name also says which
applied epoch its shard could be restored to (its next-to-last snapshot, ``SyncState.restorable``), and each
shard removes its own publications older, by the retention, than the oldest of those
(``ShardSync.prune``). A restore further back stops with ``SyncRetentionError``, never a silent skip.

What is shared, by measurement (``bench/sync_variants.py``, ``bench/sharding.py``, docs/benchmarks.md): the
item rows, the global bias and the item-feature MLP (``item_mlp``: on Globo news, whose items come and go,
it lifted 4 shards' Recall@10 from 0.94x to 1.05x of one shard's). What stays with its shard: the items'
row-wise optimizer state and the user-feature MLP (sharing both MLPs, ``mlps``, or the state lowered
Recall@10, and with the state AUC); serving gets the FedAvg mean of the shards' MLPs
(``model.serving.SharedServing``); ``SyncConfig.share`` (``--sync_share``) chooses.

The merge rule is a **sum** of the shards' changes by default: the shards saw disjoint users, so the
sum is what one model would have learned from all of them at these parameters (data-parallel SGD);
FedAvg's example-weighted **mean** (``--sync_merge mean``) divides a row's step by the number of shards
that touched it, and measured alike. ``outgoing`` is the one place a change leaves its shard: clipping
and noise (differential privacy) go there.

>>> from model.config import LearnerConfig, TableConfig
>>> from model.learner import IncrementalLearner
>>> cfg = LearnerConfig(user_features=0, item_features=0, user_table=TableConfig(dim=4),
...                     item_table=TableConfig(dim=4), negatives=1, device="cpu", gate=False)
>>> from model.shard_sync import ShardSync
>>> medium, sync = MemoryMedium(), SyncConfig(shards=2, interval_ms=1_000)
>>> a, b = IncrementalLearner(cfg, 0), IncrementalLearner(cfg, 1)
>>> def events(user, t0):
...     return [{"event_id": f"{user}{t}", "user_id": user, "item_id": f"i{t % 3}", "event_type": "click",
...              "event_time_ms": t} for t in range(t0, t0 + 1_200, 100)]
>>> for learner, user in ((a, "u0"), (b, "u1")):  # each learns its user's batch, which crosses into epoch 1
...     _ = learner.learn(events(user, 0))
...     print(ShardSync(sync, medium, learner.shard).after_batch(learner, events(user, 0)))  # publishes epoch 0
0
0
>>> def gap(item):
...     return float((a.items.published_values(item) - b.items.published_values(item)).abs().max())
>>> gap("i1") > 1e-4  # each shard learned alone
True
>>> ShardSync(sync, medium, 0).catch_up(a, 2_000), ShardSync(sync, medium, 1).catch_up(b, 2_000)
([0], [0])
>>> gap("i1") < 1e-6  # both applied the same merged update
True
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from model.embedding import DynamicEmbeddingTable

if TYPE_CHECKING:
    from model.learner import IncrementalLearner

MERGE_RULES = ("sum", "mean")
# What the shards can share: item row values (and side features), the items' row-wise optimizer state, the
# global bias, the MLPs over user and item features. Serving always gets the FedAvg mean of the MLPs.
SHARABLE = ("items", "state", "bias", "mlps", "item_mlp")
SHARED_BY_DEFAULT = ("items", "bias", "item_mlp")
_FORMAT = "freshrec-sync-1"
_NAME = re.compile(r"^e(\d{12})-s(\d{4})-t(-?\d+)(?:-a(-?\d+))?\.sync$")


@dataclass(frozen=True)
class SyncConfig:
    """How the shards of one run share their parameters."""

    shards: int
    interval_ms: int = 60_000
    merge: str = "sum"
    share: tuple[str, ...] = SHARED_BY_DEFAULT
    dense_merge: str = "sum"  # the rule for the dense parameters (the global bias, the MLPs)
    keep_ms: int = 3_600_000  # event time of publications kept behind what every shard could restore to (0: all)

    def __post_init__(self) -> None:
        if "items" not in self.share or set(self.share) - set(SHARABLE):
            raise ValueError(f"SyncConfig.share must hold 'items' and only {SHARABLE}, got {self.share}")
        if self.shards < 1:
            raise ValueError(f"SyncConfig.shards must be >= 1, got {self.shards}")
        if self.interval_ms < 1:
            raise ValueError(f"SyncConfig.interval_ms must be >= 1, got {self.interval_ms}")
        if self.keep_ms < 0:
            raise ValueError(f"SyncConfig.keep_ms must be >= 0, got {self.keep_ms}")
        for name in ("merge", "dense_merge"):
            if getattr(self, name) not in MERGE_RULES:
                raise ValueError(f"SyncConfig.{name} must be one of {MERGE_RULES}, got {getattr(self, name)!r}")

    def epoch_of(self, event_time_ms: int) -> int:
        return int(event_time_ms) // self.interval_ms

    def end_of_epoch(self, event_time_ms: int) -> int:
        """When event time leaves the epoch of ``event_time_ms``: where a tick publishes it."""
        return (self.epoch_of(event_time_ms) + 1) * self.interval_ms

    @property
    def keep_epochs(self) -> int:
        """Epochs of publications kept behind the oldest one a shard could need after a restore (0: all)."""
        return -(-self.keep_ms // self.interval_ms) if self.keep_ms else 0


class Medium(Protocol):
    """Where the shards' publications meet: a folder every worker reaches (written atomically)."""

    location: str

    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> bytes: ...
    def names(self) -> list[str]: ...
    def remove(self, name: str) -> None: ...


_MEMORY_IDS = itertools.count()


class MemoryMedium:
    """A medium in this process's memory: for doctests and unit tests only (a runner's workers do not share it)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.location = f"memory:{next(_MEMORY_IDS)}"  # its own name: merges are cached by medium

    def put(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def get(self, name: str) -> bytes:
        return self.files[name]

    def names(self) -> list[str]:
        return list(self.files)

    def remove(self, name: str) -> None:
        del self.files[name]


def file_name(epoch: int, shard: int, max_event_time_ms: int, restorable: int = -1) -> str:
    """A publication's name: its epoch, shard and newest event time, and the oldest applied epoch its shard
    could go back to after a restore (``SyncState.restorable``), which tells the others what they may remove."""
    return f"e{epoch:012d}-s{shard:04d}-t{max_event_time_ms}-a{restorable}.sync"


_PARSED: dict[str, tuple[int, int, int, int] | None] = {}


def parse_publication(name: str) -> tuple[int, int, int, int] | None:
    """(epoch, shard, newest event time, restorable epoch) of a publication's file name (a name without the
    last: -1); None for any other file."""
    parsed = _PARSED.get(name)
    if parsed is None and name not in _PARSED:
        m = _NAME.match(name.rsplit("/", 1)[-1])
        parsed = _PARSED[name] = (int(m.group(1)), int(m.group(2)), int(m.group(3)),
                                  int(m.group(4)) if m.group(4) is not None else -1) if m else None
        if len(_PARSED) > 1_000_000:
            _PARSED.clear()
    return parsed


def parse_name(name: str) -> tuple[int, int, int] | None:
    """(epoch, shard, newest event time) of a publication's file name; None for any other file."""
    parsed = parse_publication(name)
    return None if parsed is None else parsed[:3]


@dataclass
class ShardChange:
    """What one shard changed in the shared parameters during one sync epoch (or a merge of several)."""

    shard: int  # -1 for a merge
    epoch: int
    max_event_time_ms: int
    examples: int  # events behind the dense change
    item_ids: list[str] = field(default_factory=list)
    item_examples: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # events per row (>= 1)
    item_block: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # changes of the rows' values
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # changes of the dense parameters, by name
    item_extra: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # side features (not summed)
    item_seen_ms: list[int] = field(default_factory=list)  # when each row's side features were last written

    def to_bytes(self) -> bytes:
        """A JSON header line (fields, tensor names and shapes) and the tensors' float32 bytes: plain data,
        nothing to unpickle."""
        tensors = {"item_examples": self.item_examples, "item_block": self.item_block, "item_extra": self.item_extra,
                   **{f"dense.{k}": v for k, v in self.dense.items()}}
        arrays = {k: v.detach().to(torch.float32).cpu().contiguous().numpy() for k, v in tensors.items()}
        header = {"format": _FORMAT, "shard": self.shard, "epoch": self.epoch, "max_event_time_ms": self.max_event_time_ms,
                  "examples": self.examples, "item_ids": self.item_ids, "item_seen_ms": [int(t) for t in self.item_seen_ms],
                  "tensors": [[k, list(a.shape)] for k, a in arrays.items()]}
        return json.dumps(header).encode() + b"\n" + b"".join(a.tobytes() for a in arrays.values())

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardChange:
        """ValueError on bytes that are not a publication of this format."""
        head, _, body = data.partition(b"\n")
        try:
            h = json.loads(head)
            if h.get("format") != _FORMAT:
                raise ValueError(f"format {h.get('format')!r}, expected {_FORMAT!r}")
            tensors, at = {}, 0
            for name, shape in h["tensors"]:
                n = int(np.prod(shape)) if shape else 1
                tensors[name] = torch.from_numpy(np.frombuffer(body, np.float32, n, at).reshape(shape).copy())
                at += 4 * n
            if at != len(body):
                raise ValueError(f"{len(body) - at} bytes after the tensors")
            return cls(int(h["shard"]), int(h["epoch"]), int(h["max_event_time_ms"]), int(h["examples"]),
                       [str(k) for k in h["item_ids"]], tensors["item_examples"], tensors["item_block"],
                       {k[6:]: v for k, v in tensors.items() if k.startswith("dense.")},
                       tensors["item_extra"], [int(t) for t in h["item_seen_ms"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a sync publication: {exc}") from exc


def outgoing(change: ShardChange) -> ShardChange:
    """The change as it leaves its shard. Identity today; clipping and noise (differential privacy) go here."""
    return change


def merge_changes(changes: Sequence[ShardChange], rule: str = "sum", dense_rule: str | None = None) -> ShardChange:
    """One update from the shards' changes of an epoch: per row and parameter, the ``sum`` of the changes
    or their ``mean`` weighted by the examples behind each (FedAvg); the dense parameters by ``dense_rule``
    (default: ``rule``). The same inputs give the same update."""
    dense_rule = dense_rule or rule
    changes = sorted(changes, key=lambda c: c.shard)
    ids = sorted({k for c in changes for k in c.item_ids})
    pos = {k: i for i, k in enumerate(ids)}
    width = next((c.item_block.shape[1] for c in changes if c.item_block.numel()), 0)
    block, weight, counts = torch.zeros(len(ids), width), torch.zeros(len(ids)), torch.zeros(len(ids))
    extra_width = next((c.item_extra.shape[1] for c in changes if c.item_seen_ms), 0)
    extra, seen = torch.zeros(len(ids), extra_width), [-(2**62)] * len(ids)
    dense: dict[str, torch.Tensor] = {}
    examples = sum(c.examples for c in changes)
    for c in changes:
        if c.item_ids:
            idx = torch.tensor([pos[k] for k in c.item_ids], dtype=torch.long)
            w = c.item_examples.float() if rule == "mean" else torch.ones(len(c.item_ids))
            block.index_add_(0, idx, c.item_block * w.unsqueeze(1))
            weight.index_add_(0, idx, w)
            counts.index_add_(0, idx, c.item_examples.float())
            # side features are facts, not steps: the newest per row wins
            for j, (k, at_ms) in enumerate(zip(c.item_ids, c.item_seen_ms, strict=False)):
                if at_ms > seen[pos[k]]:
                    seen[pos[k]] = at_ms
                    extra[pos[k]] = c.item_extra[j]
        scale = (c.examples / max(1, examples)) if dense_rule == "mean" else 1.0
        for name, t in c.dense.items():
            dense[name] = dense.get(name, torch.zeros_like(t)) + t * scale
    if rule == "mean" and ids:
        block = block / weight.clamp(min=1e-12).unsqueeze(1)
    return ShardChange(-1, max((c.epoch for c in changes), default=-1),
                       max((c.max_event_time_ms for c in changes), default=0), examples, ids, counts, block, dense,
                       extra, seen)


# ---------------------------------------------------------------------- a shard's side
def initial_block(table: DynamicEmbeddingTable, ids: list[str], state: bool = False) -> torch.Tensor:
    """Deterministic starting values of ``ids``' rows (then, with ``state``, their optimizer state): the same
    on every shard."""
    init = table._initial_rows(ids)
    if not state:
        return init
    opt = table.optimizer.init_state(init)
    return torch.cat([init] + [opt[k] for k in sorted(table.state)], dim=1)


def dense_values(learner: IncrementalLearner) -> dict[str, torch.Tensor]:
    """Copies of the dense tower's parameters, by name."""
    return {name: p.detach().clone() for name, p in learner.dense.named_parameters()}


class SyncState:
    """A shard's sync position and its reference copy (what the other shards know of its shared rows:
    the initial rows, the merged epochs applied and its own publications), kept in its checkpoints."""

    def __init__(self) -> None:
        self.open_epoch: int | None = None  # the epoch of the oldest change not yet published
        self.published: int = -1  # newest epoch this shard published
        self.applied: int = -1  # newest merged epoch applied
        self.max_event_time_ms = 0
        self.examples = 0
        self.item_counts: Counter[str] = Counter()
        self.touched: set[str] = set()  # item ids changed since the last publication (all that can differ)
        self.ref_ids: dict[str, int] = {}
        self.ref_block = torch.zeros(0, 0)
        self.ref_dense: dict[str, torch.Tensor] | None = None
        self.snapshots = (-1, -1)  # the applied epoch at the shard's last two snapshots in keyed state

    @property
    def restorable(self) -> int:
        """The oldest applied epoch a restore of this shard could go back to: its next-to-last snapshot's (a
        runner restores the state of its last checkpoint, which may not hold the newest snapshot yet)."""
        return self.snapshots[0]

    def note_snapshot(self) -> None:
        """The shard's state is about to be snapshotted at its current position."""
        self.snapshots = (self.snapshots[1], self.applied)

    def restart(self) -> None:
        """A resumed shard in a new run (a new medium): its positions start over; its reference and the
        changes it has not yet published are kept, so they go out with its first publication."""
        self.open_epoch, self.published, self.applied, self.snapshots = None, -1, -1, (-1, -1)

    def state_dict(self) -> dict[str, Any]:
        return {"open_epoch": -1 if self.open_epoch is None else self.open_epoch, "published": self.published,
                "applied": self.applied, "max_event_time_ms": self.max_event_time_ms, "examples": self.examples,
                "item_counts": json.dumps(sorted(self.item_counts.items())), "ref_ids": json.dumps(list(self.ref_ids)),
                "touched": json.dumps(sorted(self.touched)), "snapshots": json.dumps(list(self.snapshots)),
                "ref_block": self.ref_block.cpu(), "ref_dense": {} if self.ref_dense is None else dict(self.ref_dense)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.open_epoch = None if int(sd["open_epoch"]) < 0 else int(sd["open_epoch"])
        self.published, self.applied = int(sd["published"]), int(sd["applied"])
        self.max_event_time_ms, self.examples = int(sd["max_event_time_ms"]), int(sd["examples"])
        self.item_counts = Counter(dict(json.loads(sd["item_counts"])))
        self.touched = set(json.loads(sd["touched"]))
        first, last = json.loads(sd.get("snapshots", "[-1, -1]"))  # (a checkpoint from before they were kept: none)
        self.snapshots = (int(first), int(last))
        self.ref_ids = {k: i for i, k in enumerate(json.loads(sd["ref_ids"]))}
        self.ref_block = sd["ref_block"]
        self.ref_dense = dict(sd["ref_dense"]) or None

    def reference(self, table: DynamicEmbeddingTable, ids: list[str], state: bool = False) -> torch.Tensor:
        """The reference rows of ``ids`` (an id never synced: its deterministic initial row)."""
        at = [self.ref_ids.get(k, -1) for k in ids]
        unknown = [i for i, r in enumerate(at) if r < 0]
        if len(unknown) == len(ids):
            return initial_block(table, ids, state).cpu() if ids else torch.zeros(0, self.ref_block.shape[1])
        out = self.ref_block[torch.tensor([max(r, 0) for r in at], dtype=torch.long)]
        if unknown:
            out[torch.tensor(unknown, dtype=torch.long)] = initial_block(table, [ids[i] for i in unknown], state).cpu()
        return out

    def set_reference(self, ids: list[str], block: torch.Tensor) -> None:
        new = [k for k in ids if k not in self.ref_ids]
        if new:
            start = len(self.ref_ids)
            self.ref_ids.update({k: start + j for j, k in enumerate(new)})
            pad = torch.zeros(len(new), block.shape[1])
            self.ref_block = pad if self.ref_block.numel() == 0 else torch.cat([self.ref_block, pad])
        self.ref_block[torch.tensor([self.ref_ids[k] for k in ids], dtype=torch.long)] = block
