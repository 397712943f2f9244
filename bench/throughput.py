"""Throughput benchmark: events/s of the update core against a plain torch training loop over the
same examples (the practical limit), River's online MF (a peer), and the full DirectRunner pipeline;
on CPU and, where CUDA is available, on GPU. All figures come from this one run, printed as ratios
against the plain torch loop measured on the same device.

    python -m bench.throughput                       # CPU (and CUDA if present)
    python -m bench.throughput --events 100000 --pipeline_events 50000 --batch_size 1024

The plain loop is the same model (user tower with history mean, biases, dense MLPs, BCE) on
nn.Embedding tables with ids mapped to ints up front and torch's Adagrad: no admission, expiry,
deltas, quality gate, undo log or published user tower. The difference is what those cost.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from core.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer
from core.readers import SyntheticConfig, synthetic_events
from core.settings import HelpFormatter, add_flags, learner_config, pipeline_config
from model.batch import event_label
from model.config import LearnerConfig
from model.learner import IncrementalLearner
from model.metrics import BinaryStats
from transforms.runtime import GC_TUNING_ENV


def make_stream(n: int, negatives: int, seed: int, events: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Featurized events (``events``, or ``n`` synthetic ones), each followed by ``negatives`` sampled items
    (the same for all models)."""
    import random

    cfg = FeatureConfig()
    uf, itf = UserFeaturizer(cfg), ItemPopularity(cfg)
    us: dict[str, Any] = {}
    its: dict[str, Any] = {}
    rng = random.Random(seed)
    recent: list[str] = []
    out: list[dict[str, Any]] = []
    synth = SyntheticConfig(events=n, users=5_000, items=2_000, malformed_fraction=0, duplicate_fraction=0, seed=seed)
    for ev in synthetic_events(synth) if events is None else events:
        u = us.setdefault(ev["user_id"], uf.new_state())
        i = its.setdefault(ev["item_id"], itf.new_state())
        feats, hist = uf.transform_one(u, ev)
        e = {**ev, "user_features": feats, "history": hist, "item_features": itf.transform_one(i, ev)}
        out.append(e)
        for _ in range(negatives if recent else 0):
            neg = recent[rng.randrange(len(recent))]
            out.append({**e, "item_id": neg, "label": 0.0, "sampled": True, "event_type": "view", "value": None,
                        "item_features": itf.transform_one(its[neg], ev)})
        uf.learn_one(u, ev)
        itf.learn_one(i, ev)
        recent.append(ev["item_id"])
        if len(recent) > 10_000:
            recent.pop(0)
    return out


def learner_cfg(args: argparse.Namespace, device: str) -> LearnerConfig:
    """The pipeline's learner from the model flags; negatives come with the stream (the same for every model)."""
    return replace(learner_config(args), negatives=0, device=device, cpu_threads=torch.get_num_threads())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_update_core(stream: list[dict[str, Any]], batch: int, device: str, args: argparse.Namespace) -> float:
    learner = IncrementalLearner(learner_cfg(args, device))
    learner.learn(stream[:batch])  # warm-up (allocations, CUDA context)
    learner.take_deltas()
    sync(device)
    t = time.perf_counter()
    for i in range(batch, len(stream), batch):
        learner.learn(stream[i : i + batch])
        learner.take_deltas()  # publishing the changed rows is part of the update step
    sync(device)
    return time.perf_counter() - t


