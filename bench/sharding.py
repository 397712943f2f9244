"""Scale without losing the model: 1, 4 and 16 shards, each with the sync of shared parameters on and off,
through the pipeline itself (the CLI on the DirectRunner, as a streaming replay: the mode the README
documents for multi-shard runs), on one dataset, in one invocation.

Every run reports its prequential AUC and logloss (the pipeline's own summary), Recall@10 (on every
``--recall_every``-th positive event: the rank of its item among the distinct items of the previous
``--candidate_pool`` events of the whole stream, scored by the event's shard before it learns the event,
as in ``bench/prequential.py``), events/s (events / pipeline time) and the bytes its shards put on the
sync medium per event. Ratios are against the 1-shard run of the same invocation. ``--jobs 2`` runs two
runs at a time (each learner uses one torch thread by default), the longest first: events/s are then those of a shared machine.

    python -m bench.sharding --dataset movielens --json bench/results/sharding-movielens.json
    python -m bench.sharding --dataset globo --limit 400000 --json bench/results/sharding-globo.json
    python -m bench.sharding --dataset synthetic --json bench/results/sharding-synthetic.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench.prequential import expected_hit
from core.layout import resolve_layout
from core.readers import read_replay
from core.settings import DEFAULTS
from model.batch import event_label
from model.learner import IncrementalLearner
from model.serving import score_candidates

DATASETS = {"movielens": "../shared/datasets/movielens-100k", "globo": "../shared/datasets/globo-news-clicks",
            "synthetic": None}


def synthetic_file(n: int) -> str:
    """The embedded synthetic stream (as ``./run.sh`` uses it) written as JSON lines, to replay like a dataset."""
    from core.readers import SyntheticConfig, synthetic_events

    path = os.path.join(tempfile.mkdtemp(prefix="freshrec-synthetic-"), "events.jsonl")
    with open(path, "w") as fh:
        for ev in synthetic_events(SyntheticConfig(events=n)):
            fh.write(json.dumps(ev) + "\n")
    return path


class RecallProbe:
    """Recall@k of probed events among the items of the stream's ``pool`` events before each: a
    picklable ``probe(learner, events) -> (hits, probes)`` for ``UpdateShardModels``."""

    def __init__(self, events: list[dict[str, Any]], threshold: float, every: int, pool: int, k: int = 10):
        self.items = [str(e["item_id"]) for e in events]
        self.k, self.pool = k, pool
        self.at: dict[str, int] = {}
        positives = 0
        for pos, ev in enumerate(events):
            if event_label(ev, threshold) >= 0.5:
                positives += 1
                if positives % every == 0 and pos >= 20:
                    self.at[str(ev["event_id"])] = pos

    def __call__(self, learner: IncrementalLearner, events: list[dict[str, Any]]) -> tuple[float, int]:
        hits, n = 0.0, 0
        for ev in events:
            pos = self.at.get(ev["event_id"])
            if pos is None:
                continue
            cands = list(dict.fromkeys(self.items[max(0, pos - self.pool): pos]))
            if ev["item_id"] not in cands:
                cands.append(ev["item_id"])
            # the shard's live model (what it learned and merged), not the merged rows it serves
            scores = np.asarray(score_candidates(learner.queries, learner.items, learner.dense, ev["user_id"], cands))
            hits += expected_hit(scores, cands.index(ev["item_id"]), self.k)
            n += 1
        return hits, n


def run_one(data: str, shards: int, sync: bool, args: argparse.Namespace, probe: RecallProbe, events: int) -> dict[str, Any]:
    from pipelines import cli

    out = tempfile.mkdtemp(prefix=f"freshrec-sharding-{shards}-")
    argv = ["--data", data, "--output_dir", out, "--shards", str(shards), "--streaming",
            "--replay_rate", str(args.replay_rate), "--quiet", *([] if sync else ["--no_sync"]), *args.extra]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    with contextlib.redirect_stdout(io.StringIO()):
        ns, opts = cli.prepare(argv)
        t = time.perf_counter()
        rc = cli.run(ns, opts, probe)
        seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"bench.sharding: the run with {shards} shards (sync {sync}) exited {rc}")
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    pre = summary["prequential"]
    return {"shards": shards, "sync": sync, "auc": pre["auc"], "logloss": pre["logloss"],
            "recall_at_10": pre.get("recall"), "recall_probes": pre.get("recall_probes"),
            "events_per_s": events / seconds, "seconds": seconds,
            "sync_bytes_per_event": summary["sync"]["bytes_published"] / events,
            "sync_epochs_applied": summary["sync"]["epochs_applied"], "events_applied": summary["events_applied"]}


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="movielens")
    ap.add_argument("--data", help="the dataset's path (default: ../shared/datasets/<dataset>)")
    ap.add_argument("--limit", type=int, help="the first N events only")
    ap.add_argument("--synthetic_events", type=int, default=50_000, help="events of --dataset synthetic")
    ap.add_argument("--shard_counts", default="1,4,16", help="shard counts; the first is the baseline")
    ap.add_argument("--replay_rate", type=float, default=2000.0, help="events/s of the streaming replay")
    ap.add_argument("--recall_every", type=int, default=20, help="probe Recall@10 on every Nth positive event")
    ap.add_argument("--candidate_pool", type=int, default=2000, help="probe among the items of this many previous events")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    ap.add_argument("--json", help="write the results here")
    return ap


def _report(r: dict[str, Any]) -> None:
    print(f"bench.sharding: {r['shards']} shard(s), sync {'on' if r['sync'] else 'off'}: AUC {r['auc']:.4f}  "
          f"logloss {r['logloss']:.4f}  R@10 {r['recall_at_10']:.4f}  {r['events_per_s']:,.0f} events/s  "
          f"{r['sync_bytes_per_event']:.0f} sync bytes/event", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args, extra = make_parser().parse_known_args(argv)
    args.extra = extra  # any pipeline flag (--batch_size, --sync_merge ...) goes to every run
    data = args.data or DATASETS[args.dataset] or synthetic_file(args.synthetic_events)
    layout = resolve_layout(data, None, None, None)
    stream = read_replay(data, layout.mapping, args.limit)
    threshold = DEFAULTS["rating_threshold"]
    if "--rating_threshold" in extra:
        threshold = float(extra[extra.index("--rating_threshold") + 1])
    probe = RecallProbe(stream, threshold, args.recall_every, args.candidate_pool)
    counts = [int(c) for c in args.shard_counts.split(",")]
    plan = [(shards, sync) for shards in counts for sync in ((True,) if shards == 1 else (True, False))]
    done: dict[tuple[int, bool], dict[str, Any]] = {}
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, data, s, on, args, probe, len(stream)): (s, on)
                       for s, on in sorted(plan, key=lambda p: (-p[0], not p[1]))}  # the longest first
            for fut in as_completed(futures):
                done[futures[fut]] = fut.result()
                _report(done[futures[fut]])
    else:
        for shards, sync in plan:
            print(f"bench.sharding: {shards} shard(s), sync {'on' if sync else 'off'} ...", file=sys.stderr, flush=True)
            done[(shards, sync)] = run_one(data, shards, sync, args, probe, len(stream))
            _report(done[(shards, sync)])
    runs = [done[p] for p in plan]
    base = runs[0]
    print(f"{args.dataset}: {len(stream):,} events, replay {args.replay_rate:,.0f} events/s, ratios to {counts[0]} shard(s)")
    print(f"{'shards':>6s} {'sync':>5s} {'AUC':>7s} {'x':>6s} {'logloss':>8s} {'R@10':>7s} {'x':>6s} {'events/s':>9s} {'x':>6s} {'sync B/ev':>9s}")
    for r in runs:
        print(f"{r['shards']:>6d} {('on' if r['sync'] else 'off'):>5s} {r['auc']:7.4f} {r['auc'] / base['auc']:5.3f}x "
              f"{r['logloss']:8.4f} {r['recall_at_10']:7.4f} {r['recall_at_10'] / base['recall_at_10']:5.3f}x "
              f"{r['events_per_s']:9,.0f} {r['events_per_s'] / base['events_per_s']:5.2f}x {r['sync_bytes_per_event']:9.0f}")
    result = {"dataset": args.dataset, "events": len(stream), "replay_rate": args.replay_rate,
              "jobs": args.jobs, "flags": extra, "runs": runs}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
