"""A run's outputs, read back: paths, totals of windowed summaries, dead-letter examples, and
``freshrec show OUT`` (the summary as a table, a user's latest scores, dead letters, rollbacks, alerts).

Beam-free: it reads the Avro files and JSON summaries a run wrote, with fastavro.

    freshrec show out                       # the summary, dead letters by reason, rollbacks, alerts
    freshrec show out --user u42            # that user's latest top-K, model version and event time
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import fastavro

from core.cleaning import REDELIVERED
from core.settings import HelpFormatter

SCORES, DELTAS, ROLLBACKS, ALERTS, DEAD_LETTER, STATS = "scores", "deltas", "rollbacks", "alerts", "dead_letter", "stats"
TOTALLED = ("events_applied", "events_dead_lettered", "events_accounted", "flushes", "rollbacks",
            "scores_written", "deltas_written", "events_not_learned", "alerts")


def output_paths(output_dir: str) -> dict[str, str]:
    return {
        SCORES: os.path.join(output_dir, "scores"),
        DELTAS: os.path.join(output_dir, "deltas"),
        ROLLBACKS: os.path.join(output_dir, "rollbacks"),
        ALERTS: os.path.join(output_dir, "alerts"),
        DEAD_LETTER: os.path.join(output_dir, "dead_letter"),
        STATS: os.path.join(output_dir, "stats"),  # one window_stats record per --stats_window_s
        "summary": os.path.join(output_dir, "summary.json"),
        "summaries": os.path.join(output_dir, "summaries"),  # one per window when --output_window_s is set
    }


def clear_outputs(paths: dict[str, str]) -> None:
    """Remove what an earlier run left at exactly our output paths (never anything else)."""
    for path in paths.values():
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.unlink(path)


def remove_temp_dirs(paths: dict[str, str]) -> None:
    """Beam's file writes stage files in ``.temp*`` folders; what is left of them after a run goes."""
    for path in paths.values():
        for tmp in glob.glob(os.path.join(path, ".temp*")):
            shutil.rmtree(tmp, ignore_errors=True)


def count_lines(path: str) -> int:
    """Lines of a file, or of the files in a folder (not hidden or ``_`` ones, as Flink's FileSource skips, and
    as its FileSink keeps its in-progress parts hidden)."""
    files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
    n = 0
    for name in files:
        if os.path.isfile(name) and not os.path.basename(name).startswith((".", "_")):
            with open(name, "rb") as fh:
                n += sum(1 for _ in fh)  # blank lines too: each is read, and dead-lettered
    return n


def records(directory: str) -> Iterator[dict[str, Any]]:
    """The records under an output folder: the Beam pipeline's Avro files, or the PyFlink job's committed
    JSON-lines part files (``BUCKET/part-*``; in-progress ones are hidden, ``.part-*``)."""
    for path in sorted(glob.glob(os.path.join(directory, "*.avro"))):
        with open(path, "rb") as fh:
            yield from fastavro.reader(fh)  # type: ignore[misc]
    for path in sorted(glob.glob(os.path.join(directory, "*", "part-*"))):
        with open(path, encoding="utf-8") as fh:
            yield from (json.loads(line) for line in fh if line.strip())


def window_totals(directory: str) -> dict[str, Any]:
    """Sums over the per-window summaries of a windowed run."""
    out: dict[str, Any] = {"windows": 0, **{k: 0 for k in TOTALLED}, "dead_letter_by_reason": {}}
    for path in sorted(glob.glob(os.path.join(directory, "window-*.json"))):
        with open(path) as fh:
            w = json.load(fh)
        out["windows"] += 1
        for key in TOTALLED:
            out[key] += w.get(key, 0)
        for reason, n in w["dead_letter_by_reason"].items():
            out["dead_letter_by_reason"][reason] = out["dead_letter_by_reason"].get(reason, 0) + n
    return out


