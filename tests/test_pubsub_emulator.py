"""End to end over the real google-cloud-pubsub client (gRPC) against the Pub/Sub emulator.

The fixture starts ``gcloud beta emulators pubsub start`` in its own process group and stops the
whole group (gcloud and its Java child) by PID. Skipped, with the reason, where gcloud or the
emulator component is absent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import apache_beam as beam
import pytest

import schemas
from core.settings import pipeline_config
from pipelines.consumer import DeltaConsumer
from pipelines.emulator import EmulatorUnavailable, start_emulator
from pipelines.freshrec_pipeline import build_pipeline, make_options
from pipelines.publisher import prepare, publish
from schemas.messages import FINGERPRINT_ATTR

pytestmark = pytest.mark.emulator
PROJECT = "freshrec-test"


@pytest.fixture(scope="module")
def emulator():
    try:
        emu = start_emulator(PROJECT)
    except EmulatorUnavailable as exc:
        pytest.skip(f"Pub/Sub emulator absent: {exc}")
    yield emu.host
    emu.stop()


def _topic(name):
    return f"projects/{PROJECT}/topics/{name}"


def _sub(name):
    return f"projects/{PROJECT}/subscriptions/{name}"


def _pull_all(subscriber, sub, want, timeout_s):
    """Pull until ``want(messages)`` or the timeout; returns decoded (data, attributes) pairs."""
    got = []
    deadline = time.time() + timeout_s
    while time.time() < deadline and not want(got):
        resp = subscriber.pull(request={"subscription": sub, "max_messages": 500}, timeout=10)
        if resp.received_messages:
            subscriber.acknowledge(request={"subscription": sub, "ack_ids": [m.ack_id for m in resp.received_messages]})
            got.extend((m.message.data, dict(m.message.attributes)) for m in resp.received_messages)
        else:
            time.sleep(0.5)
    return got


def test_pubsub_end_to_end_with_consumer(emulator, tmp_path):
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    for name in ("events", "scores", "deltas", "dead", "rollbacks"):
        publisher.create_topic(request={"name": _topic(name)})
    for name in ("events", "scores", "deltas", "dead"):
        subscriber.create_subscription(request={"name": _sub(name), "topic": _topic(name)})

    now = int(time.time() * 1000)
    n_events = 40
    events = [{"event_id": f"e{i}", "user_id": f"u{i % 5}", "item_id": f"i{(i % 5) * 3 + i % 3}",
               "event_type": "click", "event_time_ms": now - 60_000 + i * 100, "value": None, "context": {}}
              for i in range(n_events)]
    messages = list(prepare(events, retime=False, speedup=1.0, start_ms=now))
    messages.append(messages[3])                                         # duplicate event id
    messages.append((b"\x00garbage", {FINGERPRINT_ATTR: schemas.schema_fingerprint(schemas.RAW_EVENT),
                                      "event_time_ms": str(now)}))        # undecodable Avro
    messages.append((b"whatever", {"event_time_ms": str(now)}))          # no schema fingerprint
    assert publish(_topic("events"), messages, rate=0, publisher=publisher) == n_events + 3

    argv = ["--events_subscription", _sub("events"), "--scores_topic", _topic("scores"),
            "--deltas_topic", _topic("deltas"), "--dead_letter_topic", _topic("dead"),
            "--rollbacks_topic", _topic("rollbacks"), "--shards", "2", "--batch_size", "8",
            "--flush_interval_s", "1", "--allowed_lateness_s", "3600", "--dim", "8", "--no_gate",
            "--sync_dir", str(tmp_path / "sync")]
    opts = make_options(argv)
    cfg = pipeline_config(opts)
    p = beam.Pipeline(options=opts)
    build_pipeline(p, opts)
    result = p.run()
    errors = []

    def wait():
        try:
            result.wait_until_finish()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threading.Thread(target=wait, daemon=True).start()
    try:
        dead = _pull_all(subscriber, _sub("dead"), lambda got: len(got) >= 3, 150)
        deltas = []
        applied_users = {e["user_id"] for e in events}

        def all_scored(got):
            return {schemas.decode(schemas.SCORED_OUTPUT, d)["user_id"] for d, _ in got} >= applied_users

        scores = _pull_all(subscriber, _sub("scores"), all_scored, 150)
        deltas = _pull_all(subscriber, _sub("deltas"), lambda got: False, 8)
    finally:
        result.cancel()
    assert not errors, errors

    reasons = sorted(schemas.decode(schemas.DEAD_LETTER, d)["reason"].split(":")[0] for d, _ in dead)
    assert reasons == ["duplicate event_id", "malformed", "malformed"], reasons
    for _data, attrs in dead:
        assert attrs[FINGERPRINT_ATTR] == schemas.schema_fingerprint(schemas.DEAD_LETTER)

    score_recs = [schemas.decode(schemas.SCORED_OUTPUT, d) for d, _ in scores]
    delta_recs = [schemas.decode(schemas.MODEL_DELTA, d) for d, _ in deltas]
    assert {r["user_id"] for r in score_recs} >= applied_users
    for d, attrs in deltas:
        assert attrs[FINGERPRINT_ATTR] == schemas.schema_fingerprint(schemas.MODEL_DELTA)
        rec = schemas.decode(schemas.MODEL_DELTA, d)
        assert attrs["shard"] == str(rec["shard"]) and attrs["sequence"] == str(rec["sequence"])
    # ordering per shard: sequences gap-free, versions never decrease along them
    by_shard = defaultdict(list)
    for r in delta_recs:
        by_shard[r["shard"]].append(r)
    for shard, recs in by_shard.items():
        recs.sort(key=lambda r: r["sequence"])
        assert [r["sequence"] for r in recs] == list(range(1, len(recs) + 1)), shard
        versions = [r["model_version"] for r in recs]
        assert versions == sorted(versions)

    # the downstream consumer reproduces the pipeline's scores at the same version
    consumer = DeltaConsumer(cfg.learner, cfg.sharding.shards)
    pending = {(s.get("shard"), s["model_version"]): [] for s in score_recs}
    for s in score_recs:
        pending[(s["shard"], s["model_version"])].append(s)
    checked = 0
    shuffled = sorted(delta_recs, key=lambda r: (r["sequence"] % 3, r["shard"]))  # arrival order differs
    for rec in shuffled + shuffled[:3]:  # and duplicates arrive again
        consumer.handle(rec)
    consumer2 = DeltaConsumer(cfg.learner, cfg.sharding.shards)
    for shard, recs in by_shard.items():
        for i, rec in enumerate(recs):
            consumer2.handle(rec)
            last_of_version = i + 1 == len(recs) or recs[i + 1]["model_version"] != rec["model_version"]
            if not last_of_version:
                continue
            for s in pending.get((shard, rec["model_version"]), []):
                served = consumer2.scores(s["user_id"], len(s["items"]))
                assert [i for i, _ in served] == [x["item_id"] for x in s["items"]]
                for (_, got), want in zip(served, s["items"]):
                    assert got == pytest.approx(want["score"], abs=1e-5)
                checked += 1
    assert checked > 0
    assert consumer.counters["duplicates"] == 3
    for shard in by_shard:
        assert consumer.version(shard) == consumer2.version(shard)


class _Cli:
    """``freshrec`` on a subscription in a subprocess, its progress lines read as they come (one reader per
    pipe: communicate() would race the progress reader for stderr)."""

    def __init__(self, emulator: str, args: list[str]):
        import os
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator})
        self.progress: list[str] = []
        self.outputs: list[str] = []
        self.readers = [threading.Thread(target=lambda: self.progress.extend(self.proc.stderr), daemon=True),
                        threading.Thread(target=lambda: self.outputs.extend(self.proc.stdout), daemon=True)]
        for r in self.readers:
            r.start()
        self.started = time.time()

    def wait_for(self, done, timeout_s: float) -> float | None:
        """Seconds until ``done(read, applied, dead)`` held; None: the timeout passed or the run ended first."""
        from core.progress import newest_counts

        while time.time() - self.started < timeout_s and self.proc.poll() is None:
            if done(*newest_counts(self.progress)):
                return time.time() - self.started
            time.sleep(0.5)
        return None

    def stop(self, signum: int) -> str:
        """Send ``signum``, wait for the exit; its stdout."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for r in self.readers:
            r.join(timeout=5)
        return "".join(self.outputs)

    def log(self) -> str:
        return "".join(self.progress)[-2000:]


