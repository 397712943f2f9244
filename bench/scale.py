"""Scale: the Globo clicks (all 2,988,181 by default) in time order through the runner-free core that the
pipeline's stateful steps call (validate, item and user featurizers, ``model.journal.flush_micro_batch``
per shard: score, learn, top-k, deltas, journal entry), with memory bounded by admission and TTL.

Two configurations replay the same events side by side, so every report line compares them in one run:

  bounded    ids admitted after --admit_after occurrences, embedding rows evicted after
             --embedding_ttl_days and feature state after --state_ttl_days of event-time idleness
             (tombstones in the deltas)
  unbounded  every id admitted on first sight, nothing ever evicted (the baseline)

    python -m bench.scale --admit_after 2 --embedding_ttl_days 1 --state_ttl_days 1   # all clicks
    python -m bench.scale --limit 500000 --data /path/to/globo-news-clicks

Printed per report: events, events/s, embedding rows (users, items), the bytes of the live rows (values,
side features, optimizer state) and of the allocated tables (they grow by doubling and include the
admission sketches), feature-state entries, tombstones published, and the process's resident memory; at
the end, bounded/unbounded ratios.
The clicks are parsed into compact arrays (about 40 bytes per click) and sorted by click_timestamp;
nothing is copied out of the dataset folder (download: see ``bench/prequential.py``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.cleaning import InvalidEvent, validate_event
from core.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer
from core.settings import HelpFormatter, add_flags, feature_config, pipeline_config
from model.config import LearnerConfig
from model.hashing import shard_of
from model.journal import flush_micro_batch, new_meta

HOUR_MS = 3_600_000
DEFAULT_DIR = os.path.join(os.environ.get("FRESHREC_DATASETS", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                             "shared", "datasets")), "globo-news-clicks")


def load_clicks(path: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(timestamp ms, user, article, session) arrays sorted by timestamp (stable in file order)."""
    files = sorted(glob.glob(os.path.join(path, "clicks", "clicks_hour_*.csv")))
    if not files:
        raise FileNotFoundError(f"scale: no clicks/clicks_hour_*.csv under {path!r}")
    ts: list[int] = []
    users: list[int] = []
    items: list[int] = []
    sessions: list[int] = []
    for f in files:
        with open(f, newline="") as fh:
            rows = csv.reader(fh)
            header = next(rows, None)
            if header is None:
                continue
            col = {name: i for i, name in enumerate(header)}
            cu, ci, ct, cs = col["user_id"], col["click_article_id"], col["click_timestamp"], col["session_id"]
            for r in rows:
                users.append(int(r[cu])); items.append(int(r[ci])); ts.append(int(r[ct])); sessions.append(int(r[cs]))
    t = np.asarray(ts, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    if limit:
        order = order[:limit]
    return t[order], np.asarray(users, dtype=np.int64)[order], np.asarray(items, dtype=np.int64)[order], \
        np.asarray(sessions, dtype=np.int64)[order]


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@dataclass
class Replica:
    """One configuration of the keyed steps: feature state per user and item, a learner per shard."""

    name: str
    cfg: LearnerConfig
    feature: FeatureConfig
    shards: int
    batch: int
    state_ttl_ms: int | None
    users: UserFeaturizer = field(init=False)
    items: ItemPopularity = field(init=False)
    ustate: dict[str, Any] = field(default_factory=dict)
    istate: dict[str, Any] = field(default_factory=dict)
    buffers: list[list[dict[str, Any]]] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    live: dict[Any, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scores: int = 0
    delta_rows: int = 0
    tombstones: int = 0
    peak: dict[str, float] = field(default_factory=dict)  # largest figures seen at any state-expiry sweep

    def __post_init__(self) -> None:
        self.users, self.items = UserFeaturizer(self.feature), ItemPopularity(self.feature)
        self.buffers = [[] for _ in range(self.shards)]
        self.metas = [new_meta() for _ in range(self.shards)]

    def process(self, ev: dict[str, Any]) -> None:
        t = time.perf_counter()
        it = self.istate.get(ev["item_id"]) or self.items.new_state()
        ev = {**ev, "item_features": self.items.transform_one(it, ev)}
        self.istate[ev["item_id"]] = self.items.learn_one(it, ev)
        us = self.ustate.get(ev["user_id"]) or self.users.new_state()
        ev["user_features"], ev["history"] = self.users.transform_one(us, ev)
        self.ustate[ev["user_id"]] = self.users.learn_one(us, ev)
        shard = shard_of(ev["user_id"], self.shards)
        buf = self.buffers[shard]
        buf.append(ev)
        if len(buf) >= self.batch:
            self.flush(shard)
        self.seconds += time.perf_counter() - t

    def flush(self, shard: int) -> None:
        events, self.buffers[shard] = self.buffers[shard], []
        if not events:
            return
        out = flush_micro_batch(self.cfg, shard, events, self.metas[shard], lambda: (None, []), self.live, shard,
                                top_k=10, snapshot_every=10**9, emit_time_ms=0)
        self.scores += len(out.scores)
        for d in out.deltas:
            self.delta_rows += len(d["row_ids"])
            self.tombstones += len(d["tombstones"])

    def expire_state(self, now_ms: int) -> None:
        """The pipeline's per-key state-expiry timers: drop feature state idle longer than the state TTL."""
        t = time.perf_counter()
        if self.state_ttl_ms is not None:
            cutoff = now_ms - self.state_ttl_ms
            for states in (self.ustate, self.istate):
                for key in [k for k, s in states.items() if (s["last_ms"] or 0) < cutoff]:
                    del states[key]
        self.seconds += time.perf_counter() - t
        for k, v in self.figures().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def learners(self) -> list[Any]:
        return [learner for learner, _ in self.live.values()]

    def figures(self) -> dict[str, float]:
        ls = self.learners()
        tables = [t for x in ls for t in x.tables().values()]
        # bytes of the live rows: trainable values, side features and optimizer state, float32
        row_bytes = sum(len(t) * 4 * (t.width * (1 + len(t.state)) + t.extra_width) for t in tables)
        return {
            "user_rows": sum(len(x.users) for x in ls), "item_rows": sum(len(x.items) for x in ls),
            "rows_mb": row_bytes / 2**20, "model_mb": sum(x.memory_bytes() for x in ls) / 2**20,
            "feature_states": len(self.ustate) + len(self.istate), "tombstones": self.tombstones,
            "scores": self.scores, "delta_rows": self.delta_rows,
        }


def make_replicas(args: argparse.Namespace, feature: FeatureConfig) -> list[Replica]:
    """bounded: the model, state and sharding flags as given; unbounded: the same, but every id admitted at
    once and nothing evicted."""
    cfg = pipeline_config(args)
    bounded = cfg.learner
    table = replace(bounded.user_table, admit_after=1, ttl_ms=None, capacity=10**9)
    unbounded = replace(bounded, user_table=table, item_table=table)
    shards, batch = cfg.sharding.shards, cfg.update.batch_size
    out = [Replica("bounded", bounded, feature, shards, batch, cfg.state_ttl_ms)]
    if not args.no_baseline:
        out.append(Replica("unbounded", unbounded, feature, shards, batch, None))
    return out


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DIR, help="the globo-news-clicks folder (holding clicks/)")
    ap.add_argument("--limit", type=int, default=0, help="first N clicks in time order (0 = all)")
    ap.add_argument("--report_every", type=int, default=250_000)
    ap.add_argument("--no_baseline", action="store_true", help="skip the unbounded configuration")
    add_flags(ap, ("model", "state", "sharding"), skip=("mode", "flush_interval_s", "allowed_lateness_s", "dedupe_ttl_s"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"scale: no data at {args.data}; pass --data or set FRESHREC_DATASETS", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    ts, users, items, sessions = load_clicks(args.data, args.limit or None)
    print(f"{len(ts)} clicks loaded and sorted in {time.perf_counter() - t0:.1f}s; RSS {rss_mb():.0f} MB; "
          f"{len(np.unique(users))} users, {len(np.unique(items))} articles", flush=True)
    feature = feature_config(args)
    replicas = make_replicas(args, feature)
    invalid = 0
    wall = time.perf_counter()

    def report(n: int) -> None:
        line = [f"{n:>9d} events {time.perf_counter() - wall:7.0f}s RSS {rss_mb():6.0f} MB"]
        for r in replicas:
            f = r.figures()
            line.append(f"| {r.name}: {n / max(r.seconds, 1e-9):5.0f} ev/s rows u={f['user_rows']} i={f['item_rows']} "
                        f"live rows {f['rows_mb']:.1f} MB (allocated {f['model_mb']:.1f}) state {f['feature_states']} tombstones {f['tombstones']}")
        print(" ".join(line), flush=True)

    for n in range(len(ts)):
        raw = {"event_id": f"g-{sessions[n]}-{items[n]}-{ts[n]}", "user_id": str(users[n]), "item_id": str(items[n]),
               "event_type": "click", "event_time_ms": int(ts[n]), "value": None, "context": {}}
        try:
            ev = validate_event(raw)
        except InvalidEvent:
            invalid += 1
            continue
        for r in replicas:
            r.process(ev)
        if (n + 1) % 20_000 == 0:
            for r in replicas:
                r.expire_state(int(ts[n]))
        if (n + 1) % args.report_every == 0:
            report(n + 1)
    for r in replicas:
        for shard in range(args.shards):
            r.flush(shard)
    report(len(ts))
    print(f"invalid clicks: {invalid}; every valid click reached a shard's learner in both configurations: "
          + ", ".join(f"{r.name} {sum(x.counters['events'] for x in r.learners())}" for r in replicas))
    keys = ("user_rows", "item_rows", "rows_mb", "model_mb", "feature_states")
    for r in replicas:
        print(f"{r.name} peak (every 20,000 events): " + ", ".join(f"{k} {r.peak.get(k, 0):.1f}" for k in keys))
    if len(replicas) == 2:
        b, u = (r.peak for r in replicas)
        print("bounded / unbounded, peaks: " + ", ".join(f"{k} {b[k] / u[k]:.2f}x" for k in keys if u.get(k)))
    print(f"peak resident memory of this process (both configurations, plus the click arrays): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
