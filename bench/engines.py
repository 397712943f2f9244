"""Engines benchmark: the same events through the Beam pipeline on the DirectRunner, the native PyFlink job on
a standalone Flink cluster (separate JobManager and TaskManager JVMs on localhost, scripts/flink_cluster.sh)
at parallelism 1 and 2, a plain single-thread torch loop, and the runner-free core alone, in one invocation.

Every engine reads one JSON-lines file of raw events (the synthetic stream, or ``--data`` exported as
``freshrec export`` does) with the same model flags. events/s = input events / the engine's own run time: the
DirectRunner pipeline's (``freshrec: pipeline finished in``, construction included), the Flink job's ``Job
Runtime`` (cluster start-up is reported apart, as ``cluster_start_s``), the plain loop's training loop. AUC is
each run's prequential AUC (score a micro-batch, then learn it). Peak RSS: the DirectRunner process's own peak;
for Flink, the sampled peak of the summed resident memory of the cluster's JVMs, their Python workers and the
submitting client; the plain loop runs in this process (its peak is this process's). CPU seconds (``cpu_s``):
the JVMs' and the Python processes' while the engine ran (the DirectRunner: its one process).

The runner-free row (``core``) runs what every engine's steps call (decode, dedupe, features, micro-batch
flushes, score and delta records), inline on one thread in this process: the most one core gets from this
model, which tells the engines' own costs apart from the model's. The floor rows (``flink-floor-pN``, not run
by default) are the other bound: the Flink job's shape on the same cluster with nothing in its steps
(bench/flink_floor.py), what PyFlink alone costs per event; ``flink-floor-blocks-pN``, the same with the events
moved in blocks of ``--floor_block`` (the job's one design lever left). ``flink-arrival-pN`` (not run by default)
is the job with its micro-batches cut in arrival order (``--arrival_order``), not in event-time order.

The plain loop is ``bench/throughput.py``'s: the same model form on nn.Embedding tables with a vocabulary
known in advance, Adagrad, micro-batches of ``--batch_size`` events each with ``--negatives`` sampled
negatives, no state, deltas, gate or checkpoints. Sync of the shards is off in every engine (the DirectRunner
turns it off for a bounded run itself): ``--sync`` turns it on in the Beam pipeline (run as a stream) and the
Flink job, whose ticks then differ in timing, so their AUCs are not expected to match.

    python -m bench.engines --events 20000 --json bench/results/engines.json
    python -m bench.engines --data ../shared/datasets/movielens-100k --limit 20000 --json /tmp/engines-ml.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pipelines.flink_cluster import FlinkCluster
from pipelines.results import count_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_PY = os.path.join(ROOT, ".venv", "bin", "python")
# every engine's name, once: the Flink rows carry their shape (floor, blocks, arrival order) and parallelism in it
ENGINE = re.compile(r"direct|plain_torch|core"
                    r"|flink-(?:(?P<floor>floor-(?P<blocks>blocks-)?)|(?P<arrival>arrival-))?p(?P<parallelism>[1-9]\d*)")


def write_events(args: argparse.Namespace, path: str) -> int:
    """The run's input, as JSON lines; the number of lines."""
    if args.data:
        from pipelines.export import export

        return export(argparse.Namespace(data=args.data, data_format=None, columns=None, time_unit=None,
                                         limit=args.limit), path)[0]
    from core.readers import embedded_stream, synthetic_events
    from pipelines.export import write_jsonl

    return write_jsonl(synthetic_events(embedded_stream(args.events, args.seed)), path)