def _backlog(name: str, n: int, bad: int = 0) -> int:
    """Publish ``n`` events (ids ``{name}{i}``, 50 users) and ``bad`` messages without a schema to a new topic
    with a subscription, both called ``name``."""
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(request={"name": _topic(name)})
    subscriber.create_subscription(request={"name": _sub(name), "topic": _topic(name)})
    start = int(time.time() * 1000) - 60_000
    events = [{"event_id": f"{name}{i}", "user_id": f"u{i % 50}", "item_id": f"i{i % 37}", "event_type": "click",
               "event_time_ms": start + i * 20, "value": None, "context": {}} for i in range(n)]
    messages = list(prepare(events, retime=False, speedup=1.0, start_ms=start))
    messages += [(b"whatever", {"event_time_ms": str(start)})] * bad  # no schema fingerprint: dead-lettered
    return publish(_topic(name), messages, rate=0, publisher=publisher)


def test_a_pubsub_run_reads_a_backlog_in_large_pulls_and_sigterm_drains_it_with_every_event_accounted(emulator, tmp_path):
    """The CLI on a subscription with a backlog (``pipelines.pubsub_read``): it reads it in large pulls (the
    DirectRunner's own read took one 10-message pull per second), and SIGTERM stops it the way a drain
    does: no more pulls, buffers flushed, open windows fired, totals printed, every message accounted for
    as applied or dead-lettered, and the runner's own counters agree (the streaming DirectRunner counted
    only each worker thread's first bundle of a step: ``transforms.direct_runner``)."""
    import signal

    n = 1_500
    assert _backlog("backlog", n, bad=1) == n + 1
    cli = _Cli(emulator, ["--events_subscription", _sub("backlog"), "--output_dir", str(tmp_path / "out"), "--dim", "8",
                          "--allowed_lateness_s", "3600", "--progress_s", "1"])
    read_all_s = cli.wait_for(lambda read, applied, dead: read == n + 1, 240)
    cli.wait_for(lambda read, applied, dead: applied == n and dead == 1, 240)
    assert cli.proc.poll() is None, cli.log()
    stdout = cli.stop(signal.SIGTERM)
    assert read_all_s is not None and read_all_s < 120, cli.log()
    assert "SIGTERM: draining" in cli.log()
    assert "pipeline finished" in stdout, stdout[-2000:]
    assert cli.proc.returncode == 0, cli.log()  # the runner's counters agree with the ledger
    totals = json.loads(stdout[stdout.index("{"):])
    assert totals["events_accounted"] == n + 1 and totals["events_in"] == n + 1
    assert totals["events_applied"] == n and totals["events_dead_lettered"] == 1


