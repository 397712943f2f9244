"""A client of ``scripts/flink_cluster.sh`` (a standalone Flink cluster of separate JVMs on localhost) for the
programs that start their own: ``bench.engines`` and the Flink tests. Each cluster gets a work folder (config,
logs, PID files) and free localhost ports, so it never meets a cluster someone else runs.

    cluster = FlinkCluster("/tmp/work")
    cluster("up")
    print(cluster("status"))
    cluster("down")
"""

from __future__ import annotations

import glob
import os
import subprocess

from pipelines.emulator import free_port

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "flink_cluster.sh")


class FlinkCluster:
    """``flink_cluster.sh`` with its work folder under ``work`` and free localhost ports: REST, RPC, and one
    Prometheus reporter port each for the JobManager and up to three TaskManagers (``prom_ports``)."""

    def __init__(self, work: str | os.PathLike[str]):
        prom = free_port(4)
        self.prom_ports = range(prom, prom + 4)
        self.work = os.path.join(work, "cluster")
        self.script = SCRIPT
        self.env = {**os.environ, "FRESHREC_FLINK_WORK": self.work, "FRESHREC_FLINK_REST_PORT": str(free_port()),
                    "FRESHREC_FLINK_RPC_PORT": str(free_port()),
                    "FRESHREC_FLINK_PROM_PORTS": f"{prom}-{prom + len(self.prom_ports) - 1}"}

    def __call__(self, *args: str, timeout: float = 300) -> str:
        """Run ``flink_cluster.sh ARGS`` (up, down, status, ...); its output. RuntimeError, with it, on failure."""
        done = subprocess.run(["bash", self.script, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"flink_cluster.sh {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def daemon_pids(self) -> list[int]:
        """The JobManager's and TaskManagers' PIDs, from the script's PID files."""
        pids = []
        for path in glob.glob(os.path.join(self.work, "pid", "*.pid")):
            with open(path) as fh:
                pids.extend(int(x) for x in fh.read().split())
        return pids
