"""One shard's end of the sync (``model.sync``): publish its changes, apply the merged epochs that are ready.

``ShardSync.after_batch`` counts a learned batch and publishes once its newest event crossed into a later
epoch; ``catch_up`` applies, before a batch is learned, the complete epochs none of whose changes is
newer than the batch's oldest event. A flush that is done again (a journal replay, a retried bundle,
a restore) finds its publication on the medium and keeps it: what went out first stands, and what it
computed differently goes out with its next publication, so every shard applies the same bytes.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from model.embedding import DynamicEmbeddingTable
from model.sync import (
    Medium,
    ShardChange,
    SyncConfig,
    dense_values,
    file_name,
    merge_changes,
    outgoing,
    parse_publication,
)

if TYPE_CHECKING:
    from model.learner import IncrementalLearner


class SyncRetentionError(RuntimeError):
    """A shard needs publications the retention removed (``SyncConfig.keep_ms``); the message says what to do."""


def _block(table: DynamicEmbeddingTable, rows: torch.Tensor, state: bool) -> torch.Tensor:
    """The shared part of rows: their values, then (``state``) their optimizer state."""
    if not state:
        return table.weights[rows]
    return torch.cat([table.weights[rows]] + [table.state[k][rows] for k in sorted(table.state)], dim=1)


# Merged epochs this worker decoded, by (medium, rule, file names): every shard of a worker applies the same ones.
_MERGED: OrderedDict[tuple[str, str, tuple[str, ...]], tuple[list[ShardChange], ShardChange]] = OrderedDict()


def _summed(parts: list[tuple[list[str], torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """(ids, rows) of row blocks summed by id."""
    ids = sorted({k for part, _ in parts for k in part})
    width = next((b.shape[1] for part, b in parts if part), 0)
    total = torch.zeros(len(ids), width)
    pos = {k: i for i, k in enumerate(ids)}
    for part, block in parts:
        if part:
            total.index_add_(0, torch.tensor([pos[k] for k in part], dtype=torch.long), block)
    return ids, total


class PublicationIndex:
    """What one worker knows of a medium's publications, kept up to date incrementally: a refresh lists the
    medium's names (one listing) and parses only the new ones, so a flush costs O(new + pending epochs),
    not O(every publication of the run) as a full pass over the listing did."""

    def __init__(self, shards: int):
        self.shards = shards
        self.clear()

    def clear(self) -> None:
        shards = self.shards
        self.known: set[str] = set()
        self.by_epoch: dict[int, list[tuple[str, int, int]]] = {}  # epoch -> (name, shard, newest event time)
        self.epochs: list[int] = []  # sorted keys of by_epoch
        self.newest_label = dict.fromkeys(range(shards), -1)
        self.restorable = dict.fromkeys(range(shards), -1)  # the newest restorable epoch each shard announced

    def refresh(self, medium: Medium) -> None:
        names = set(medium.names())
        gone = self.known - names
        if gone and not names:  # a cleared folder: start over
            self.clear()
        else:
            for name in gone:  # removed by the retention (``ShardSync.prune``)
                self.forget(name)
        for name in names - self.known:
            self.known.add(name)
            parsed = parse_publication(name)
            if parsed is None or parsed[1] not in self.newest_label:
                continue
            epoch, shard, max_ms, restorable = parsed
            if epoch not in self.by_epoch:
                self.by_epoch[epoch] = []
                bisect.insort(self.epochs, epoch)
            self.by_epoch[epoch].append((name, shard, max_ms))
            self.newest_label[shard] = max(self.newest_label[shard], epoch)
            self.restorable[shard] = max(self.restorable[shard], restorable)

    def forget(self, name: str) -> None:
        """Drop a removed publication."""
        self.known.discard(name)
        parsed = parse_publication(name)
        if parsed is None:
            return
        epoch, shard, max_ms, _ = parsed
        files = self.by_epoch.get(epoch, [])
        if (name, shard, max_ms) not in files:
            return
        files.remove((name, shard, max_ms))
        if not files:
            del self.by_epoch[epoch]
            self.epochs.remove(epoch)
        if epoch == self.newest_label[shard]:  # (the retention never removes a shard's newest)
            self.newest_label[shard] = max((e for e in self.epochs for _, s, _ in self.by_epoch[e] if s == shard),
                                           default=-1)

    def floor(self, keep_epochs: int) -> int:
        """The oldest epoch whose publications are all kept: the retention (``SyncConfig.keep_epochs``) removes
        only what is older, by that many epochs, than the restorable epoch every shard announced."""
        if not keep_epochs:
            return -(2**62)
        return min(self.restorable.values()) - keep_epochs + 1

    def after(self, epoch: int) -> list[int]:
        """The epochs with publications later than ``epoch``, in order."""
        return self.epochs[bisect.bisect_right(self.epochs, epoch):]


# Each worker's index of each medium (by location and shard count): every shard of the worker shares it.
_INDEX: OrderedDict[tuple[str, int], PublicationIndex] = OrderedDict()


class ShardSync:
    """One shard's end of the sync: ``catch_up`` before it learns a batch, ``after_batch`` after it."""

    def __init__(self, cfg: SyncConfig, medium: Medium, shard: int):
        self.cfg, self.medium, self.shard = cfg, medium, shard
        self.state = "state" in cfg.share  # the item rows' optimizer state too
        self.lag_epochs = 0  # at the last catch_up: own publications not yet merged back

    def _shared_dense(self, name: str) -> bool:
        """Whether the shards learn this dense parameter together (the global bias; the MLPs with "mlps", the
        item-feature MLP alone with "item_mlp")."""
        share = self.cfg.share
        if name == "bias":
            return "bias" in share
        return "mlps" in share or (name.startswith("item.") and "item_mlp" in share)

    # ------------------------------------------------------------------ publishing
    def after_batch(self, learner: IncrementalLearner, events: Sequence[dict[str, Any]]) -> int | None:
        """Count a learned batch's events; publish if its newest event crossed into a later epoch.
        Returns the epoch published, or None."""
        st = learner.sync
        real = [e for e in events if not e.get("sampled")]
        if not real:
            return None
        oldest = min(int(e["event_time_ms"]) for e in real)
        newest = max(int(e["event_time_ms"]) for e in real)
        if st.open_epoch is None:
            st.open_epoch = max(self.cfg.epoch_of(oldest), st.published + 1)
        st.examples += len(real)
        st.item_counts.update(e["item_id"] for e in real)
        st.touched.update(learner.items.dirty)  # every row this flush changed (and merged), before deltas clear it
        st.max_event_time_ms = max(st.max_event_time_ms, newest)
        if self.cfg.epoch_of(newest) <= st.open_epoch:
            return None
        return self._publish(learner)

    def on_time(self, learner: IncrementalLearner, now_ms: int) -> int | None:
        """Event time reached ``now_ms`` with no new event here: publish what is pending once its epoch is over,
        or, with nothing pending, an empty publication that says so (a heartbeat), so that an idle shard does
        not hold back every other shard's merges until its next event. Returns the epoch published, or None."""
        st, now_epoch = learner.sync, self.cfg.epoch_of(now_ms)
        if st.open_epoch is None:
            label = now_epoch - 1
            if label <= st.published:
                return None
            st.open_epoch, st.max_event_time_ms = label, label * self.cfg.interval_ms
        elif now_epoch <= st.open_epoch:
            return None
        return self._publish(learner)

    def _publish(self, learner: IncrementalLearner) -> int:
        st = learner.sync
        change = self._own_change(learner)
        earlier = self._published_before(change.epoch)
        if earlier is not None:  # a replay, a retried bundle or a restore redid this flush: what went out first stands
            self._account_for(learner, change, ShardChange.from_bytes(self.medium.get(earlier)))
        else:
            data = outgoing(change).to_bytes()
            self.medium.put(file_name(change.epoch, self.shard, change.max_event_time_ms, st.restorable), data)
            learner.counters["sync_bytes_out"] += len(data)
            learner.counters["sync_removed"] += self.prune()
        st.published, st.open_epoch = change.epoch, None
        st.examples, st.item_counts, st.max_event_time_ms, st.touched = 0, Counter(), 0, set()
        return change.epoch

    def prune(self) -> int:
        """Remove this shard's publications older than the retention keeps (``PublicationIndex.floor``): no
        shard can need them, even after a restore. Each shard removes only its own. Returns how many."""
        index = self.index(refresh=False)
        floor, old = index.floor(self.cfg.keep_epochs), []
        for epoch in index.epochs:
            if epoch >= floor:
                break
            old += [name for name, shard, _ in index.by_epoch[epoch] if shard == self.shard]
        for name in old:
            with contextlib.suppress(FileNotFoundError, KeyError):  # removed already (a retried bundle)
                self.medium.remove(name)
            index.forget(name)
        return len(old)

    def _kept(self, epoch: int, index: PublicationIndex) -> None:
        """SyncRetentionError unless every publication of ``epoch`` is still on the medium."""
        if epoch < index.floor(self.cfg.keep_epochs):
            raise SyncRetentionError(
                f"sync medium {self.medium.location}: shard {self.shard} needs the publications of sync epoch "
                f"{epoch}, which the retention removed (it keeps {self.cfg.keep_ms / 1000:g} s of event time, "
                f"--sync_keep_s, behind the oldest snapshot a shard could restore): restore from a newer checkpoint, "
                f"or run with a larger --sync_keep_s (0 keeps everything)")

    def _published_before(self, epoch: int) -> str | None:
        index = self.index()
        return next((name for name, shard, _ in index.by_epoch.get(epoch, []) if shard == self.shard), None)

    def index(self, refresh: bool = True) -> PublicationIndex:
        """This worker's index of the medium, refreshed (one listing) unless told otherwise."""
        key = (self.medium.location, self.cfg.shards)
        index = _INDEX.get(key)
        if index is None:
            index = _INDEX[key] = PublicationIndex(self.cfg.shards)
            while len(_INDEX) > 64:
                _INDEX.popitem(last=False)
        if refresh:
            index.refresh(self.medium)
        return index

    def _account_for(self, learner: IncrementalLearner, computed: ShardChange, sent: ShardChange) -> None:
        """The reference moved by ``computed``; the other shards got ``sent``. Move it back by the difference,
        so that what this shard computed but did not send goes out with its next publication."""
        st, table = learner.sync, learner.items
        diff: dict[str, torch.Tensor] = {}
        for ids, block, sign in ((computed.item_ids, computed.item_block, 1.0), (sent.item_ids, sent.item_block, -1.0)):
            for k, row in zip(ids, block, strict=True):
                diff[k] = diff.get(k, torch.zeros_like(row)) + sign * row
        if diff:
            ids = list(diff)
            st.set_reference(ids, st.reference(table, ids, self.state) - torch.stack([diff[k] for k in ids]))
        if st.ref_dense is not None:
            for name in st.ref_dense:
                st.ref_dense[name] = st.ref_dense[name] - computed.dense[name] + sent.dense.get(name, 0.0)

    def _own_change(self, learner: IncrementalLearner) -> ShardChange:
        """This shard's shared rows minus their reference; the reference then moves to them."""
        st, table = learner.sync, learner.items
        ids = sorted(k for k in st.touched if k in table.index)
        live = _block(table, table.rows(ids), self.state).cpu() if ids else torch.zeros(0, 0)
        diff = live - st.reference(table, ids, self.state) if ids else live
        changed = (diff != 0).any(dim=1).tolist() if ids else []
        keep = [i for i, c in enumerate(changed) if c]
        ids_c = [ids[i] for i in keep]
        block = diff[keep] if keep else torch.zeros(0, live.shape[1] if ids else 0)
        if keep:
            st.set_reference(ids_c, live[keep])
        dense_now = dense_values(learner)
        ref = st.ref_dense if st.ref_dense is not None else dense_now
        dense = {k: (v - ref[k]).cpu() for k, v in dense_now.items()}
        st.ref_dense = dense_now
        counts = torch.tensor([max(1, st.item_counts.get(k, 0)) for k in ids_c], dtype=torch.float32)
        rows_c = table.rows(ids_c)
        extra = table.extra[rows_c].cpu() if ids_c else torch.zeros(0, table.extra_width)
        seen = table.last_seen[rows_c.cpu().numpy()].tolist() if ids_c else []
        assert st.open_epoch is not None
        return ShardChange(self.shard, st.open_epoch, st.max_event_time_ms, st.examples, ids_c, counts, block, dense,
                           extra, seen)

    # ------------------------------------------------------------------ applying merged epochs
    def publications(self) -> list[tuple[str, int, int, int]]:
        """(name, epoch, shard, newest event time) of every publication of this run's shards on the medium."""
        index = self.index()
        return [(name, epoch, shard, max_ms) for epoch in index.epochs for name, shard, max_ms in index.by_epoch[epoch]]

    def ready_epochs(self, applied: int, oldest_ms: int) -> list[tuple[int, list[str]]]:
        """Merged epochs after ``applied`` this shard may apply before learning events from ``oldest_ms`` on:
        complete (every shard published there or later) and with no change newer than ``oldest_ms``."""
        index = self.index()
        self._kept(applied + 1, index)
        horizon = min(index.newest_label.values())
        out = []
        for epoch in index.after(applied):
            files = index.by_epoch[epoch]
            if epoch > horizon or any(max_ms > oldest_ms for _, _, max_ms in files):
                break
            out.append((epoch, sorted(name for name, _, _ in files)))
        return out

    def catch_up(self, learner: IncrementalLearner, oldest_ms: int) -> list[int]:
        """Apply every merged epoch that is ready (``ready_epochs``), in order; returns their epochs."""
        learner.share_serving()
        ready = self.ready_epochs(learner.sync.applied, oldest_ms)
        if ready:
            self.apply(learner, [e for e, _ in ready], [names for _, names in ready])
        # the sync lag: this shard's publications the merge has not brought back yet (a stalled shard elsewhere
        # holds every epoch from its last publication on; normally 0 or 1)
        index = self.index(refresh=False)  # as ready_epochs saw it
        self.lag_epochs = sum(1 for e in index.after(learner.sync.applied) for _, s, _ in index.by_epoch[e] if s == self.shard)
        return [e for e, _ in ready]

    def _merged(self, names: list[str]) -> tuple[list[ShardChange], ShardChange]:
        """An epoch's publications and their merge, decoded once per worker (the files never change)."""
        key = (self.medium.location, f"{self.cfg.merge}/{self.cfg.dense_merge}", tuple(names))  # a run's files are named by its medium
        hit = _MERGED.get(key)
        if hit is None:
            changes = [ShardChange.from_bytes(self.medium.get(n)) for n in names]
            hit = _MERGED[key] = (changes, merge_changes(changes, self.cfg.merge, self.cfg.dense_merge))
            while len(_MERGED) > 256:
                _MERGED.popitem(last=False)
        return hit

    def apply(self, learner: IncrementalLearner, epochs: list[int], names: list[list[str]] | None = None) -> None:
        """Add the merged updates of ``epochs`` minus this shard's own changes to its copy and reference, as
        one write (one new version)."""
        if names is None:  # replaying a journal: each epoch's files, as when it was applied
            index = self.index()
            for e in epochs:
                self._kept(e, index)
            names = [sorted(n for n, _, _ in index.by_epoch.get(e, [])) for e in epochs]
        st, table = learner.sync, learner.items
        item_parts: list[tuple[list[str], torch.Tensor]] = []
        served_parts: list[tuple[list[str], torch.Tensor]] = []  # the merged updates alone, for serving
        dense: dict[str, torch.Tensor] = {}  # the correction of the dense parameters the shards learn together
        served_dense: dict[str, torch.Tensor] = {}  # serving: those summed, the MLPs averaged (FedAvg)
        facts: dict[str, tuple[int, torch.Tensor, int]] = {}  # the newest side features per row: (time, block, row)
        for epoch_names in names:
            changes, merged = self._merged(epoch_names)
            own = next((c for c in changes if c.shard == self.shard), None)
            for j, (k, at_ms) in enumerate(zip(merged.item_ids, merged.item_seen_ms, strict=True)):
                held = facts.get(k)
                if held is None or at_ms > held[0]:
                    facts[k] = (at_ms, merged.item_extra, j)
            item_parts.append((merged.item_ids, merged.item_block))
            served_parts.append((merged.item_ids, merged.item_block[:, : table.width]))
            if own is not None:
                item_parts.append((own.item_ids, -own.item_block))
            examples = max(1, sum(c.examples for c in changes))
            for name in sorted({n for c in changes for n in c.dense}):
                zero = torch.zeros_like(merged.dense[name])
                mean = sum((c.dense[name] * (c.examples / examples) for c in changes if name in c.dense), zero)
                if self._shared_dense(name):
                    mine = own.dense.get(name, zero) if own is not None else zero
                    dense[name] = dense.get(name, zero) + merged.dense[name] - mine
                served_dense[name] = served_dense.get(name, zero) + (merged.dense[name] if name == "bias" else mean)
        ids, corr = _summed(item_parts)
        if ids:
            new = {k for k in ids if k not in table.index}
            if new:
                table._allocate_many(sorted(new), learner.now_ms)
            kept = [i for i, k in enumerate(ids) if k in table.index]  # (at capacity, an allocation may evict)
            ids, corr = [ids[i] for i in kept], corr[torch.tensor(kept, dtype=torch.long)]
            rows = table.rows(ids)
            block = _block(table, rows, self.state) + corr.to(table.device)
            width = table.width
            state = {k: block[:, width * (j + 1): width * (j + 2)] for j, k in enumerate(sorted(table.state))} \
                if self.state else {}
            table.write_rows(rows, block[:, :width], state)
            st.set_reference(ids, st.reference(table, ids, self.state) + corr)
            fresher = [(r, facts[k][1][facts[k][2]]) for k, r in zip(ids, rows.tolist(), strict=True)
                       if k in facts and table.extra_width and (k in new or facts[k][0] > table.last_seen[r])]
            if fresher:
                table.extra[torch.tensor([r for r, _ in fresher], device=table.device)] = \
                    torch.stack([v for _, v in fresher]).to(table.device)
        with torch.no_grad():
            for name, param in learner.dense.named_parameters():
                if name in dense:
                    param.add_(dense[name].to(param.device))
        if st.ref_dense is not None:
            st.ref_dense = {k: v + dense[k] if k in dense else v for k, v in st.ref_dense.items()}
        learner.share_serving()
        assert learner.served is not None
        learner.served.add(*_summed(served_parts), {k: block[j] for k, (_, block, j) in facts.items()}, served_dense,
                           learner.now_ms)
        st.applied = epochs[-1]
        learner.merged_update()