def process_tree(roots: list[int]) -> dict[int, int]:
    """``roots`` and all their descendants (from /proc): pid -> VmRSS in kB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as fh:
                text = fh.read()
        except OSError:
            continue
        pid, ppid = int(re.search(r"^Pid:\s+(\d+)", text, re.M)[1]), int(re.search(r"^PPid:\s+(\d+)", text, re.M)[1])
        children.setdefault(ppid, []).append(pid)
        found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        rss[pid] = int(found[1]) if found else 0
    tree: dict[int, int] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree[pid] = rss.get(pid, 0)
            todo.extend(children.get(pid, []))
    return tree


def cpu_of(pid: int) -> tuple[str, float] | None:
    """("jvm" or "python", CPU seconds the process has used so far), from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            program = os.path.basename(fh.read().split(b"\0", 1)[0].decode(errors="replace"))
    except (OSError, IndexError):
        return None
    kind = "jvm" if program == "java" else "python" if program.startswith("python") else "other"
    return kind, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessTreeSampler(threading.Thread):
    """Samples the process tree of ``pids()`` every ``every_s`` until stopped: ``peak`` holds the largest summed
    RSS, ``cpu_s()`` the CPU seconds its JVMs and its Python processes used while it ran (the cluster's daemons
    count from the first sample: what they used before, starting up or for an earlier job, is left out)."""

    def __init__(self, pids, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pids, self.every_s, self.peak, self.done = pids, every_s, 0.0, threading.Event()
        self.first: dict[int, float] | None = None
        self.last: dict[int, tuple[str, float]] = {}

    def run(self) -> None:
        while not self.done.is_set():
            tree = process_tree(self.pids())
            self.peak = max(self.peak, sum(tree.values()) / 1024.0)
            for pid in tree:
                now = cpu_of(pid)
                if now is not None:
                    self.last[pid] = now
            if self.first is None:
                self.first = {pid: cpu for pid, (_, cpu) in self.last.items()}
            self.done.wait(self.every_s)

    def cpu_s(self) -> dict[str, float]:
        used: dict[str, float] = {"jvm": 0.0, "python": 0.0}
        for pid, (kind, cpu) in self.last.items():
            if kind in used:
                used[kind] += cpu - (self.first or {}).get(pid, 0.0)
        return {kind: round(cpu, 1) for kind, cpu in used.items()}


def model_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--shards", str(args.shards), "--batch_size", str(args.batch_size), "--negatives", str(args.negatives)]
    return flags if args.sync else [*flags, "--no_sync"]


def run_direct(args: argparse.Namespace, events: str, work: str) -> dict[str, Any]:
    out = os.path.join(work, "direct")
    cmd = [MAIN_PY, "-m", "pipelines.cli", "--data", events, "--output_dir", out, "--progress_s", "0",
           *model_flags(args), *(["--streaming"] if args.sync else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = re.search(r"pipeline finished in ([\d.]+)s", printed)
    if proc.returncode or seconds is None:
        raise RuntimeError(f"DirectRunner run failed ({proc.returncode}):\n{printed[-2000:]}")
    return {"engine": "direct", "seconds": float(seconds[1]), "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "cpu_s": {"jvm": 0.0, "python": round(usage.ru_utime + usage.ru_stime, 1)}, **summary_of(out)}


def summary_of(out: str) -> dict[str, Any]:
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    return {"auc": summary["prequential"]["auc"], "applied": summary["events_applied"],
            "dead_lettered": summary["events_dead_lettered"]}


def run_flink(args: argparse.Namespace, cluster: FlinkCluster, name: re.Match[str], events: str, work: str) -> dict[str, Any]:
    """flink-pN: the job at parallelism N; flink-arrival-pN: the same with ``--arrival_order``; flink-floor[-blocks]-pN:
    bench/flink_floor.py (the job's shape, empty steps; events in blocks). ``name``: the engine's name as ``ENGINE``
    matched it."""
    engine, floor, parallelism = name[0], name["floor"] is not None, int(name["parallelism"])
    out, ck = os.path.join(work, engine), os.path.join(work, f"ck-{engine}")
    job = ["--py", os.path.join(ROOT, "bench", "flink_floor.py")] if floor else []
    flags = ["--shards", str(args.shards)] if floor else ["--checkpoint_dir", ck, "--quiet", *model_flags(args)]
    if name["blocks"]:
        flags += ["--block", str(args.floor_block)]
    if name["arrival"]:
        flags += ["--arrival_order"]
    cmd = ["bash", cluster.script, "submit", "--parallelism", str(parallelism), *job, "--", "--input", events,
           "--output", out, *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = ProcessTreeSampler(lambda: [*cluster.daemon_pids(), proc.pid])
    sampler.start()
    printed, _ = proc.communicate(timeout=3600)
    sampler.done.set()
    sampler.join()
    runtime = re.search(r"Job Runtime: (\d+) ms", printed)
    if proc.returncode or runtime is None:
        raise RuntimeError(f"Flink run {engine} failed ({proc.returncode}):\n{printed[-3000:]}")
    if floor:  # every input line comes out as its event id, in the committed parts of the sink's buckets
        through = sum(count_lines(bucket) for bucket in glob.glob(os.path.join(out, "*")))
        outcome: dict[str, Any] = {"auc": None, "applied": through, "dead_lettered": 0}
    else:
        outcome = summary_of(out)
    return {"engine": engine, "seconds": int(runtime[1]) / 1000.0, "peak_rss_mb": sampler.peak,
            "cpu_s": sampler.cpu_s(), **outcome}


def run_plain(args: argparse.Namespace, events: str) -> dict[str, Any]:
    """The plain torch loop over the valid, distinct events of the file (featurized and given negatives up
    front, as in bench/throughput.py), with its prequential AUC."""
    import resource

    import torch

    from bench.throughput import make_stream, time_plain_loop
    from core.cleaning import InvalidEvent, validate_event
    from model.metrics import BinaryStats

    torch.set_num_threads(1)
    valid, seen = [], set()
    with open(events) as fh:
        for line in fh:
            try:
                event = validate_event(json.loads(line))
            except (InvalidEvent, ValueError):
                continue
            if event["event_id"] not in seen:
                seen.add(event["event_id"])
                valid.append(event)
    stream = make_stream(len(valid), args.negatives, seed=1, events=valid)
    stats = BinaryStats()
    loop_args = argparse.Namespace(dim=args.dim, lr=args.lr)
    seconds = time_plain_loop(stream, args.batch_size * (1 + args.negatives), "cpu", loop_args, stats)
    n = len(valid) * (1 - args.batch_size / max(1, len(valid)))  # the first batch warms up, untimed
    return {"engine": "plain_torch", "seconds": seconds * len(valid) / n, "auc": round(stats.auc(), 5),
            "applied": len(valid), "dead_lettered": 0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_core(args: argparse.Namespace, events: str) -> dict[str, Any]:
    """The runner-free core that every engine's steps call, inline on one thread in this process, over the same
    file: decode, dedupe, item and user features (``GroupStates`` per key group, as the keyed steps keep them),
    ``flush_micro_batch`` per shard (snapshots as the Flink job's default), score and delta records as JSON. No
    runner, no state backend, no lateness gate: the ceiling of what one core does with this model."""
    import resource

    from core.cleaning import InvalidEvent, decode_event
    from core.featurizers import ItemPopularity, UserFeaturizer
    from core.keyed_state import GroupStates, key_group
    from core.settings import add_flags, pipeline_config
    from model.hashing import shard_of
    from model.journal import flush_micro_batch, new_meta
    from model.learner import IncrementalLearner
    from model.metrics import BinaryStats

    flags = argparse.ArgumentParser()
    add_flags(flags, ("model", "stability", "state", "sharding"))
    cfg = pipeline_config(flags.parse_args(model_flags(args)))
    groups, shards, batch = cfg.sharding.key_groups, cfg.sharding.shards, cfg.update.shard_batch_size
    with open(events) as fh:
        lines = fh.read().splitlines()
    seen: dict[int, Any] = {}
    featurizers = (("item_id", {}, ItemPopularity(cfg.feature)), ("user_id", {}, UserFeaturizer(cfg.feature)))
    buffers, metas, live, stats = [[] for _ in range(shards)], [new_meta() for _ in range(shards)], {}, BinaryStats()
    counts = {"applied": 0, "dead_lettered": 0, "bytes_out": 0}

    def flush(shard: int) -> None:  # a learner sets its one torch thread itself (LearnerConfig.cpu_threads)
        done = flush_micro_batch(cfg.learner, shard, buffers[shard], metas[shard], lambda: (None, []), live, shard,
                                 cfg.update.top_k, 5, emit_time_ms=int(time.time() * 1000))
        counts["bytes_out"] += len("\n".join(json.dumps(r) for r in done.scores + done.deltas))
        stats.update(done.result.labels, done.result.probs)
        counts["applied"] += len(buffers[shard])
        buffers[shard] = []

    IncrementalLearner(cfg.learner)  # untimed, as the pipeline warms it: the first learner's imports (~2 s)
    t = time.perf_counter()
    for line in lines:
        try:
            event = decode_event(json.loads(line), cfg.clean)
        except (InvalidEvent, ValueError):
            counts["dead_lettered"] += 1
            continue
        # each keyed step as its adapters run it: the group's handling, then its TTL sweep
        group = seen.setdefault(key_group(event["event_id"], groups), GroupStates.new())
        duplicate = GroupStates.seen(group, event["event_id"], event["event_time_ms"], cfg.dedupe_ttl_ms)
        GroupStates.sweep(group, cfg.dedupe_ttl_ms)
        if duplicate:
            counts["dead_lettered"] += 1
            continue
        for key, table, featurizer in featurizers:
            group = table.setdefault(key_group(event[key], groups), GroupStates.new())
            event = featurizer.annotate(group, event, cfg.state_ttl_ms)
            GroupStates.sweep(group, cfg.state_ttl_ms)
        shard = shard_of(event["user_id"], shards)
        buffers[shard].append(event)
        if len(buffers[shard]) >= batch:
            flush(shard)
    for shard in range(shards):
        if buffers[shard]:
            flush(shard)
    return {"engine": "core", "seconds": time.perf_counter() - t, "auc": round(stats.auc(), 5), **counts,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def make_parser() -> argparse.ArgumentParser:
    from core.settings import DEFAULTS, HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="synthetic events (without --data)")
    ap.add_argument("--data", default=None, help="a dataset the CLI reads, instead of the synthetic stream")
    ap.add_argument("--limit", type=int, default=None, help="with --data: its first N events in time order")
    ap.add_argument("--engines", default="direct,flink-p1,flink-p2,plain_torch,core",
                    help="which to run: direct, flink-pN (the job at parallelism N), flink-arrival-pN (the same, its "
                         "micro-batches cut in arrival order: --arrival_order), flink-floor-pN (its shape with "
                         "empty steps: bench/flink_floor.py), flink-floor-blocks-pN (the same, events in blocks), "
                         "plain_torch, core (the runner-free core)")
    ap.add_argument("--floor_block", type=int, default=2048, help="events per block of the flink-floor-blocks-pN rows")
    ap.add_argument("--shards", type=int, default=DEFAULTS["shards"])
    ap.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--negatives", type=int, default=DEFAULTS["negatives"])
    ap.add_argument("--dim", type=int, default=DEFAULTS["dim"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="shards sync their shared rows (Beam then runs as a stream)")
    ap.add_argument("--json", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    names = {e: ENGINE.fullmatch(e) for e in engines}
    unknown = [e for e, name in names.items() if name is None]
    if unknown:
        ap.error(f"--engines: unknown {', '.join(unknown)} (direct, flink-pN, flink-floor-pN, flink-floor-blocks-pN, "
                 "plain_torch, core)")
    if args.floor_block < 1:
        ap.error("--floor_block must be >= 1")
    work = tempfile.mkdtemp(prefix="freshrec-engines-")
    events = os.path.join(work, "events.jsonl")
    n = write_events(args, events)
    print(f"{n} events ({args.data or 'synthetic'}), {args.shards} shards, batch {args.batch_size} events "
          f"(+{args.negatives} negatives each), sync {'on' if args.sync else 'off'}; work folder {work}", flush=True)
    result: dict[str, Any] = {"events": n, "shards": args.shards, "batch_size": args.batch_size,
                              "negatives": args.negatives, "sync": args.sync, "cpus": os.cpu_count(), "runs": []}
    if "direct" in engines:
        result["runs"].append(run_direct(args, events, work))
    flinks = [name for name in names.values() if name is not None and name["parallelism"]]
    if flinks:
        cluster = FlinkCluster(work)
        t = time.perf_counter()
        cluster("up", "--taskmanagers", "2", "--slots", "1")
        result["cluster_start_s"] = round(time.perf_counter() - t, 1)
        print(f"standalone cluster (1 JobManager, 2 TaskManagers x 1 slot) up in {result['cluster_start_s']} s", flush=True)
        try:
            for name in flinks:
                result["runs"].append(run_flink(args, cluster, name, events, work))
        finally:
            cluster("down")
    if "plain_torch" in engines:
        result["runs"].append(run_plain(args, events))
    if "core" in engines:
        result["runs"].append(run_core(args, events))
    report(result, n)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def report(result: dict[str, Any], n: int) -> None:
    runs = result["runs"]
    for run in runs:
        run["events_per_s"] = round(n / run["seconds"], 1)
    by = {r["engine"]: r for r in runs}
    for run in runs:
        ratios = " | ".join(f"{run['events_per_s'] / by[b]['events_per_s']:.2f}x {b}" for b in ("plain_torch", "direct")
                            if b in by and b != run["engine"])
        auc = f"AUC {run['auc']:.4f}" if run["auc"] is not None else "AUC n/a"
        auc_vs = f" ({run['auc'] / by['direct']['auc']:.3f}x direct)" if "direct" in by and run["auc"] and by["direct"]["auc"] else ""
        cpu = f"; CPU {run['cpu_s']['jvm']:.0f} s JVM + {run['cpu_s']['python']:.0f} s Python" if "cpu_s" in run else ""
        print(f"  {run['engine']:22s} {run['events_per_s']:9.0f} events/s  {ratios:32s} {auc}{auc_vs}  "
              f"peak RSS {run['peak_rss_mb']:.0f} MB  ({run['seconds']:.1f} s; applied {run['applied']}{cpu})")


if __name__ == "__main__":
    sys.exit(main())
