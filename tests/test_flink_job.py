"""The native PyFlink job on a local Flink mini-cluster, and its fault test: kill it mid-stream,
restart from the last retained checkpoint, and end with exactly the outputs and parameters of an
uninterrupted run (nothing lost, nothing applied twice).

The job runs with .venv-flink's Python (scripts/setup_flink.sh); skipped where that environment or
Java is absent."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest

from core.readers import SyntheticConfig, synthetic_events
from core.settings import learner_config
from model.deltas import ModelDelta
from model.learner import IncrementalLearner
from pipelines.report import main as report_main

pytestmark = pytest.mark.flink
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLINK_PY = os.path.join(ROOT, ".venv-flink", "bin", "python")
SHARDS, DIM = 2, 8


@pytest.fixture(scope="module")
def flink_python():
    if not os.path.exists(FLINK_PY):
        pytest.skip("PyFlink environment absent: run scripts/setup_flink.sh (apache-flink 2.3 needs its own venv)")
    if shutil.which("java") is None:
        pytest.skip("PyFlink needs Java (OpenJDK 17) on PATH")
    return FLINK_PY


@pytest.fixture(scope="module")
def events_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flink") / "events.jsonl"
    with open(path, "w") as fh:
        for e in synthetic_events(SyntheticConfig(events=1500, seed=11)):
            fh.write(json.dumps(e) + "\n")
    return str(path)


def job(python, events, out, ck, *extra):
    cmd = [python, "-m", "pipelines.flink_job", "--input", events, "--output", out, "--checkpoint_dir", ck,
           "--shards", str(SHARDS), "--dim", str(DIM), "--batch_size", "16", "--checkpoint_interval_ms", "500", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def committed(out_dir):
    """Records of committed part files only (in-progress files are hidden: '.part-…')."""
    recs = []
    for f in sorted(glob.glob(os.path.join(out_dir, "*", "part-*"))):
        with open(f) as fh:
            recs.extend(json.loads(line) for line in fh if line.strip())
    return recs


def parameters(records):
    """Apply the delta stream per shard in sequence order; the resulting parameters."""
    cfg = learner_config(argparse.Namespace(dim=DIM))
    by_shard = defaultdict(list)
    for r in records:
        if r["kind"] == "delta":
            by_shard[r["shard"]].append(r)
    out = {}
    for shard, deltas in by_shard.items():
        deltas.sort(key=lambda r: r["sequence"])
        assert [d["sequence"] for d in deltas] == list(range(1, len(deltas) + 1)), "delta sequence has a gap or repeat"
        learner = IncrementalLearner(cfg, shard)
        for d in deltas:
            learner.apply_delta(ModelDelta.from_record(d))
        out[shard] = learner.parameters_snapshot()
    return out


def latest_checkpoint(ck_dir):
    done = [p for p in glob.glob(os.path.join(ck_dir, "*", "chk-*")) if os.path.exists(os.path.join(p, "_metadata"))]
    return max(done, key=lambda p: int(p.rsplit("-", 1)[1])) if done else None


def test_killed_job_restored_from_checkpoint_equals_uninterrupted_run(flink_python, events_file, tmp_path):
    out_a, ck_a = str(tmp_path / "out_a"), str(tmp_path / "ck_a")
    printed = finish(job(flink_python, events_file, out_a, ck_a, "--progress_s", "1", "--no_sync"))
    progress_lines = [line for line in printed.splitlines() if line.startswith("freshrec-flink: ")]
    assert progress_lines and "applied" in progress_lines[-1] and "running AUC" in progress_lines[-1]
    a = committed(out_a)
    kinds_a = Counter(r["kind"] for r in a)
    assert kinds_a["score"] > 0 and kinds_a["delta"] > 0 and kinds_a["dead_letter"] > 0 and kinds_a["stats"] > 0
    windows = [r for r in a if r["kind"] == "stats"]  # the window statistics: every clean event, applied once
    assert sum(w["events"] for w in windows) == sum(w["applied"] for w in windows) > 0
    assert sum(sum(w["dead_letters"].values()) for w in windows) == kinds_a["dead_letter"]
    assert report_main([out_a, "--html", str(tmp_path / "flink.html")]) == 0  # freshrec report reads the job's output

    # run B: slowed down, killed (SIGKILL, whole process group) once a checkpoint is retained mid-stream
    out_b, ck_b = str(tmp_path / "out_b"), str(tmp_path / "ck_b")
    proc = job(flink_python, events_file, out_b, ck_b, "--throttle_ms", "20", "--no_sync")
    deadline = time.time() + 180
    chk = None
    while time.time() < deadline and proc.poll() is None:
        chk = latest_checkpoint(ck_b)
        if chk and int(chk.rsplit("-", 1)[1]) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run B finished before it could be killed mid-stream"
    assert chk, "no completed checkpoint within 180 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before_restore = Counter(r["kind"] for r in committed(out_b))
    assert sum(before_restore.values()) < sum(kinds_a.values()), "the kill must happen mid-stream"

    finish(job(flink_python, events_file, out_b, ck_b, "--restore_from", latest_checkpoint(ck_b), "--no_sync"))
    b = committed(out_b)
    assert Counter(r["kind"] for r in b) == kinds_a
    # processing times differ between runs: emit times, and a window's flush times and freshness lag
    timing = ("emit_time_ms", "first_emit_ms", "last_emit_ms", "freshness_lag_ms")
    key = lambda r: json.dumps({k: v for k, v in r.items() if k not in timing}, sort_keys=True)  # noqa: E731
    assert sorted(map(key, b)) == sorted(map(key, a)), "outputs differ from the uninterrupted run"
    assert parameters(b) == parameters(a)


def served_item_gaps(flink_python, events_file, out: str, ck: str, *extra: str) -> list[float]:
    """For each item both shards published: how far apart their last published copies are."""
    finish(job(flink_python, events_file, out, ck, "--sync_interval_s", "5", *extra))
    latest: dict[int, dict[str, list[float]]] = {}
    for r in sorted((r for r in committed(out) if r["kind"] == "delta" and r["table"] == "item"), key=lambda r: r["sequence"]):
        latest.setdefault(r["shard"], {}).update(zip(r["row_ids"], r["row_values"], strict=True))
    common = set.intersection(*(set(rows) for rows in latest.values()))
    assert len(latest) == SHARDS and common
    return sorted(max(abs(x - y) for x, y in zip(latest[0][k][: DIM + 1], latest[1][k][: DIM + 1], strict=True))
                  for k in common)


def test_the_shards_of_the_flink_job_sync_their_shared_rows(flink_python, events_file, tmp_path):
    """The same sync as the Beam steps (model.shard_sync over a folder): every shard publishes, and the
    shards serve much closer copies of the items than shards that learn alone (they may end a merge apart)."""
    ck = str(tmp_path / "ck")
    synced = served_item_gaps(flink_python, events_file, str(tmp_path / "out"), ck)
    published = [n for n in os.listdir(os.path.join(ck, "sync", "run")) if n.endswith(".sync")]
    assert {n.split("-")[1] for n in published} == {f"s{s:04d}" for s in range(SHARDS)}
    alone = served_item_gaps(flink_python, events_file, str(tmp_path / "out2"), str(tmp_path / "ck2"), "--no_sync")
    assert sum(g < 1e-5 for g in synced) >= 0.2 * len(synced), "hardly any item served alike by both shards"
    assert synced[len(synced) // 2] < 0.5 * alone[len(alone) // 2], (synced[len(synced) // 2], alone[len(alone) // 2])