def test_a_pubsub_run_killed_mid_stream_and_resumed_applies_every_event_exactly_once(emulator, tmp_path):
    """SIGKILL a run with checkpoints mid-stream, start it again on the same subscription and checkpoint folder
    with ``--resume_from latest``: nothing it had read was acknowledged (``--ack_every_s`` is long here), so
    Pub/Sub redelivers everything; the resumed run refuses the ids its checkpoints hold as applied and applies
    the rest, so the shards' checkpoints account for every published event exactly once, and versions and
    delta sequences continue from the killed run's."""
    import signal

    from core.cleaning import REDELIVERED
    from model.checkpoint import checkpoint_index, resume_state
    from pipelines.results import records

    n, ck = 1_200, tmp_path / "ck"
    assert _backlog("restart", n) == n
    args = ["--events_subscription", _sub("restart"), "--checkpoint_dir", str(ck), "--shards", "2", "--batch_size", "64",
            "--flush_interval_s", "1", "--dim", "8", "--allowed_lateness_s", "3600", "--progress_s", "1"]

    def newest(run: str) -> dict[int, tuple]:
        """Each shard's (learner, meta) a run resuming from ``run`` starts from (none: it starts afresh)."""
        found = {s: resume_state(ck, s, run) for s in (0, 1)}
        return {s: f[:2] for s, f in found.items() if f is not None}

    first = _Cli(emulator, [*args, "--output_dir", str(tmp_path / "out1"), "--ack_every_s", "600"])
    assert first.wait_for(lambda read, applied, dead: applied >= n // 6, 180) is not None, first.log()
    first.stop(signal.SIGKILL)
    (run1,) = checkpoint_index(ck)
    killed = newest(run1)
    durable = sum(meta["events_applied"] for _, meta in killed.values())
    assert 0 < durable < n

    second = _Cli(emulator, [*args, "--output_dir", str(tmp_path / "out2"), "--resume_from", "latest"])
    assert second.wait_for(lambda read, applied, dead: applied + dead >= n, 180) is not None, second.log()

    def ledger() -> dict:
        try:
            return json.loads((tmp_path / "out2" / "summary.json").read_text())
        except (OSError, ValueError):
            return {}

    deadline = time.time() + 30  # the running ledger is rewritten every 10 s of processing time
    while time.time() < deadline and ledger().get("events_accounted") != n:
        time.sleep(0.5)
    assert ledger().get("running") is True and ledger()["events_accounted"] == n, ledger()
    stdout = second.stop(signal.SIGTERM)
    assert second.proc.returncode == 0, second.log()
    summary = json.loads(stdout[stdout.index("{"):])
    assert "running" not in summary  # the drain's final ledger
    assert summary["events_applied"] == n - durable, summary
    assert summary["dead_letter_by_reason"] == {"already applied": durable}, summary  # not counted as bad input
    reasons = [r["reason"] for r in records(str(tmp_path / "out2" / "dead_letter"))]
    assert reasons == [REDELIVERED] * durable

    final = newest(max(checkpoint_index(ck)))  # run 2's, or run 1's where run 2 got none of a shard's events
    assert sum(meta["events_applied"] for _, meta in final.values()) == n  # each event applied once
    continued = 0
    for shard, (learner, meta) in final.items():
        seqs = [d["sequence"] for d in records(str(tmp_path / "out2" / "deltas")) if d["shard"] == shard]
        if seqs:  # run 2 applied some of this shard's events: versions and sequences went on from run 1's
            continued += 1
            before_version, before_seq = (killed[shard][0].version, killed[shard][1]["delta_sequence"]) \
                if shard in killed else (0, 0)
            assert learner.version > before_version
            assert min(seqs) == before_seq + 1 and meta["delta_sequence"] == max(seqs)
    assert continued
