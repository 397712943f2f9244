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


def test_a_pubsub_run_reads_a_backlog_in_large_pulls_and_sigterm_drains_it_with_every_event_accounted(emulator, tmp_path):
    """The CLI on a subscription with a backlog (``pipelines.pubsub_read``): it reads it in large pulls (the
    DirectRunner's own read took one 10-message pull per second), and SIGTERM stops it the way a drain
    does: no more pulls, buffers flushed, open windows fired, totals printed, every message accounted for
    as applied or dead-lettered, and the runner's own counters agree (the streaming DirectRunner counted
    only each worker thread's first bundle of a step: ``transforms.runtime``)."""
    import os
    import signal
    import subprocess
    import sys

    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(request={"name": _topic("backlog")})
    subscriber.create_subscription(request={"name": _sub("backlog"), "topic": _topic("backlog")})
    n, start = 1_500, int(time.time() * 1000) - 60_000
    events = [{"event_id": f"b{i}", "user_id": f"u{i % 50}", "item_id": f"i{i % 37}", "event_type": "click",
               "event_time_ms": start + i * 20, "value": None, "context": {}} for i in range(n)]
    messages = list(prepare(events, retime=False, speedup=1.0, start_ms=start))
    messages.append((b"whatever", {"event_time_ms": str(start)}))  # no schema fingerprint: dead-lettered
    assert publish(_topic("backlog"), messages, rate=0, publisher=publisher) == n + 1

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "--events_subscription", _sub("backlog"), "--output_dir", str(out),
         "--dim", "8", "--allowed_lateness_s", "3600", "--progress_s", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator})
    progress: list[str] = []
    outputs: list[str] = []  # one reader per pipe: communicate() would race the progress reader for stderr
    reader = threading.Thread(target=lambda: progress.extend(proc.stderr), daemon=True)
    out_reader = threading.Thread(target=lambda: outputs.extend(proc.stdout), daemon=True)
    reader.start()
    out_reader.start()
    started, read_all_s = time.time(), None
    try:
        while time.time() - started < 240 and proc.poll() is None:
            time.sleep(0.5)
            lines = [line for line in progress if " read, " in line]
            if read_all_s is None and lines and f"{n + 1:,} read" in lines[-1]:
                read_all_s = time.time() - started
            if lines and f"{n:,} applied, 1 dead-lettered" in lines[-1]:
                break
        assert proc.poll() is None, "".join(progress)[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    out_reader.join(timeout=5)
    stdout = "".join(outputs)
    assert read_all_s is not None and read_all_s < 120, "".join(progress)[-2000:]
    assert any("SIGTERM: draining" in line for line in progress)
    assert "pipeline finished" in stdout, stdout[-2000:]
    assert proc.returncode == 0, "".join(progress)[-2000:]  # the runner's counters agree with the ledger
    totals = json.loads(stdout[stdout.index("{"):])["windows"]
    assert totals["events_accounted"] == n + 1
    assert totals["events_applied"] == n and totals["events_dead_lettered"] == 1
