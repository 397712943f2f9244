"""Shards share their global parameters (``model.sync``): merges, no leakage from the future, restarts,
convergence of the shards' copies under TestStream, and a bad medium failing fast."""

from __future__ import annotations

import os
from dataclasses import replace

import apache_beam as beam
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from core.cleaning import CleanConfig
from core.medium import FolderMedium, MediumError, check_medium
from core.settings import PipelineConfig, ShardingConfig, UpdateConfig
from model.config import LearnerConfig, TableConfig
from model.hashing import shard_of
from model.journal import flush_micro_batch, new_meta, restore_learner, sync_on_time
from model.learner import IncrementalLearner
from model.shard_sync import ShardSync, SyncRetentionError
from model.sync import MemoryMedium, ShardChange, SyncConfig, merge_changes, parse_name
from pipelines import cli
from pipelines.freshrec_pipeline import RefreshModels
from tests.helpers import FEATURES, Collected, CollectTo, cfg, fixed_clock, topic_stream
from tests.test_pipeline_streaming import at, wire
from transforms.medium import FileSystemsMedium
from transforms.update import DELTAS


def change(shard: int, ids: list[str], rows: list[list[float]], examples: list[int], dense: float = 0.0) -> ShardChange:
    return ShardChange(shard, 3, 1_000, sum(examples), ids, torch.tensor(examples, dtype=torch.float32),
                       torch.tensor(rows), {"bias": torch.tensor([dense])})


def test_merge_sums_or_averages_by_examples():
    a = change(0, ["x", "y"], [[1.0, 1.0], [2.0, 0.0]], [1, 1], dense=1.0)
    b = change(1, ["x"], [[3.0, -1.0]], [3], dense=3.0)
    total = merge_changes([b, a], "sum")
    assert total.item_ids == ["x", "y"]
    assert torch.allclose(total.item_block, torch.tensor([[4.0, 0.0], [2.0, 0.0]]))
    assert float(total.dense["bias"]) == 4.0
    mean = merge_changes([a, b], "mean")
    assert torch.allclose(mean.item_block, torch.tensor([[2.5, -0.5], [2.0, 0.0]]))  # x: (1*1 + 3*3)/4; y: its only shard
    assert float(mean.dense["bias"]) == pytest.approx((1 * 2 + 3 * 3) / 5)  # weighted by events behind each
    assert ShardChange.from_bytes(a.to_bytes()).item_ids == ["x", "y"]
    rows_summed = merge_changes([a, b], "sum", "mean")  # rows by one rule, the dense parameters by the other
    assert torch.allclose(rows_summed.item_block, total.item_block)
    assert float(rows_summed.dense["bias"]) == pytest.approx(float(mean.dense["bias"]))


def two_shards(interval_ms: int = 10_000):
    learner_cfg = cfg(negatives=1)
    medium, sync = MemoryMedium(), SyncConfig(shards=2, interval_ms=interval_ms)
    return learner_cfg, medium, [ShardSync(sync, medium, s) for s in range(2)]


def batch(stream, start_ms: int, users: list[str], n: int = 8):
    events = [dict(e) for e in stream[:n]]
    for j, e in enumerate(events):
        e.update(user_id=users[j % len(users)], event_time_ms=start_ms + 100 * j, event_id=f"{users[0]}-{start_ms}-{j}")
    return events


def test_a_merge_never_applies_a_change_from_the_future():
    learner_cfg, medium, (s0, s1) = two_shards()
    stream = topic_stream(8)
    a, b = IncrementalLearner(learner_cfg, 0), IncrementalLearner(learner_cfg, 1)
    for learner, sync, user in ((a, s0, "ua"), (b, s1, "ub")):
        events = batch(stream, 0, [user]) + batch(stream, 25_000, [user])  # crosses epochs 0 -> 2
        learner.learn(events)
        assert sync.after_batch(learner, events) == 0
    newest = max(parse_name(n)[2] for n in medium.names())
    assert newest == 25_700
    assert s0.catch_up(a, newest - 1) == [], "applied a change newer than the batch it precedes"
    assert a.sync.applied == -1 and a.counters["sync_merges"] == 0
    assert s0.catch_up(a, newest) == [0]
    assert s0.catch_up(a, newest + 10_000) == [], "applied an epoch twice"