def dead_letter_examples(directory: str, top: int = 5) -> list[tuple[str, int, str]]:
    """(reason, count, first example's payload, shortened) for the ``top`` most frequent reasons."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for rec in records(directory):
        reason = rec["reason"]
        counts[reason] += 1
        if reason not in example:
            raw = rec["raw"].decode("utf-8", "replace") if isinstance(rec["raw"], bytes) else str(rec["raw"])
            example[reason] = raw if len(raw) <= 120 else raw[:117] + "..."
    return [(reason, n, example[reason]) for reason, n in counts.most_common(top)]


def load_summary(output_dir: str) -> dict[str, Any] | None:
    paths = output_paths(output_dir)
    if os.path.exists(paths["summary"]):
        with open(paths["summary"]) as fh:
            return json.load(fh)
    if os.path.isdir(paths["summaries"]):
        return window_totals(paths["summaries"])
    return None


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def show(output_dir: str, user: str | None = None, shard: int | None = None) -> int:
    paths = output_paths(output_dir)
    summary = load_summary(output_dir)
    if summary is None:
        print(f"freshrec show: no summary under {output_dir} (is it a run's --output_dir?)")
        return 2
    rows = [(k, summary[k]) for k in ("events_in", *TOTALLED, "optimizer_steps", "steps_skipped_nonfinite")
            if k in summary]
    pre = summary.get("prequential") or {}
    rows += [("prequential AUC", pre.get("auc")), ("prequential logloss", pre.get("logloss"))] if pre else []
    for s, v in sorted((summary.get("model_versions") or {}).items(), key=lambda kv: int(kv[0])):
        if shard is None or int(s) == shard:
            rows.append((f"shard {s}", f"version {v}, rows {summary.get('table_rows', {}).get(s)}"))
    print(f"run summary ({output_dir}):\n" + _table(rows))
    dead = dead_letter_examples(paths[DEAD_LETTER]) if os.path.isdir(paths[DEAD_LETTER]) else []
    if dead:
        print("dead letters by reason (count, first example):")
        for reason, n, raw in dead:
            print(f"  {n:>8,}  {reason}\n            e.g. {raw}")
    rollbacks = list(records(paths[ROLLBACKS])) if os.path.isdir(paths[ROLLBACKS]) else []
    for rb in rollbacks:
        if shard is None or rb["shard"] == shard:
            print(f"rollback: shard {rb['shard']} rejected version {rb['rejected_version']} (logloss "
                  f"{rb['candidate_logloss']:.4f} vs {rb['good_logloss']:.4f}), restored {rb['restored_version']} "
                  f"as {rb['new_version']}: {rb['reason']}")
    alerts = list(records(paths[ALERTS])) if os.path.isdir(paths[ALERTS]) else []
    for al in alerts:
        if shard is None or al["shard"] in (shard, -1):
            print(f"alert ({al['severity']}): {al['signal']} = {al['value']:g} (baseline {al['baseline']:g}, "
                  f"{al['detector']}), event time {al['window_start_ms']}-{al['window_end_ms']} ms: {al['message']}")
    if user is not None:
        latest = None
        for rec in records(paths[SCORES]):
            if rec["user_id"] == user and (latest is None or rec["sequence"] > latest["sequence"]):
                latest = rec
        if latest is None:
            print(f"user {user}: no scores in {paths[SCORES]}")
            return 1
        print(f"user {user}: shard {latest['shard']}, model version {latest['model_version']}, "
              f"event time {latest['event_time_ms']} ms, emitted {latest['emit_time_ms']} ms")
        for n, item in enumerate(latest["items"], 1):
            print(f"  {n:>3}. {item['item_id']:<24} {item['score']:.4f}")
    return 0


def show_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="freshrec show", description=__doc__,
                                 formatter_class=HelpFormatter, allow_abbrev=False)
    ap.add_argument("output_dir", help="a run's --output_dir")
    ap.add_argument("--user", default=None, help="also print this user's latest scores")
    ap.add_argument("--shard", type=int, default=None, help="only this shard's versions and rollbacks")
    args = ap.parse_args(argv)
    return show(args.output_dir, args.user, args.shard)


def check_dead_letter_fraction(summary: dict[str, Any], limit: float, dead_dir: str) -> int:
    """1 (and the most frequent reasons) if more than ``limit`` of the events were dead-lettered as bad input:
    the redeliveries a resumed run refuses as already applied are not."""
    redelivered = summary.get("dead_letter_by_reason", {}).get(REDELIVERED.split(":")[0], 0)
    total, dead = summary.get("events_accounted", 0) - redelivered, summary.get("events_dead_lettered", 0) - redelivered
    if not total or dead / total <= limit:
        return 0
    print(f"freshrec: {dead / total:.1%} of {total:,} events were dead-lettered (more than "
          f"--max_dead_letter_fraction {limit}); the most frequent reasons:", file=sys.stderr)
    for reason, n, raw in dead_letter_examples(dead_dir) if os.path.isdir(dead_dir) else []:
        print(f"  {n:>8,}  {reason}  e.g. {raw}", file=sys.stderr)
    return 1
