"""The local Pub/Sub stack in one command (``freshrec stack up|status|down``): the emulator, the pipeline,
the consumer and a publisher come up, a published dataset reaches the consumer's scores, and ``down`` stops
exactly the processes ``up`` recorded. Skipped where gcloud's emulator is absent."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.emulator
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "stack", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def test_the_stack_comes_up_serves_fresh_scores_and_goes_down_by_its_own_pids(tmp_path):
    if shutil.which("gcloud") is None:
        pytest.skip("Pub/Sub emulator absent: `gcloud` is not on PATH")
    rng = random.Random(1)
    data = tmp_path / "ratings.csv"
    data.write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{rng.randrange(20)},{rng.randrange(40)},{rng.randint(1, 5)},{1_700_000_000 + i}\n" for i in range(400)))
    where = str(tmp_path / "stack")
    up = stack("up", "--stack_dir", where, "--data", str(data), "--rate", "100", "--shards", "2", "--", "--batch_size", "16")
    if up.returncode == 2 and "emulator" in up.stderr:
        pytest.skip(f"Pub/Sub emulator absent: {up.stderr.strip()}")
    state = json.loads((tmp_path / "stack" / "stack.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        again = stack("up", "--stack_dir", where)
        assert again.returncode == 2 and "already up" in again.stderr
        port, served = state["port"], None
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                health = get(port, "/health")
                served = get(port, "/scores?user=3&k=3")
                if health["deltas_applied"] and served["items"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert served is not None and served["known"] and served["items"], served
        status = stack("status", "--stack_dir", where)
        assert status.returncode == 0 and "pipeline" in status.stdout and '"status": "ok"' in status.stdout
    finally:
        down = stack("down", "--stack_dir", where)
    assert down.returncode == 0 and "stopped" in down.stdout
    from pipelines.stack import _alive

    for name, proc in state["processes"].items():
        assert not _alive(proc["pid"], proc["marker"]), name
    assert not os.path.exists(os.path.join(where, "stack.json"))


def test_the_local_services_ports_lie_below_the_ephemeral_range_so_a_poll_cannot_connect_to_itself():
    """A client that polls a port of the kernel's ephemeral range before its server listens can be given that
    port as its own source port, and Linux connects the socket to itself (the poll reads back its own request).
    The ports handed to the emulator, the stack's consumer and the Flink clusters (REST, RPC, one Prometheus
    port per JVM) are free and below that range."""
    from pipelines.emulator import _ephemeral_low, free_port
    from pipelines.flink_cluster import FlinkCluster

    low = _ephemeral_low()
    for count in (1, 4):
        first = free_port(count)
        assert first >= 1024 and first + count - 1 < low, (first, count, low)
    cluster = FlinkCluster("/nonexistent")  # nothing starts until it is called
    ports = [*cluster.prom_ports, int(cluster.env["FRESHREC_FLINK_REST_PORT"]), int(cluster.env["FRESHREC_FLINK_RPC_PORT"])]
    assert all(p < low for p in ports), (ports, low)
    assert list(cluster.prom_ports) == list(range(cluster.prom_ports[0], cluster.prom_ports[0] + 4))