def test_an_epoch_waits_until_every_shard_published_past_it():
    learner_cfg, medium, (s0, s1) = two_shards()
    stream = topic_stream(8)
    a = IncrementalLearner(learner_cfg, 0)
    events = batch(stream, 0, ["ua"]) + batch(stream, 25_000, ["ua"])
    a.learn(events)
    s0.after_batch(a, events)
    assert s0.catch_up(a, 10**9) == [], "merged without shard 1's change: it may still publish epoch 0"


def test_an_idle_shard_says_so_and_the_epoch_completes_without_waiting_for_its_next_event():
    learner_cfg, medium, (s0, s1) = two_shards()
    stream = topic_stream(8)
    a, b = IncrementalLearner(learner_cfg, 0), IncrementalLearner(learner_cfg, 1)
    early = batch(stream, 0, ["ub"])  # shard 1 learns in epoch 0, then goes quiet
    b.learn(early)
    assert s1.after_batch(b, early) is None  # nothing crossed into a later epoch yet: pending
    events = batch(stream, 1_000, ["ua"]) + batch(stream, 25_000, ["ua"])
    a.learn(events)
    assert s0.after_batch(a, events) == 0
    assert s0.catch_up(a, 30_000) == []  # shard 1 may still publish epoch 0
    assert s1.on_time(b, 9_999) is None  # epoch 0 is not over
    assert s1.on_time(b, 10_000) == 0  # its pending change goes out once event time leaves the epoch
    assert s1.on_time(b, 35_000) == 2  # then, with nothing pending, an empty publication up to the last whole epoch
    assert s1.on_time(b, 35_000) is None
    items = sorted({e["item_id"] for e in early})
    before = a.items.weights[a.items.rows(items)].clone()
    assert s0.catch_up(a, 30_000) == [0]
    moved = (a.items.weights[a.items.rows(items)] - before).abs().amax(dim=1)
    assert bool((moved > 1e-6).all())  # shard 1's change reached shard 0


def drive(learner_cfg, syncs, batches, restart_at: int | None = None, log: list | None = None):
    """flush_micro_batch over (shard, events) batches with state kept as the Beam step keeps it; at
    ``restart_at`` the live learners are dropped and rebuilt from snapshot + journal. ``log`` gets every
    journal entry, as (shard, entry), snapshots or not."""
    live: dict = {}
    state = {s: {"meta": new_meta(), "snapshot": None, "journal": []} for s in range(len(syncs))}
    for n, (shard, events) in enumerate(batches):
        if n == restart_at:
            live.clear()
        st = state[shard]
        if isinstance(events, int):  # a tick: event time reached this (UpdateShardModel._on_time)
            entry = sync_on_time(learner_cfg, shard, events, st["meta"], lambda st=st: (st["snapshot"], list(st["journal"])),
                                 live, shard, syncs[shard])
            if entry is not None:
                st["journal"].append(entry)
                if log is not None:
                    log.append((shard, entry))
            continue
        done = flush_micro_batch(learner_cfg, shard, events, st["meta"], lambda st=st: (st["snapshot"], list(st["journal"])),
                                 live, shard, 3, 3, 0, syncs[shard])
        if log is not None:
            log.append((shard, done.journal_entry))
        if done.snapshot is not None:
            st["snapshot"], st["journal"] = done.snapshot, []
        else:
            st["journal"].append(done.journal_entry)
    return {s: live[s][0] for s in live}


def test_a_restarted_shard_resumes_at_its_sync_position():
    stream = topic_stream(8)
    batches = []
    for round_ in range(8):
        for shard, user in ((0, "ua"), (1, "ub")):
            batches.append((shard, batch(stream, round_ * 15_000, [user, user + "2"])))
    learner_cfg, medium, syncs = two_shards()
    whole = drive(learner_cfg, syncs, batches)
    learner_cfg2, medium2, syncs2 = two_shards()
    restarted = drive(learner_cfg2, syncs2, batches, restart_at=11)
    assert sorted(medium.names()) == sorted(medium2.names())
    for shard in (0, 1):
        a, b = whole[shard], restarted[shard]
        assert a.counters["sync_merges"] > 0
        assert (a.sync.applied, a.sync.published, a.counters["sync_merges"]) == \
            (b.sync.applied, b.sync.published, b.counters["sync_merges"]), "a merge applied twice or skipped"
        assert a.parameters_snapshot() == b.parameters_snapshot()