class PlainModel(nn.Module):
    def __init__(self, users: int, items: int, dim: int, fu: int, fi: int, hidden: int = 8):
        super().__init__()
        self.u = nn.Embedding(users, dim + 1, sparse=True)
        self.i = nn.Embedding(items + 1, dim + 1, padding_idx=items, sparse=True)
        nn.init.normal_(self.u.weight, std=0.05)
        nn.init.normal_(self.i.weight, std=0.05)
        self.fu = nn.Sequential(nn.Linear(fu, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.fi = nn.Sequential(nn.Linear(fi, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.pad, self.dim = items, dim

    def forward(self, u, i, h, uf, itf):
        d = self.dim
        U, I, H = self.u(u), self.i(i), self.i(h)
        mask = (h != self.pad).float()
        q = U[:, :d] + (H[..., :d] * mask.unsqueeze(-1)).sum(1) / mask.sum(1).clamp(min=1).unsqueeze(-1)
        return (q * I[:, :d]).sum(-1) + U[:, d] + I[:, d] + self.fu(uf).squeeze(-1) + self.fi(itf).squeeze(-1) + self.bias


def plain_vocab(stream: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """A fixed vocabulary known in advance: the plain loop's advantage over a dynamic table."""
    users = {k: n for n, k in enumerate(sorted({e["user_id"] for e in stream}))}
    items = {k: n for n, k in enumerate(sorted({e["item_id"] for e in stream} | {h for e in stream for h in e["history"]}))}
    return users, items


def plain_tensors(chunk: list[dict[str, Any]], users: dict[str, int], items: dict[str, int], device: str):
    pad = len(items)
    hist = [[items[h] for h in e["history"]] + [pad] * (10 - len(e["history"])) for e in chunk]
    y = [event_label(e, 4.0) for e in chunk]
    return tuple(t.to(device) for t in (
        torch.tensor([users[e["user_id"]] for e in chunk]), torch.tensor([items[e["item_id"]] for e in chunk]),
        torch.tensor(hist), torch.tensor([e["user_features"] for e in chunk]),
        torch.tensor([e["item_features"] for e in chunk]), torch.tensor(y)))


def time_plain_loop(stream: list[dict[str, Any]], batch: int, device: str, args: argparse.Namespace,
                    stats: BinaryStats | None = None) -> float:
    """Same events, same model form, fixed vocabulary, torch's sparse embeddings + Adagrad; timed from the
    event dicts (tensorising each micro-batch is inside the loop, as it is for the update core). ``stats``:
    also collect the prequential scores of the timed batches (their cost is then timed too)."""
    users, items = plain_vocab(stream)
    f = FeatureConfig()
    torch.manual_seed(0)  # the same initial model every run: its prequential AUC is reproducible
    model = PlainModel(len(users), len(items), args.dim, f.user_width, f.item_width).to(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    lossf = nn.BCEWithLogitsLoss()

    def step(chunk, stats=None):
        u, i, h, uf, itf, y = plain_tensors(chunk, users, items, device)
        with torch.no_grad():  # prequential: score first
            scores = model(u, i, h, uf, itf)
        if stats is not None:
            stats.update(y.tolist(), torch.sigmoid(scores).tolist())
        opt.zero_grad(set_to_none=True)
        lossf(model(u, i, h, uf, itf), y).backward()
        opt.step()

    step(stream[:batch])  # warm-up: not timed, not scored
    sync(device)
    t = time.perf_counter()
    for s0 in range(batch, len(stream), batch):
        step(stream[s0 : s0 + batch], stats)
    sync(device)
    return time.perf_counter() - t


def time_river(stream: list[dict[str, Any]]) -> float:
    from bench.prequential import RiverMF

    model = RiverMF(4.0, 0)
    t = time.perf_counter()
    model.learn(stream)
    return time.perf_counter() - t


def time_pipeline(n: int, batch: int) -> tuple[float, dict[str, Any]]:
    import tempfile

    from pipelines import cli

    out = tempfile.mkdtemp(prefix="freshrec-bench-")
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["--output_dir", out, "--synthetic_events", str(n), "--batch_size", str(batch), "--shards", "2"])
    elapsed = time.perf_counter() - t
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert rc == 0
    return elapsed, summary


def pipeline_rates(n: int, batch: int, small: int = 2_000) -> dict[str, Any]:
    """The CLI on ``small`` then on ``n`` synthetic events in this process. End to end = n / (its run
    time, pipeline construction and runner start-up included; imports excluded, the small run paid
    them); marginal = (n - small) / (difference of the two run times): the per-event rate once the
    fixed costs are paid."""
    t_small, _ = time_pipeline(small, batch)
    t_n, summary = time_pipeline(n, batch)
    return {"events": n, "seconds": t_n, "end_to_end_events_per_s": n / t_n,
            "marginal_events_per_s": (n - small) / max(1e-9, t_n - t_small), "small_run_seconds": t_small,
            "summary_auc": summary["prequential"]["auc"], "applied": summary["events_applied"]}


def stage_breakdown(n: int, batch: int) -> dict[str, float]:
    """Seconds for the synthetic source alone, then up to CleanEvents, FeaturizeEvents and
    UpdateShardModels (outputs counted, not written): where the pipeline's time goes, step by step."""
    import apache_beam as beam

    from pipelines.freshrec_pipeline import ReadEvents, make_options
    from transforms.clean import CleanEvents
    from transforms.featurize import FeaturizeEvents
    from transforms.update import UpdateShardModels

    opts = make_options(["--synthetic_events", str(n), "--shards", "2", "--batch_size", str(batch)])
    cfg = pipeline_config(opts)
    out: dict[str, float] = {}
    for upto in ("source", "clean", "featurize", "update"):
        t = time.perf_counter()
        with beam.Pipeline(options=opts) as p:
            pc = p | "ReadEvents" >> ReadEvents(opts, cfg.layout)
            if upto != "source":
                pc = (pc | "CleanEvents" >> CleanEvents(cfg.sharding.shards, cfg.allowed_lateness_ms, cfg.dedupe_ttl_ms,
                                                        cfg.clean, cfg.sharding.key_groups))["events"]
            if upto in ("featurize", "update"):
                pc = pc | "FeaturizeEvents" >> FeaturizeEvents(cfg.feature, cfg.state_ttl_ms, cfg.sharding.key_groups)
            if upto == "update":
                pc = (pc | "UpdateShardModels" >> UpdateShardModels(cfg.learner, cfg.update, cfg.sharding.shards))["scores"]
            if upto in ("clean", "featurize"):  # micro-batches: count their events
                pc = pc | "BatchSizes" >> beam.Map(len)
            pc | "Count" >> beam.combiners.Count.Globally()
        out[upto] = time.perf_counter() - t
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--pipeline_events", type=int, default=100_000, help="0 skips the full DirectRunner pipeline")
    ap.add_argument("--no_river", action="store_true")
    ap.add_argument("--gc_baseline", action="store_true",
                    help="also run the pipeline first with the default garbage collector settings (see transforms.runtime)")
    ap.add_argument("--stage_breakdown", action="store_true", help="also time the pipeline up to each of its steps")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for every model (the same for all)")
    add_flags(ap, ("model",), skip=("mode", "flush_interval_s", "top_k", "device", "seed"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    args.batch = args.batch_size
    torch.set_num_threads(args.threads)
    stream = make_stream(args.events, args.negatives, seed=1)
    per_event = 1 + args.negatives
    ex_batch = args.batch * per_event
    results: dict[str, Any] = {"events": args.events, "examples": len(stream), "batch_events": args.batch}
    print(f"{args.events} events ({len(stream)} examples with {args.negatives} negatives each), micro-batch {args.batch} events")
    for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"  {device}: not available on this machine, skipped")
            continue
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} thread)"
        plain = time_plain_loop(stream, ex_batch, device, args)
        core = time_update_core(stream, ex_batch, device, args)
        n = args.events * (1 - args.batch / max(1, args.events))
        results[device] = {"device": name, "plain_torch_events_per_s": n / plain, "update_core_events_per_s": n / core,
                           "core_vs_plain": plain / core}
        print(f"  {device} [{name}]: plain torch loop {n / plain:9.0f} events/s | update core {n / core:9.0f} events/s "
              f"| core/plain = {plain / core:.2f}x")
        gc.collect()
    if not args.no_river:
        r = time_river(stream)
        results["river_events_per_s"] = args.events / r
        base = results.get("cpu", {}).get("plain_torch_events_per_s")
        print(f"  River BiasedMF (CPU, one example at a time): {args.events / r:9.0f} events/s"
              + (f" | vs plain torch on CPU = {args.events / r / base:.2f}x" if base else ""))
    if args.pipeline_events:
        if args.gc_baseline:  # first, so that the default collector runs before any tuning in this process
            os.environ[GC_TUNING_ENV] = "0"
            try:
                results["pipeline_default_gc"] = pipeline_rates(args.pipeline_events, args.batch)
            finally:
                del os.environ[GC_TUNING_ENV]
        rates = pipeline_rates(args.pipeline_events, args.batch)
        results["pipeline"] = rates
        base = results.get("cpu", {}).get("plain_torch_events_per_s")
        for label, key in (("end to end", "end_to_end_events_per_s"), ("marginal (fixed costs removed)", "marginal_events_per_s")):
            eps = rates[key]
            print(f"  full DirectRunner pipeline (synthetic, {args.pipeline_events} events, 2 shards, CPU), {label}: "
                  f"{eps:9.0f} events/s" + (f" | vs plain torch on CPU = {eps / base:.3f}x" if base else ""))
        if args.gc_baseline:
            default = results["pipeline_default_gc"]["end_to_end_events_per_s"]
            print(f"  the same pipeline with the interpreter's default garbage collector ({GC_TUNING_ENV}=0): "
                  f"{default:9.0f} events/s | tuned/default = {rates['end_to_end_events_per_s'] / default:.2f}x")
    if args.stage_breakdown:
        stages = stage_breakdown(args.pipeline_events or 100_000, args.batch)
        results["stage_seconds"] = stages
        prev = 0.0
        print("  pipeline up to each step (synthetic source, outputs counted not written):")
        for name, secs in stages.items():
            print(f"    {name:10s} {secs:6.1f} s cumulative, +{secs - prev:5.1f} s")
            prev = secs
    results["peak_rss_mb"] = peak_rss_mb()
    print(f"  peak resident memory of this process: {results['peak_rss_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
