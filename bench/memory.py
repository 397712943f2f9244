"""Memory: peak resident memory of whole CLI runs (reader to summary) over the synthetic stream, at two
input sizes, so that a run's memory is seen not to grow with its input.

    python -m bench.memory                                   # 100,000 and 1,000,000 events, default flags
    python -m bench.memory --events 100000,1000000 --batch_baseline --json bench/results/memory.json
    python -m bench.memory --sync_keep_baseline             # and the sync folder kept whole (--sync_keep_s 0)

Each run is a fresh process (``python -m pipelines.cli --synthetic_events N --quiet``, default flags
otherwise: a bounded run over ``--batch_max_events`` runs as a flow-controlled stream); its peak RSS is
the process's own high-water mark (``getrusage``). ``--batch_baseline`` also runs the largest size on
the batch engine (``--batch_max_events`` above it), which holds each step's whole output;
``--sync_keep_baseline`` runs the stream at each size keeping every sync publication. Printed: peak RSS,
seconds, events/s and what the sync folder holds at the end per run, each run's peak as a ratio to the
smallest default run's, and the sync folder as a ratio to the one kept whole.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(argv: list[str]) -> int:
    """Run the CLI in this process, then print its peak RSS (MB) and exit code as one JSON line."""
    sys.path.insert(0, ROOT)
    from pipelines import cli

    code = cli.main(argv)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("BENCH_MEMORY " + json.dumps({"peak_rss_mb": round(peak_mb, 1), "exit": code}), flush=True)
    return code


def measure(events: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="freshrec-mem-") as out:
        argv = ["--synthetic_events", str(events), "--output_dir", out, "--quiet", *extra]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", *argv], cwd=ROOT, capture_output=True,
                              text=True)
        seconds = time.monotonic() - started
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"bench.memory: the run of {events:,} events failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip().splitlines()[-1:] or ''}")
        with open(os.path.join(out, "summary.json")) as fh:
            summary = json.load(fh)
        synced = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(out, "sync")) for f in files]
        sync_mb = sum(os.path.getsize(f) for f in synced) / 2**20
    streamed = "flow-controlled stream" in proc.stderr
    return {"events": events, "engine": "stream" if streamed else "batch", "peak_rss_mb": json.loads(line[13:])["peak_rss_mb"],
            "seconds": round(seconds, 1), "events_per_s": round(events / seconds), "events_in": summary["events_in"],
            "events_accounted": summary["events_accounted"], "sync_files": len(synced), "sync_mb": round(sync_mb, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(prog="bench.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", default="100000,1000000", help="comma-separated input sizes (default: 100000,1000000)")
    ap.add_argument("--batch_baseline", action="store_true", help="also run the largest size on the batch engine")
    ap.add_argument("--sync_keep_baseline", action="store_true",
                    help="also run the stream at each size keeping every sync publication (--sync_keep_s 0)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    sizes = sorted(int(n) for n in args.events.split(","))
    runs = []

    def run(n: int, flags: str, extra: list[str]) -> dict:
        same = next((r for r in runs if r["events"] == n and r["engine"] == "stream" and flags == "stream"), None)
        r = dict(same, flags=flags) if same else {**measure(n, extra), "flags": flags}
        runs.append(r)
        print(f"{n:>10,} events  {flags:9s} {r['engine']:6s}  peak {r['peak_rss_mb']:8.1f} MB  {r['seconds']:7.1f} s  "
              f"{r['events_per_s']:>7,} events/s  sync folder {r['sync_files']:>6,} files {r['sync_mb']:7.1f} MB", flush=True)
        return r

    default = [run(n, "default", []) for n in sizes]
    stream = [run(n, "stream", ["--batch_max_events", "0"]) for n in sizes]  # the same engine at every size
    batch = run(sizes[-1], "batch", ["--batch_max_events", str(sizes[-1])]) if args.batch_baseline else None
    keep_all = [run(n, "keep_sync", ["--batch_max_events", "0", "--sync_keep_s", "0"]) for n in sizes] \
        if args.sync_keep_baseline else []
    result = {"runs": runs,
              "largest_to_smallest_peak": round(default[-1]["peak_rss_mb"] / default[0]["peak_rss_mb"], 3),
              "largest_to_smallest_peak_stream": round(stream[-1]["peak_rss_mb"] / stream[0]["peak_rss_mb"], 3)}
    print(f"peak RSS, {sizes[-1]:,} events / {sizes[0]:,} events: default flags {result['largest_to_smallest_peak']:.3f}x, "
          f"both as a stream {result['largest_to_smallest_peak_stream']:.3f}x")
    if batch is not None:
        result["batch_largest_to_default_smallest_peak"] = round(batch["peak_rss_mb"] / default[0]["peak_rss_mb"], 3)
        print(f"the batch engine at {sizes[-1]:,} events / default flags at {sizes[0]:,}: "
              f"{result['batch_largest_to_default_smallest_peak']:.3f}x")
    for kept, streamed in zip(keep_all, stream, strict=True):
        ratio = streamed["sync_mb"] / kept["sync_mb"] if kept["sync_mb"] else float("nan")
        result.setdefault("sync_mb_to_keep_all", {})[str(kept["events"])] = round(ratio, 3)
        print(f"the sync folder at {kept['events']:,} events, kept to --sync_keep_s (default) / everything kept: {ratio:.3f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