def test_a_restart_replays_publications_on_time_without_publishing_or_merging_twice():
    stream = topic_stream(8)
    batches: list = []
    for round_ in range(8):
        batches.append((0, batch(stream, round_ * 15_000, ["ua", "ua2"])))
        if round_ in (0, 1, 5):  # shard 1 learns now and then; otherwise event time reaches it as ticks
            batches.append((1, batch(stream, round_ * 15_000 + 50, ["ub", "ub2"])))
        else:
            batches.append((1, round_ * 15_000 + 1_000))
    learner_cfg, medium, syncs = two_shards()
    whole = drive(learner_cfg, syncs, batches)
    quiet = drive(*two_shards()[::2], [b for b in batches if not isinstance(b[1], int)])  # the same without ticks
    assert quiet[0].sync.applied == 0 and whole[0].sync.applied >= 6, "the ticks let shard 0 merge while shard 1 is idle"
    for restart_at in (6, 9):
        learner_cfg2, medium2, syncs2 = two_shards()
        restarted = drive(learner_cfg2, syncs2, batches, restart_at=restart_at)
        assert sorted(medium.names()) == sorted(medium2.names())
        for shard in (0, 1):
            a, b = whole[shard], restarted[shard]
            assert (a.sync.applied, a.sync.published, a.counters["sync_merges"]) == \
                (b.sync.applied, b.sync.published, b.counters["sync_merges"]), "a merge applied twice or skipped"
            assert a.parameters_snapshot() == b.parameters_snapshot()


def kept_for(keep_ms: int, medium=None):
    """Two shards syncing every 10 s of event time that keep ``keep_ms`` of publications (0: all), and the
    batches of a long run: 40 rounds 15 s apart, shard 1 idle (ticks only) now and then."""
    learner_cfg = cfg(negatives=1)
    medium, sync = medium or MemoryMedium(), SyncConfig(shards=2, interval_ms=10_000, keep_ms=keep_ms)
    stream, batches = topic_stream(8), []
    for round_ in range(40):
        batches.append((0, batch(stream, round_ * 15_000, ["ua", "ua2"])))
        batches.append((1, round_ * 15_000 + 1_000) if round_ % 4 == 3 else (1, batch(stream, round_ * 15_000 + 50, ["ub"])))
    return learner_cfg, medium, [ShardSync(sync, medium, s) for s in range(2)], batches


def test_the_retention_removes_what_no_shard_can_need_and_changes_nothing_learned(tmp_path):
    learner_cfg, medium, syncs, batches = kept_for(0)
    whole = drive(learner_cfg, syncs, batches)
    for restart_at in (None, 57):
        folder = FileSystemsMedium(str(tmp_path / f"sync-{restart_at}"))  # the Beam steps' medium, on a local folder
        learner_cfg2, medium2, syncs2, _ = kept_for(20_000, folder)  # 2 epochs behind what a restore could need
        kept = drive(learner_cfg2, syncs2, batches, restart_at=restart_at)
        assert len(medium2.names()) < len(medium.names()) / 3, (len(medium2.names()), len(medium.names()))
        assert set(medium2.names()) < set(medium.names()), "a publication differs"
        restorable = min(learner.sync.restorable for learner in kept.values())
        assert restorable > 10 and sum(learner.counters["sync_removed"] for learner in kept.values()) > 0
        removed = {parse_name(n)[0] for n in set(medium.names()) - set(medium2.names())}
        assert max(removed) < restorable - 1, "removed a publication a restore of a shard could need"
        assert max(removed) >= restorable - 4, "kept more than the retention says"
        for shard in (0, 1):
            a, b = whole[shard], kept[shard]
            assert (a.sync.applied, a.sync.published, a.counters["sync_merges"]) == \
                (b.sync.applied, b.sync.published, b.counters["sync_merges"])
            assert a.parameters_snapshot() == b.parameters_snapshot()


def test_a_restore_behind_the_retention_stops_with_an_error_saying_so():
    learner_cfg, medium, syncs, batches = kept_for(20_000)
    log: list = []
    drive(learner_cfg, syncs, batches, log=log)
    journal = [entry for shard, entry in log if shard == 0]  # all of shard 0's flushes, from its first
    with pytest.raises(SyncRetentionError, match="sync epoch 0, .*--sync_keep_s"):
        restore_learner(learner_cfg, 0, None, journal, syncs[0])
    fresh = IncrementalLearner(learner_cfg, 0)  # state from before any snapshot, without its journal
    with pytest.raises(SyncRetentionError, match="sync epoch 0, "):
        syncs[0].catch_up(fresh, 10**9)


