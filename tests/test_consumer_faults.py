"""The serving copy never dies on data: undecodable, pickled, wrong-width, unknown-table and NaN deltas,
truncated, pickled and corrupted checkpoints, and bad query parameters. Throughout, the HTTP server keeps
answering with the last good scores."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import urllib.error
import urllib.request

import pytest

import schemas
from model.checkpoint import checkpoints, save_checkpoint
from model.learner import IncrementalLearner
from pipelines.consumer import DeltaConsumer, serve
from tests.helpers import topic_stream
from tests.test_consumer import cfg, produce

USERS = ["u1", "u7", "u33"]


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served():
    learner, records = produce()
    consumer = DeltaConsumer(cfg(), shards=1)
    for r in records[:-3]:
        assert consumer.handle_message(schemas.encode(schemas.MODEL_DELTA, r)) == "applied"
    server = serve(consumer, 0)
    port = server.server_address[1]
    good = {u: get(port, f"/scores?user={u}&k=5") for u in USERS}
    assert all(status == 200 and body["items"] for status, body in good.values())
    yield consumer, records, port, good
    server.shutdown()


def still_good(port: int, good: dict) -> bool:
    return {u: get(port, f"/scores?user={u}&k=5") for u in USERS} == good


def test_bad_deltas_are_refused_and_counted_while_serving_goes_on(served):
    consumer, records, port, good = served
    nxt = records[-3]
    wrong_width = copy.deepcopy(nxt)
    wrong_width["row_values"] = [row[:-1] for row in wrong_width["row_values"]] or [[0.0]]
    wrong_width["row_ids"] = wrong_width["row_ids"] or ["x"]
    unknown_table = {**copy.deepcopy(nxt), "table": "secret_weights"}
    nan = copy.deepcopy(nxt)
    nan["row_ids"] = nan["row_ids"] or ["x"]
    nan["row_values"] = [[float("nan")] * len(nan["row_values"][0])] * len(nan["row_ids"]) if nan["row_values"] else [[float("nan")]]
    bad_shard = {**copy.deepcopy(nxt), "shard": 7}
    messages = [b"\x00\xff not avro at all", pickle.dumps({"shard": 0, "table": "item"}), b""]
    messages += [schemas.encode(schemas.MODEL_DELTA, r) for r in (wrong_width, unknown_table, nan, bad_shard)]
    results = [consumer.handle_message(m, f"m{i}") for i, m in enumerate(messages)]
    assert results == ["refused"] * len(messages)
    assert consumer.counters["refused"] == len(messages)
    assert consumer.counters["refused_undecodable"] >= 2 and consumer.counters["refused_unknown_table"] == 1
    assert consumer.counters["refused_non_finite"] == 1 and consumer.counters["refused_unknown_shard"] == 1
    assert consumer.counters["refused_wrong_width"] == 1
    assert still_good(port, good)
    # the good delta stream goes on afterwards
    assert [consumer.handle(r) for r in records[-3:]] == ["applied"] * 3


def test_unreadable_checkpoints_fall_back_to_an_older_good_one(tmp_path):
    learner, records = produce(tmp_path, checkpoint_after=12)
    good_ckpt = checkpoints(tmp_path, 0)[0]
    # newer checkpoints that cannot be read: truncated, a pickle of code, bytes that do not match their checksum
    newer = [good_ckpt.with_name(f"shard-0000-v{999_000 + n:012d}.pt") for n in range(3)]
    data = good_ckpt.read_bytes()
    newer[0].write_bytes(data[: len(data) // 2])
    newer[1].write_bytes(pickle.dumps(os.system))
    newer[2].write_bytes(data[:-10] + b"0123456789")  # corrupted after its checksum was written
    newer[2].with_name(newer[2].name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    assert checkpoints(tmp_path, 0)[:3] == newer[::-1]
    consumer = DeltaConsumer(cfg(), shards=1, checkpoint_dir=str(tmp_path))
    server = serve(consumer, 0)
    port = server.server_address[1]
    try:
        lost = records[10]["sequence"]
        for r in records:
            if r["sequence"] != lost:
                consumer.handle(r)
            status, _ = get(port, "/scores?user=u1&k=5")
            assert status == 200
        assert consumer.counters["checkpoint_errors"] == 3 and consumer.counters["resyncs"] == 1
        assert consumer.replicas[0].model.published_snapshot() == learner.published_snapshot()
    finally:
        server.shutdown()


@pytest.mark.parametrize("path", ["/scores?user=u1&k=-1", "/scores?user=u1&k=abc", "/scores?user=u1&k=1.5",
                                  "/scores?k=3", "/scores?user=u1&k=100000", "/nowhere"])
def test_bad_queries_get_a_one_line_json_error(served, path):
    _, _, port, good = served
    status, body = get(port, path)
    assert status in (400, 404) and set(body) == {"error"} and "\n" not in body["error"]
    assert still_good(port, good)


def test_a_pickled_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    pickle.dump(_Boom(str(marker)), payload)
    (tmp_path / "shard-0000-v000000000005.pt").write_bytes(payload.getvalue())
    consumer = DeltaConsumer(cfg(), shards=1, checkpoint_dir=str(tmp_path))
    _, records = produce()
    consumer.handle(records[3])  # a gap: resync tries the checkpoint
    assert consumer.counters["checkpoint_errors"] == 1 and not marker.exists()


class _Boom:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_later_run_s_checkpoints_win_over_an_earlier_run_s_higher_versions(tmp_path):
    learner, records = produce()
    save_checkpoint(learner, tmp_path, {"delta_sequence": len(records)}, run_id="20261130T000000-aaaa")
    _, early_records = produce()
    fresh = IncrementalLearner(cfg(), shard=0)
    for i in range(0, 90, 30):  # a new run, three flushes in: a lower version than the old run's last
        fresh.learn(topic_stream(600, seed=5)[i : i + 30])
    seq = len(fresh.take_deltas())
    path = save_checkpoint(fresh, tmp_path, {"delta_sequence": seq}, run_id="20261201T000000-bbbb")
    assert fresh.version < learner.version and checkpoints(tmp_path, 0)[0] == path
    consumer = DeltaConsumer(cfg(), shards=1, checkpoint_dir=str(tmp_path))
    consumer.handle({**early_records[seq + 1], "sequence": seq + 2})  # a gap: resync
    assert consumer.counters["resyncs"] == 1 and consumer.version(0) == fresh.version


def test_the_consumer_says_health_metrics_and_whether_it_knows_a_user(served):
    from prometheus_client.parser import text_string_to_metric_families

    consumer, records, port, good = served
    assert all(body["known"] for _, body in good.values())
    status, body = get(port, "/scores?user=never-seen&k=5")
    assert status == 200 and body["known"] is False
    status, health = get(port, "/health")
    assert status == 200 and health["status"] == "ok" and health["deltas_applied"] == len(records) - 3
    import time

    emitted = {**records[-3], "emit_time_ms": int(time.time() * 1000) - 5_000}  # the next delta, emitted 5 s ago
    assert consumer.handle_message(schemas.encode(schemas.MODEL_DELTA, emitted)) == "applied"
    out_of_order = records[-1]  # two sequences ahead: buffered until the gap closes
    assert consumer.handle_message(schemas.encode(schemas.MODEL_DELTA, out_of_order)) == "buffered"
    consumer.handle_message(b"not avro")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    value = {name: {tuple(sorted(s.labels.items())): s.value for s in f.samples} for name, f in families.items()}
    shard0 = (("shard", "0"),)
    assert value["freshrec_consumer_applied_sequence"][shard0] == records[-3]["sequence"]
    assert value["freshrec_consumer_buffered_deltas"][shard0] == 1
    assert value["freshrec_consumer_deltas_applied"][shard0] == len(records) - 2
    assert value["freshrec_consumer_resyncs"][shard0] == 0
    assert value["freshrec_consumer_refused"][(("reason", "undecodable"),)] == 1
    assert 5 <= value["freshrec_consumer_seconds_behind"][shard0] < 60
