"""The native PyFlink job on a local Flink mini-cluster, and its fault test: kill it mid-stream,
restart from the last retained checkpoint, and end with exactly the outputs and parameters of an
uninterrupted run (nothing lost, nothing applied twice).

The job runs with .venv-flink's Python (scripts/setup_flink.sh); skipped where that environment or
Java is absent."""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter, defaultdict

import pytest

from core.readers import SyntheticConfig, synthetic_events
from core.settings import learner_config
from model.deltas import ModelDelta
from model.learner import IncrementalLearner
from pipelines.cli import main as cli_main
from pipelines.flink_cluster import FlinkCluster
from pipelines.report import main as report_main
from pipelines.results import records
from tests.helpers import learned_records, tied_ratings_csv

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
    """The job in-process on ``events`` (a JSON-lines file; None: the input is in ``extra``)."""
    cmd = [python, "-m", "pipelines.flink_job", *(["--input", events] if events else []), "--output", out, "--checkpoint_dir", ck,
           "--shards", str(SHARDS), "--dim", str(DIM), "--batch_size", "16", "--checkpoint_interval_ms", "500", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


# the job's output folders (the Beam pipeline's names) and the kind of record each holds
FOLDERS = {"scores": "score", "deltas": "delta", "rollbacks": "rollback", "alerts": "alert",
           "dead_letter": "dead_letter", "stats": "stats", "summary_parts": "summary"}


def committed(out_dir):
    """Records of committed part files only (in-progress files are hidden: '.part-…'), each with the kind
    of its folder."""
    recs = []
    for folder, kind in FOLDERS.items():
        recs.extend({"kind": kind, **r} for r in records(os.path.join(out_dir, folder)))
    assert not glob.glob(os.path.join(out_dir, "*", "part-*")), "part files outside the output folders"
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


@pytest.fixture(scope="module")
def uninterrupted(flink_python, events_file, tmp_path_factory):
    """One uninterrupted in-process run (no sync), the reference of the fault and cluster tests:
    (what it printed, its output folder)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    out, ck = str(base / "out"), str(base / "ck")
    return finish(job(flink_python, events_file, out, ck, "--progress_s", "1", "--no_sync")), out


# a slowed run's checkpoint barrier waits for what its Python steps were sent: small bundles keep that short
SMALL_BUNDLES = ("--bundle_size", "50", "--bundle_time_ms", "100")


def wait_for_checkpoint(proc: subprocess.Popen, ck: str, at_least: int, timeout_s: float = 180) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        chk = latest_checkpoint(ck)
        if chk and int(chk.rsplit("-", 1)[1]) >= at_least:
            return chk
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {at_least} while the job ran (exit {proc.poll()})")


def assert_equals_uninterrupted(out: str, uninterrupted_out: str) -> None:
    a, b = committed(uninterrupted_out), committed(out)
    assert Counter(r["kind"] for r in b) == Counter(r["kind"] for r in a)
    # processing times differ between runs: emit times, and a window's flush times and freshness lag
    timing = ("emit_time_ms", "first_emit_ms", "last_emit_ms", "freshness_lag_ms")
    key = lambda r: json.dumps({k: v for k, v in r.items() if k not in timing}, sort_keys=True)  # noqa: E731
    assert sorted(map(key, b)) == sorted(map(key, a)), "outputs differ from the uninterrupted run"
    assert parameters(b) == parameters(a)


def test_killed_job_restored_from_checkpoint_equals_uninterrupted_run(flink_python, events_file, uninterrupted, tmp_path):
    printed, out_a = uninterrupted
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
    proc = job(flink_python, events_file, out_b, ck_b, "--throttle_ms", "20", *SMALL_BUNDLES, "--no_sync")
    wait_for_checkpoint(proc, ck_b, 4)  # fails if run B ends first or no checkpoint completes within 180 s
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before_restore = Counter(r["kind"] for r in committed(out_b))
    assert sum(before_restore.values()) < sum(kinds_a.values()), "the kill must happen mid-stream"

    finish(job(flink_python, events_file, out_b, ck_b, "--restore_from", latest_checkpoint(ck_b), "--no_sync"))
    assert_equals_uninterrupted(out_b, out_a)


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


def test_a_quiet_shard_of_the_flink_job_publishes_on_event_time(flink_python, tmp_path):
    """Shard 1's users stop a third of the way in: its epoch ticks still publish (what it had pending, then
    that it has nothing) until the end of the stream, so shard 0's merges are not held back behind it."""
    from model.hashing import shard_of
    from model.sync import parse_name

    events = list(synthetic_events(SyntheticConfig(events=1500, seed=11, malformed_fraction=0, duplicate_fraction=0)))
    cut = events[len(events) // 3]["event_time_ms"]
    kept = [e for e in events if shard_of(e["user_id"], SHARDS) == 0 or e["event_time_ms"] <= cut]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    ck, interval_ms = str(tmp_path / "ck"), 60_000
    # throttled, in small bundles (a step's watermark moves as its bundles end), so that the watermark moves
    # during the run, as in a stream
    finish(job(flink_python, str(path), str(tmp_path / "out"), ck, "--sync_interval_s", str(interval_ms // 1000),
               "--throttle_ms", "8", *SMALL_BUNDLES, "--quiet"))
    epochs = defaultdict(set)
    for name in os.listdir(os.path.join(ck, "sync", "run")):
        parsed = parse_name(name)
        if parsed is not None:
            epochs[parsed[1]].add(parsed[0])
    last_epoch = max(e["event_time_ms"] for e in kept) // interval_ms
    quiet = sorted(e for e in epochs[1] if e > cut // interval_ms + 1)  # labelled after its last event's epoch
    # more than the one at the end of the input: the watermark's jumps each told (a label covers those before it);
    # the last, at the end of the input, is the newest event's epoch
    assert len(quiet) >= 3 and quiet[-1] == last_epoch, (quiet, cut // interval_ms, last_epoch)


def test_a_job_restored_after_its_last_event_still_ends_every_shard_at_the_newest_epoch(flink_python):
    """The end of the input ticks every shard up to the newest event's epoch, so that no shard holds back the
    others' last merges. Restored from a checkpoint taken once every event was in, the operator has seen no
    event when the input ends: the ticks still reach that epoch, in either order of the shards' timers, and
    the publications are those of the uninterrupted run (UpdateShardModel on fake state: tests/flink_fakes.py)."""
    done = subprocess.run([flink_python, "-m", "tests.flink_fakes"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for order, runs in json.loads(done.stdout).items():  # micro-batches cut in arrival and in event-time order
        assert max(runs["uninterrupted"]["1"]) == runs["newest_epoch"] > runs["quiet_after_epoch"] + 2, order
        assert runs["restored"] == runs["uninterrupted"], order
        assert runs["restored_quiet_first"] == runs["uninterrupted"], order


def test_on_a_bounded_input_a_shards_micro_batches_are_its_events_in_time_order_whatever_their_arrival(flink_python):
    """At parallelism 2 a keyed step takes events from two upstream subtasks in bursts. On a bounded input the
    shard's micro-batches are still its events in event-time order, cut as the watermark passes them, before
    and after a restore, with ties in the order they arrived; where the watermark stays put, a shard holds no
    more than its order window and the bursts still land in order; cut in arrival order (a watched folder's),
    they do not (tests/flink_fakes.py)."""
    done = subprocess.run([flink_python, "-m", "tests.flink_fakes", "batches"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout)
    for name in ("ordered", "no_watermark"):
        assert runs[name]["uninterrupted"] == runs[name]["restored"] == runs[name]["expected"], name
    held, window = runs["no_watermark"]["held"], runs["no_watermark"]["window"]  # (after each event: batches of 4)
    assert runs["ordered"]["held"] < window - 4 <= held < window
    assert runs["ties"]["batches"] == runs["ties"]["expected"]  # ties (with no seq) stay in their arrival order
    arrival = runs["arrival"]
    assert arrival["uninterrupted"] != arrival["expected"] and arrival["held"] < 4
    assert sorted(sum(arrival["uninterrupted"]["0"], [])) == sorted(sum(arrival["expected"]["0"], []))


def test_the_job_reads_a_dataset_and_without_window_statistics_writes_only_records(flink_python, tmp_path):
    """--data (any dataset the CLI reads; here a CSV) is exported as freshrec export does and read;
    --stats_window_s 0: the flush reports must not leak into the outputs, and the summary still accounts."""
    rows = [e for e in synthetic_events(SyntheticConfig(events=600, seed=3, malformed_fraction=0, duplicate_fraction=0))
            if e["event_type"] != "rating"]  # (a rating needs its value column)
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,event_type,event_time_ms\n" + "".join(
        f"{e['user_id']},{e['item_id']},{e['event_type']},{e['event_time_ms']}\n" for e in rows))
    out = str(tmp_path / "out")
    finish(job(flink_python, None, out, str(tmp_path / "ck"), "--data", str(data), "--no_sync", "--stats_window_s", "0",
               "--quiet"))
    kinds = Counter(r["kind"] for r in committed(out))
    assert set(kinds) <= {"score", "delta", "dead_letter", "alert", "rollback", "summary"}
    assert kinds["score"] > 0 and kinds["delta"] > 0 and kinds["summary"] == 1
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["events_in"] == summary["events_accounted"] == summary["events_applied"] == len(rows)


def test_at_parallelism_1_the_job_learns_what_the_beam_pipeline_learns(flink_python, tmp_path):
    """The same ratings through the job at parallelism 1 and through the Beam pipeline on the DirectRunner,
    with the same settings: the same scores and deltas, record for record. The ratings come three to a
    second (the model takes events of one time in the input's order in both, not in the order of the key
    groups the Beam steps hand them on in), and a short state TTL expires states between visits (an expired
    state reads as new in both, though the job sweeps its groups per event and the Beam steps per batch)."""
    data = tied_ratings_csv(tmp_path / "ratings.csv")
    common = ["--data", data, "--key_groups", "4", "--state_ttl_days", "0.005", "--no_sync", "--quiet"]
    finish(job(flink_python, None, str(tmp_path / "flink"), str(tmp_path / "ck"), *common))
    assert cli_main([*common, "--output_dir", str(tmp_path / "beam"), "--shards", str(SHARDS), "--dim", str(DIM),
                     "--batch_size", "16"]) == 0
    beam = learned_records(str(tmp_path / "beam"))
    assert beam and learned_records(str(tmp_path / "flink")) == beam


def test_late_events_are_dead_lettered_and_the_summary_accounts_for_every_input(flink_python, events_file, tmp_path):
    """An event older than the watermark by more than --allowed_lateness_s goes to dead_letter/ as late (the
    Beam pipeline's DropLateEvents); the run ends with summary.json: applied + dead-lettered = lines in,
    which `freshrec show` prints."""
    with open(events_file) as fh:
        lines = fh.read().splitlines()
    first = min(e["event_time_ms"] for e in map(json.loads, lines) if isinstance(e.get("event_time_ms"), int))
    late = {"event_id": "late-1", "user_id": "u1", "item_id": "i1", "event_type": "click", "event_time_ms": first}
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([*lines, json.dumps(late), ""]) + "\n")  # and one blank line, dead-lettered
    out = str(tmp_path / "out")
    # throttled in small bundles, so that the watermark reaches the dedupe step before the late event does
    finish(job(flink_python, str(path), out, str(tmp_path / "ck"), "--allowed_lateness_s", "300", "--no_sync",
               "--throttle_ms", "3", *SMALL_BUNDLES, "--quiet"))
    dead = [r for r in committed(out) if r["kind"] == "dead_letter"]
    late_letters = [r for r in dead if r["reason"].startswith("late:")]
    assert [(r["event_id"], r["step"]) for r in late_letters] == [("late-1", "DropLateEvents")]
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["events_in"] == len(lines) + 2 == summary["events_accounted"]
    assert summary["events_dead_lettered"] == len(dead) and summary["dead_letter_by_reason"]["late"] == 1
    shown = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "-m", "pipelines.cli", "show", out],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "events_accounted" in shown.stdout and "late" in shown.stdout, shown.stderr


def test_the_job_watches_a_landing_folder(flink_python, tmp_path):
    """--watch_s: an unbounded run over a landing folder; a file that lands while it runs is read, and its
    user's scores are committed (flushed on processing time, as a stream's partial batches are)."""
    landing, out = tmp_path / "landing", str(tmp_path / "out")
    landing.mkdir()
    events = list(synthetic_events(SyntheticConfig(events=300, seed=5, malformed_fraction=0, duplicate_fraction=0)))

    def land(name, rows):  # written aside, then renamed in: a reader never sees half a file
        (landing / f".{name}").write_text("".join(json.dumps(e) + "\n" for e in rows))
        os.rename(landing / f".{name}", landing / name)

    def scored(user):
        return [r for r in committed(out) if r["kind"] == "score" and r["user_id"] == user]

    land("a.jsonl", events)
    proc = job(flink_python, str(landing), out, str(tmp_path / "ck"), "--watch_s", "0.5", "--flush_interval_s", "1",
               "--no_sync", "--quiet")
    try:
        deadline = time.time() + 150
        while not scored(events[0]["user_id"]) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert scored(events[0]["user_id"]), f"the first file was not scored (exit {proc.poll()})"
        t = events[-1]["event_time_ms"]
        land("b.jsonl", [{"event_id": f"new-{k}", "user_id": "landing-user", "item_id": events[k]["item_id"],
                          "event_type": "click", "event_time_ms": t + 1000 * (k + 1)} for k in range(3)])
        while not scored("landing-user") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert scored("landing-user"), f"the landed file was not scored (exit {proc.poll()})"
        assert proc.poll() is None, "a watched folder is an unbounded input: the job keeps running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def scrape_while_running(proc: subprocess.Popen, ports: range, timeout_s: float) -> str:
    """The freshrec lines the Prometheus reporters on ``ports`` showed while ``proc`` ran (a finished job's
    operators leave the registry, so the scrape happens during the run)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            break
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=2) as resp:
                    for line in resp.read().decode().splitlines():
                        if "freshrec" in line and not line.startswith("#"):
                            seen[line.split("{")[0].split(" ")[0]] = line
            except (OSError, http.client.HTTPException):  # not listening yet, or not answering HTTP yet
                continue
        time.sleep(1.0)
    proc.wait()
    return "\n".join(seen.values())


class Cluster(FlinkCluster):
    """``pipelines.flink_cluster.FlinkCluster`` with the test's job submission."""

    def submit(self, events, out, ck, *extra) -> subprocess.Popen:
        return subprocess.Popen(["bash", self.script, "submit", "--parallelism", "1", "--", "--input", events, "--output", out,
                                 "--checkpoint_dir", ck, "--shards", str(SHARDS), "--dim", str(DIM), "--batch_size", "16",
                                 "--checkpoint_interval_ms", "500", "--no_sync", "--quiet", *extra],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_job_on_a_standalone_cluster_at_parallelism_2(flink_python, events_file, uninterrupted, tmp_path):
    """scripts/flink_cluster.sh: a JobManager and two TaskManagers as separate JVMs on localhost; the job
    submitted at parallelism 2 accounts for every event as the in-process run does (the order in which a
    keyed step sees two upstream subtasks depends on timing, so parameters may differ; the counts do not)."""
    cluster, out = Cluster(tmp_path), str(tmp_path / "out")
    cluster("up")
    try:
        jvms = cluster("status", timeout=30)
        assert '"taskmanagers":2' in jvms and '"slots-total":2' in jvms, jvms
        sub = subprocess.Popen(["bash", cluster.script, "submit", "--", "--input", events_file, "--output", out,
                                "--checkpoint_dir", str(tmp_path / "ck"), "--shards", str(SHARDS), "--dim", str(DIM),
                                "--batch_size", "16", "--no_sync", "--quiet",
                                # small bundles: the gauges reach the reporters before the (short) run ends
                                *SMALL_BUNDLES],
                               env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        scraped = scrape_while_running(sub, cluster.prom_ports, timeout_s=400)
        log = sub.stdout.read() if sub.stdout else ""
        assert sub.returncode == 0, log[-3000:]
        # the job's own metrics, under the Beam pipeline's names, reach Flink's Prometheus reporter
        for name in ("freshrec_events_in", "freshrec_events_applied", "freshrec_flushes",
                     *(f"freshrec_{g}_shard_{s}" for g in ("model_version", "table_rows_item", "table_rows_user")
                       for s in range(SHARDS))):
            assert name in scraped, sorted(set(re.findall(r"\w*freshrec\w*", scraped)))[:20]
    finally:
        cluster("down", timeout=60)
    records = committed(out)
    ref = committed(uninterrupted[1])
    windows = lambda rs: sorted((w["window_start_ms"], w["events"], json.dumps(w["dead_letters"], sort_keys=True))  # noqa: E731
                                for w in rs if w["kind"] == "stats")
    assert windows(records) == windows(ref) and windows(ref)
    applied = lambda rs: sum(w["applied"] for w in rs if w["kind"] == "stats")  # noqa: E731
    assert applied(records) == applied(ref) == sum(w[1] for w in windows(ref))  # each clean event applied once
    dead = lambda rs: sorted((r["reason"], r["raw"]) for r in rs if r["kind"] == "dead_letter")  # noqa: E731
    assert dead(records) == dead(ref)
    assert set(parameters(records)) == set(range(SHARDS))  # every shard's deltas in sequence, none twice


def test_the_job_on_the_cluster_survives_a_killed_taskmanager_and_a_killed_jobmanager(flink_python, events_file,
                                                                                       uninterrupted, tmp_path):
    """On a standalone cluster, mid-stream: SIGKILL the only TaskManager and start a new one (the cluster's
    restart strategy resumes the job from its last checkpoint there); later SIGKILL the JobManager (the job
    dies with it: no high availability here), start one again, and resubmit the job with --restore_from its
    retained checkpoint. The committed outputs and parameters equal an uninterrupted run's."""
    cluster, out, ck = Cluster(tmp_path), str(tmp_path / "out"), str(tmp_path / "ck")
    total = len(committed(uninterrupted[1]))
    cluster("up", "--taskmanagers", "1", "--slots", "1")
    try:
        # slowed, in small bundles, so that checkpoints complete mid-stream (as in the in-process fault test)
        sub = cluster.submit(events_file, out, ck, "--throttle_ms", "20", *SMALL_BUNDLES)
        first = int(wait_for_checkpoint(sub, ck, 3).rsplit("-", 1)[1])
        assert "killed taskmanager" in cluster("kill", "taskmanager")
        assert len(committed(out)) < total, "the TaskManager must die mid-stream"
        cluster("start", "taskmanager")
        wait_for_checkpoint(sub, ck, first + 3)  # resumed on the new TaskManager, checkpointing again
        assert "killed jobmanager" in cluster("kill", "jobmanager")
        sub.communicate(timeout=120)  # the client loses its job
        assert len(committed(out)) < total, "the JobManager must die mid-stream"
        cluster("start", "jobmanager")
        deadline = time.time() + 120
        while '"taskmanagers":1' not in cluster("status") and time.time() < deadline:
            time.sleep(1)
        chk = latest_checkpoint(ck)
        log, _ = cluster.submit(events_file, out, ck, "--restore_from", chk).communicate(timeout=400)
        assert "Job Runtime" in log, log[-3000:]
    finally:
        cluster("down", timeout=60)
    assert_equals_uninterrupted(out, uninterrupted[1])