# ---------------------------------------------------------------------- the pipeline, under TestStream
def users_by_shard(shards: int, per_shard: int, prefix: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {s: [] for s in range(shards)}
    n = 0
    while min(len(v) for v in out.values()) < per_shard:
        u = f"{prefix}{n}"
        if len(out[shard_of(u, shards)]) < per_shard:
            out[shard_of(u, shards)].append(u)
        n += 1
    return out


def shared_row_gap(tmp_path, sync: bool) -> float:
    """The largest difference between the 4 shards' published copies of item x, which only phase A touches."""
    shards = 4
    table = TableConfig(dim=8)
    learner = LearnerConfig(user_features=FEATURES.user_width, item_features=FEATURES.item_width, user_table=table,
                            item_table=table, negatives=0, gate=False, lr=0.2)
    sync_cfg = SyncConfig(shards, interval_ms=10_000) if sync else None
    sharding = ShardingConfig(shards, 16, sync_cfg, str(tmp_path / "sync") if sync else None)
    pc = PipelineConfig(FEATURES, learner, UpdateConfig(batch_size=4, top_k=3), CleanConfig(), sharding,
                        60_000, 86_400_000, 86_400_000, "unused", 0)
    early, late = users_by_shard(shards, 2, "a"), users_by_shard(shards, 2, "b")
    stream = TestStream().advance_watermark_to(at(0))
    i = 0
    phases = [(early, 0, ["x", "w"]), (late, 100, ["y", "v"]), (late, 300, ["z", "q"])]
    for users, start, items in phases:
        for round_ in range(4):
            t = start + round_ * 12
            elements = []
            for s in range(shards):
                for j, u in enumerate(users[s]):
                    i += 1
                    elements.append(wire(i, u, items[(round_ + j) % 2], t + 0.1 * j + 0.01 * s))
            stream = stream.add_elements(elements).advance_watermark_to(at(t + 11))
    stream = stream.advance_watermark_to_infinity()
    Collected.clear()
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=opts) as p:
        out = p | stream | RefreshModels(pc, clock=fixed_clock)
        out[DELTAS] | CollectTo(f"sync-{sync}")
    latest: dict[int, tuple[int, list[float]]] = {}
    for d in Collected.get(f"sync-{sync}"):
        if d["table"] != "item":
            continue
        for row_id, values in zip(d["row_ids"], d["row_values"], strict=True):
            if row_id == "x" and d["sequence"] >= latest.get(d["shard"], (-1, []))[0]:
                latest[d["shard"]] = (d["sequence"], values[: table.dim + 1])  # trainable part
    assert sorted(latest) == list(range(shards)), "every shard publishes its copy of x"
    copies = torch.tensor([v for _, v in latest.values()])
    return float((copies - copies[0]).abs().max())


def test_shards_copies_of_a_shared_row_converge_after_a_sync(tmp_path):
    apart = shared_row_gap(tmp_path / "off", sync=False)
    together = shared_row_gap(tmp_path / "on", sync=True)
    assert apart > 1e-3, "without sync each shard learns its own x"
    assert together < 1e-5, f"after the sync the shards' copies of x differ by {together}"


