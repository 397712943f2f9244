"""Start and stop the local Pub/Sub emulator (``gcloud beta emulators pubsub start``) by PID.

Used by the emulator tests and the freshness benchmark. gcloud starts a Java child; both run in a
new process group that ``stop`` ends as a whole."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass


class EmulatorUnavailable(RuntimeError):
    pass


def _ephemeral_low() -> int:
    """The lowest port of the kernel's range for outgoing connections (Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive free localhost ports, below the kernel's ephemeral range. A client
    polling a port of that range before its server listens can be given that very port as its own source
    port, and Linux then connects the socket to itself: the poll "succeeds" and reads back its own request
    (a Flink test's Prometheus scrape once failed so, with ``BadStatusLine: GET /metrics``)."""
    low = _ephemeral_low()
    lo = max(1024, low // 2)
    rng = random.Random()  # its own: a test that seeds the module's generator must not make processes agree
    for _ in range(500):
        if low - count > lo:
            first = rng.randrange(lo, low - count + 1)
        else:  # no room below the range (an unusual ip_local_port_range): a port the kernel hands out
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                first = s.getsockname()[1]
        if all(_bindable(p) for p in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free localhost ports")


@dataclass
class Emulator:
    proc: subprocess.Popen
    host: str
    project: str

    def stop(self) -> None:
        if os.environ.get("PUBSUB_EMULATOR_HOST") == self.host:
            del os.environ["PUBSUB_EMULATOR_HOST"]
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_emulator(project: str, timeout_s: float = 90.0, log_path: str | None = None) -> Emulator:
    """Start the emulator on a free port and point PUBSUB_EMULATOR_HOST at it; raises EmulatorUnavailable.
    With ``log_path`` its output goes to that file (so it outlives this process), else to a pipe."""
    if shutil.which("gcloud") is None:
        raise EmulatorUnavailable("`gcloud` is not on PATH (install the Google Cloud SDK and "
                                  "`gcloud components install pubsub-emulator beta`)")
    port = free_port()
    env = {**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    out = open(log_path, "ab") if log_path else subprocess.PIPE  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port=localhost:{port}", f"--project={project}"],
        stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    emulator = Emulator(proc, f"localhost:{port}", project)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
            raise EmulatorUnavailable(f"the emulator exited ({proc.returncode}): {out}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
                return emulator
        except OSError:
            time.sleep(0.5)
    emulator.stop()
    raise EmulatorUnavailable(f"the emulator did not open port {port} within {timeout_s:.0f} s")
