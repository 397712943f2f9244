"""The command line as a new user meets it: --help, any dataset layout with --data alone, mistakes
caught in one line before any work, a run that dead-letters everything fails, progress while it runs,
and the results read back with ``freshrec show`` and ``freshrec export``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fastavro
import pytest

from core.settings import FLAGS
from pipelines import cli
from tests.helpers import learned_records, tied_ratings_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_S = 1_700_000_000


def freshrec(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - started


def test_help_lists_every_option_with_its_default():
    proc, _ = freshrec("--help", timeout=60)
    assert proc.returncode == 0
    for flag in FLAGS:
        assert f"--{flag.name}" in proc.stdout, flag.name
    assert proc.stdout.count("(default:") >= len(FLAGS)
    assert "--runner_config" in proc.stdout and "freshrec show OUT" in proc.stdout
    run_sh = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "--help"], capture_output=True, text=True, timeout=600)
    assert run_sh.returncode == 0 and "--max_dead_letter_fraction" in run_sh.stdout


def layouts(tmp_path) -> dict[str, str]:
    """Small files in the layouts of common public datasets, 300 events each."""
    rows = [(u, i, t) for t, (u, i) in enumerate((n % 17, n % 29) for n in range(300))]
    files = {
        "ratings.csv": "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{i},{1 + (u + i) % 5}.0,{BASE_S + 60 * t}\n" for u, i, t in rows),
        "clicks.tsv": "SessionId\tItemId\tTime\n" + "".join(
            f"{u}\t{9000 + i}\t{BASE_S + 60 * t + 0.25:.3f}\n" for u, i, t in rows),
        "iso.csv": "visitor,article,timestamp\n" + "".join(
            f"v{u},a{i},{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(BASE_S + 60 * t))}\n" for u, i, t in rows),
        "events.jsonl": "".join(json.dumps({"event_id": f"e{t}", "user_id": f"u{u}", "item_id": f"i{i}",
                                            "event_type": "click", "event_time_ms": (BASE_S + 60 * t) * 1000}) + "\n"
                                for u, i, t in rows),
    }
    out = {}
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", ["ratings.csv", "clicks.tsv", "iso.csv", "events.jsonl"])
def test_any_layout_replays_with_data_alone(tmp_path, name):
    data = layouts(tmp_path)[name]
    out = tmp_path / "out"
    proc, _ = freshrec("--data", data, "--output_dir", str(out), "--shards", "2", "--batch_size", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"reading {data} as" in proc.stdout and "user_id=" in proc.stdout and "event_time=" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_in"] == 300
    assert summary["events_applied"] >= 0.99 * 300, summary["dead_letter_by_reason"]


@pytest.mark.parametrize("args, expected", [
    (["--shard", "8"], "unknown flag --shard (did you mean --shards?)"),
    (["--data_fromat", "csv"], "unknown flag --data_fromat (did you mean --data_format?)"),
    (["--data", "/no/such/dataset.csv"], "--data /no/such/dataset.csv: no such file or folder"),
    (["--shards", "0"], "--shards must be >= 1, got 0"),
    (["--runner_config", "/no/such/config.yaml"], "--runner_config /no/such/config.yaml: no such file"),
    (["--data_format", "parquet"], "invalid choice: 'parquet'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--columns", "user=userId"], "--columns: expected FIELD=COLUMN"),
    (["--columns", "user_id=uid"], "--columns: user_id=uid: no column 'uid' (columns: userId, movieId, rating, timestamp)"),
])
def test_mistakes_fail_fast_in_one_line_and_write_nothing(tmp_path, args, expected):
    out = tmp_path / "out"
    if "--columns" in args:
        args = ["--data", layouts(tmp_path)["ratings.csv"], *args]
    proc, seconds = freshrec(*args, "--output_dir", str(out), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 15 and not out.exists()


def test_unwritable_output_dir_fails_before_the_pipeline_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc, seconds = freshrec("--output_dir", str(blocker / "out"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "is a file, not a folder" in proc.stderr and seconds < 15


def test_an_input_of_nothing_but_malformed_events_fails_and_names_the_reason(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"event_id": f"e{n}", "user_id": f"u{n}", "event_type": "click",
                                        "event_time_ms": (BASE_S + n) * 1000}) + "\n" for n in range(50)))
    proc, _ = freshrec("--data", str(data), "--output_dir", str(tmp_path / "out"), "--data_format", "jsonl", "--quiet")
    assert proc.returncode == 1
    assert "100.0% of 50 events were dead-lettered" in proc.stderr
    assert "malformed: missing field 'item_id'" in proc.stderr


def test_a_long_run_prints_progress_lines_while_it_runs(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--synthetic_events", "30000",
                             "--output_dir", str(tmp_path / "out"), "--progress_s", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if "read," in line:
            seen.append((time.monotonic(), line))
    proc.wait(timeout=600)
    finished = time.monotonic()
    assert proc.returncode == 0
    assert len(seen) >= 2, seen
    assert seen[0][0] < finished - 1  # printed during the run, not at its end
    assert "events/s applied" in seen[-1][1] and "running AUC" in seen[-1][1]
    quiet, _ = freshrec("--synthetic_events", "2000", "--output_dir", str(tmp_path / "q"), "--progress_s", "0.1",
                        "--quiet")
    assert quiet.returncode == 0 and "read," not in quiet.stderr


def test_show_and_export_read_what_a_run_wrote(tmp_path, capsys):
    data = layouts(tmp_path)["ratings.csv"]
    out = tmp_path / "out"
    assert cli.main(["--data", data, "--output_dir", str(out), "--shards", "1", "--batch_size", "50", "--quiet"]) == 0
    assert not any(p.startswith(".temp") for d in ("scores", "deltas") for p in os.listdir(out / d))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_written"] > 0 and summary["deltas_written"] > 0 and "rollbacks" in summary
    capsys.readouterr()
    assert cli.main(["show", str(out), "--user", "3"]) == 0
    shown = capsys.readouterr().out
    assert "events_applied" in shown and "user 3: shard 0, model version" in shown
    assert cli.main(["export", "--data", data, "--output", str(tmp_path / "events.avro")]) == 0
    with open(tmp_path / "events.avro", "rb") as fh:
        exported = list(fastavro.reader(fh))
    assert len(exported) == 300 and exported[0]["event_type"] == "rating"
    assert [e["event_time_ms"] for e in exported] == sorted(e["event_time_ms"] for e in exported)


def test_the_key_groups_do_not_change_what_the_model_learns(tmp_path):
    """--key_groups only sizes the keyed steps' state values. Events of one time (three to a second here)
    reach the model in the input's order whatever the groups handed them on in, and a state idle longer
    than its TTL has expired whenever its group was last swept: the scores and deltas are the same."""
    data = tied_ratings_csv(tmp_path / "ratings.csv")
    runs = {}
    for groups in ("1", "7", "1024"):
        out = tmp_path / f"g{groups}"
        assert cli.main(["--data", data, "--output_dir", str(out), "--shards", "2", "--batch_size", "16",
                         "--key_groups", groups, "--state_ttl_days", "0.005", "--no_sync", "--quiet"]) == 0
        runs[groups] = learned_records(str(out))
    assert runs["1"] and runs["7"] == runs["1"] and runs["1024"] == runs["1"]


def test_a_run_keeps_only_the_newest_checkpoints_per_shard(tmp_path):
    ck = tmp_path / "ck"
    assert cli.main(["--synthetic_events", "3000", "--output_dir", str(tmp_path / "out"), "--shards", "2",
                     "--batch_size", "64", "--checkpoint_dir", str(ck), "--checkpoint_every", "1",
                     "--checkpoint_keep", "2", "--quiet"]) == 0
    files = sorted(p.name for p in ck.iterdir())
    for shard in (0, 1):
        mine = [f for f in files if f.startswith(f"shard-{shard:04d}-") and f.endswith(".pt")]
        assert len(mine) == 2 and all(f + ".sha256" in files for f in mine)


def test_a_write_error_ends_the_run_in_one_line_and_removes_partial_outputs(tmp_path, monkeypatch, capsys):
    from transforms import sinks

    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks.AvroFileSink, "write", full_disk)
    out = tmp_path / "out"
    assert cli.main(["--synthetic_events", "2000", "--output_dir", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]
    assert not out.exists() or not any(out.rglob("*.avro"))


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def test_a_run_resumes_from_another_runs_checkpoints_only_when_asked(tmp_path, capsys):
    from model.checkpoint import checkpoints, verified_state
    from pipelines.results import records

    ck = str(tmp_path / "ck")
    common = ["--synthetic_events", "3000", "--shards", "2", "--batch_size", "64", "--checkpoint_dir", ck,
              "--checkpoint_every", "1", "--checkpoint_keep", "2", "--quiet"]
    assert cli.main([*common, "--output_dir", str(tmp_path / "a"), "--run_id", "runA"]) == 0
    first = _summary(tmp_path / "a")["model_versions"]
    saved = {s: verified_state(checkpoints(ck, s, "runA")[0]) for s in (0, 1)}
    assert all(saved[s]["version"] == first[str(s)] for s in (0, 1))

    fresh = tmp_path / "fresh"  # without --resume_from a run starts afresh, whatever the folder holds
    assert cli.main([*common, "--output_dir", str(fresh), "--run_id", "runF"]) == 0
    assert _summary(fresh)["model_versions"] == first

    assert cli.main([*common, "--output_dir", str(tmp_path / "b"), "--run_id", "runB", "--resume_from", "runA"]) == 0
    resumed = _summary(tmp_path / "b")["model_versions"]
    assert all(resumed[str(s)] > first[str(s)] for s in (0, 1)), (first, resumed)  # the same events again, continued
    for s in (0, 1):  # versions and delta sequences continue from the checkpoint; runA's files stay
        seqs = [r["sequence"] for r in records(str(tmp_path / "b" / "deltas")) if r["shard"] == s]
        assert min(seqs) == saved[s]["meta"]["delta_sequence"] + 1
        assert len(checkpoints(ck, s, "runA")) == 2 and len(checkpoints(ck, s, "runB")) == 2
    capsys.readouterr()
    for args, expected in ((["--resume_from", "nope"], "no checkpoints of that run"),
                           (["--resume_from", "runA", "--dim", "8"], "reads back into this model"),
                           (["--resume_from", "runA", "--shards", "3"], "had --shards 2"),
                           (["--resume_from", "latest", "--run_id", "runZ", "--checkpoint_dir", str(tmp_path / "none")],
                            "holds no other run's checkpoints")):
        assert cli.main([*common, "--output_dir", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert cli.main(["--synthetic_events", "100", "--resume_from", "runA", "--output_dir", str(tmp_path / "y")]) == 2
    assert "needs --checkpoint_dir" in capsys.readouterr().err