# ---------------------------------------------------------------------- a bad medium
def test_a_bad_medium_fails_fast_naming_its_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli.main(["--output_dir", str(tmp_path / "out"), "--shards", "4", "--streaming", "--synthetic_events", "100",
                   "--sync_dir", str(blocker / "sync")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(blocker) in err[0] and "--sync_dir" in err[0]


def test_check_medium_names_the_location():
    class ReadOnly(FolderMedium):
        def put(self, name, data):
            raise PermissionError("read-only file system")

    with pytest.raises(MediumError, match="sync medium /mnt/ro: cannot be written"):
        check_medium(ReadOnly("/mnt/ro"))
    check_medium(FolderMedium(os.path.join(os.environ.get("TMPDIR", "/tmp"), "freshrec-medium-test")))


def test_a_medium_holding_another_runs_publications_is_refused(tmp_path, capsys):
    medium = FolderMedium(str(tmp_path / "sync" / "r1"))
    medium.put("e000000000001-s0000-t5.sync", b"old")
    rc = cli.main(["--output_dir", str(tmp_path / "out"), "--shards", "4", "--streaming", "--synthetic_events", "100",
                   "--sync_dir", str(tmp_path / "sync"), "--run_id", "r1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already holds publications" in err[0] and "r1" in err[0]


def test_bounded_direct_runs_say_why_shards_learn_alone(tmp_path, capsys):
    ns, _ = cli.prepare(["--output_dir", str(tmp_path / "o"), "--shards", "2", "--synthetic_events", "100"])
    assert ns.no_sync
    assert "--streaming" in capsys.readouterr().err


def test_sync_config_is_checked():
    with pytest.raises(ValueError, match="merge"):
        SyncConfig(2, merge="median")
    with pytest.raises(ValueError, match="dense_merge"):
        SyncConfig(2, dense_merge="max")
    with pytest.raises(ValueError, match="share"):
        SyncConfig(2, share=("bias",))
    with pytest.raises(ValueError, match="go together"):
        ShardingConfig(2, 16, SyncConfig(2), None)
    assert replace(SyncConfig(2), interval_ms=5).epoch_of(12) == 2


def test_a_redone_flush_keeps_what_went_out_first_and_sends_the_rest_later():
    """A retried bundle (or a restore) may redo a publishing flush differently; the other shards already
    hold the first publication, so it stands, and the difference goes out with the next one."""
    learner_cfg, medium, (s0, s1) = two_shards()
    stream = topic_stream(8)
    a, b = IncrementalLearner(learner_cfg, 0), IncrementalLearner(learner_cfg, 1)
    before = a.to_bytes()
    first = batch(stream, 0, ["ua"]) + batch(stream, 25_000, ["ua"])
    a.learn(first)
    assert s0.after_batch(a, first) == 0
    redo = IncrementalLearner.from_bytes(before, learner_cfg)  # the redo learns one more event
    again = first + batch(stream, 25_800, ["ua2"], n=1)
    redo.learn(again)
    sent = list(medium.names())
    assert s0.after_batch(redo, again) == 0 and medium.names() == sent, "the first publication was overwritten"
    for learner, sync, user in ((b, s1, "ub"), (redo, s0, "ua")):
        early = batch(stream, 0, [user]) + batch(stream, 25_000, [user])
        if learner is b:
            learner.learn(early)
            sync.after_batch(learner, early)
        late = batch(stream, 50_000, [user]) + batch(stream, 75_000, [user])
        sync.catch_up(learner, 50_000)
        learner.learn(late)
        sync.after_batch(learner, late)
    for learner, sync in ((b, s1), (redo, s0)):
        assert sync.catch_up(learner, 10**9) == [5]
    gap = max(float((redo.items.published_values(k)[:9] - b.items.published_values(k)[:9]).abs().max())
              for k in redo.items.index if k in b.items.index)
    assert gap < 1e-5, f"the shards' copies differ by {gap} after every publication was merged"


@pytest.mark.parametrize("share,dense_merge", [(("items", "state", "bias"), "sum"), (("items", "bias", "mlps"), "sum"),
                                               (("items", "bias", "item_mlp"), "mean")])
def test_what_the_shards_share_can_grow_and_still_converges(share, dense_merge):
    learner_cfg = cfg(negatives=1)
    medium, sync = MemoryMedium(), SyncConfig(shards=2, interval_ms=10_000, share=share, dense_merge=dense_merge)
    s0, s1 = ShardSync(sync, medium, 0), ShardSync(sync, medium, 1)
    stream = topic_stream(8)
    a, b = IncrementalLearner(learner_cfg, 0), IncrementalLearner(learner_cfg, 1)
    for learner, s, user in ((a, s0, "ua"), (b, s1, "ub")):
        events = batch(stream, 0, [user]) + batch(stream, 25_000, [user])
        learner.learn(events)
        s.after_batch(learner, events)
    assert s0.catch_up(a, 10**9) == [0] and s1.catch_up(b, 10**9) == [0]
    for k in set(a.items.index) & set(b.items.index):
        assert torch.allclose(a.items.weights[a.items.row_of(k)], b.items.weights[b.items.row_of(k)], atol=1e-6)
        if "state" in share:
            assert torch.allclose(a.items.state["accum"][a.items.row_of(k)], b.items.state["accum"][b.items.row_of(k)], atol=1e-6)
    if "mlps" in share or "item_mlp" in share:
        for (name, pa), (_, pb) in zip(a.dense.named_parameters(), b.dense.named_parameters(), strict=True):
            if "mlps" in share or not name.startswith("user."):  # item_mlp: the user-feature MLP stays the shard's
                assert torch.allclose(pa, pb, atol=1e-6), name
