"""What the shards should share, and how their changes should merge: the variants of the sync side by side
through the runner-free core (the learners, ``model.shard_sync`` and a medium in memory), deterministic and
in seconds, where ``bench/sharding.py`` measures the chosen one through the pipeline.

The stream is replayed in event-time chunks of ``--chunk`` events (as a streaming replay hands the runner a
second's worth): in each chunk every shard learns its users' events in batches of its share of ``--batch_size``
(``ceil(batch_size / shards)``, as the pipeline's ``UpdateConfig.shard_batch_size``), each
batch preceded by the shard's catch-up and followed by its publication, as in the pipeline's flushes.
Prequential AUC and logloss over every example; Recall@10 as in ``bench/sharding.py``; ratios to one shard.

    python -m bench.sync_variants --dataset movielens --json bench/results/sync-variants-movielens.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bench.prequential import featurize_stream
from bench.sharding import DATASETS, RecallProbe
from core.layout import resolve_layout
from core.readers import read_replay
from core.settings import DEFAULTS, UpdateConfig, feature_config, learner_config
from model.hashing import shard_of
from model.learner import IncrementalLearner
from model.metrics import BinaryStats
from model.shard_sync import ShardSync
from model.sync import MemoryMedium, SyncConfig

VARIANTS = [  # (shards, sync share or None for no sync, merge rule)
    (1, None, "sum"),
    (4, None, "sum"),
    (4, ("items", "bias"), "sum"),
    (4, ("items", "bias", "mlps"), "sum"),
    (16, None, "sum"),
    (16, ("items", "bias"), "sum"),
    (16, ("items", "bias"), "mean"),
    (16, ("items", "state", "bias"), "sum"),
    (16, ("items", "bias", "mlps"), "sum"),
    (16, ("items", "state", "bias", "mlps"), "sum"),
]


def parse_variant(text: str) -> tuple[int, tuple[str, ...] | None, str]:
    """``SHARDS[:SHARE[:MERGE]]``, SHARE comma-separated or ``none`` (no sync), MERGE the rows' rule or
    ``ROWS/DENSE``: ``4:items,bias,item_mlp:sum/mean``."""
    parts = text.split(":")
    share = None if len(parts) < 2 or parts[1] == "none" else tuple(parts[1].split(","))
    return int(parts[0]), share, parts[2] if len(parts) > 2 else "sum"


def replay(stream: list[dict[str, Any]], shards: int, share: tuple[str, ...] | None, merge: str, chunk: int,
           batch: int, probe: RecallProbe, sync_interval_ms: int = 60_000,
           heartbeat: bool = False) -> dict[str, Any]:
    cfg = learner_config(argparse.Namespace())
    batch = UpdateConfig(batch_size=batch, shards=shards).shard_batch_size  # the shard's share of the micro-batch
    learners = [IncrementalLearner(cfg, s) for s in range(shards)]
    medium = MemoryMedium()
    rows_rule, dense_rule = merge.split("/")[0], merge.split("/")[-1]
    sync = SyncConfig(shards, sync_interval_ms, rows_rule, share, dense_rule) if share else None
    syncs = [ShardSync(sync, medium, s) for s in range(shards)] if sync else None
    stats, hits, probes = BinaryStats(), 0.0, 0
    started = time.perf_counter()
    for start in range(0, len(stream), chunk):
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for ev in stream[start:start + chunk]:
            by_shard.setdefault(shard_of(ev["user_id"], shards), []).append(ev)
        for shard, events in sorted(by_shard.items()):
            learner = learners[shard]
            for b in range(0, len(events), batch):
                part = events[b:b + batch]
                if syncs:
                    syncs[shard].catch_up(learner, min(e["event_time_ms"] for e in part))
                h, n = probe(learner, part)
                hits, probes = hits + h, probes + n
                result = learner.learn(part)
                stats.update(result.labels, result.probs)
                if syncs:
                    syncs[shard].after_batch(learner, part)
                learner.take_deltas()
        if syncs and heartbeat:  # event time reached the chunk's newest event: idle shards say so
            now = max(e["event_time_ms"] for e in stream[start:start + chunk])
            for shard, sync in enumerate(syncs):
                sync.on_time(learners[shard], now)
    return {"shards": shards, "sync": share is not None, "share": list(share or []), "merge": merge,
            "auc": stats.auc(), "logloss": stats.logloss(), "recall_at_10": hits / max(1, probes),
            "recall_probes": probes, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["movielens", "globo"], default="movielens")
    ap.add_argument("--data", help="the dataset's path (default: ../shared/datasets/<dataset>)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--chunk", type=int, default=2000, help="events per replay chunk (a second at 2,000 events/s)")
    ap.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="the stream's micro-batch")
    ap.add_argument("--sync_interval_s", type=float, default=DEFAULTS["sync_interval_s"])
    ap.add_argument("--variants", nargs="+", type=parse_variant, metavar="SHARDS[:SHARE[:MERGE]]",
                    help="the variants to run, e.g. 1 4:none 4:items,bias,item_mlp (default: the table's; the first is "
                         "the baseline of the ratios)")
    ap.add_argument("--heartbeat", action="store_true", help="after each chunk every shard publishes what is pending "
                    "(an idle one, that it has nothing): ShardSync.on_time")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    data = args.data or DATASETS[args.dataset]
    layout = resolve_layout(data, None, None, None)
    raw = read_replay(data, layout.mapping, args.limit)
    probe = RecallProbe(raw, DEFAULTS["rating_threshold"], 20, 2000)
    stream, _ = featurize_stream(raw, feature_config(argparse.Namespace()), 0, 0)
    runs = []
    for shards, share, merge in args.variants or VARIANTS:
        runs.append(replay(stream, shards, share, merge, args.chunk, args.batch_size, probe, int(args.sync_interval_s * 1000),
                           args.heartbeat))
        r = runs[-1]
        print(f"  {shards:>2d} shards, share {','.join(share) if share else 'nothing':24s} {merge:4s}: AUC {r['auc']:.4f} "
              f"logloss {r['logloss']:.4f} R@10 {r['recall_at_10']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    base = runs[0]
    print(f"{args.dataset}: {len(stream):,} events in chunks of {args.chunk:,}, batches of {args.batch_size}; ratios to 1 shard")
    for r in runs:
        what = ",".join(r["share"]) if r["sync"] else "(no sync)"
        print(f"{r['shards']:>3d} {what:26s} {r['merge']:5s} AUC {r['auc']:.4f} {r['auc'] / base['auc']:.3f}x  logloss "
              f"{r['logloss']:.4f}  R@10 {r['recall_at_10']:.4f} {r['recall_at_10'] / base['recall_at_10']:.3f}x")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "events": len(stream), "chunk": args.chunk, "batch_size": args.batch_size,
                       "runs": runs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
