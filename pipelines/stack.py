"""The local Pub/Sub stack in one command: the emulator, the topics and subscriptions, the streaming
pipeline, the delta consumer and (with ``--data``) a publisher replaying a dataset at ``--rate``.

    freshrec stack up [--data ../shared/datasets/movielens-100k --rate 200] [--shards 4] [--port 8080]
    freshrec stack status          # each process alive or not, and the consumer's /health
    freshrec stack down            # stops exactly the processes ``up`` started, by the PIDs it recorded

Everything lives under ``--stack_dir`` (default ``out/stack``): ``stack.json`` (PIDs, ports, names),
each process's log, the pipeline's checkpoints, its sync folder and its run summary. Topics and
subscriptions are created with the client library (the gcloud CLI's topic commands need an account,
which the emulator does not), in project ``--project`` (default ``freshrec-local``). Every process
binds to localhost. The pipeline syncs its shards every 10 s of event time (``-- --sync_interval_s N``),
and an item reaches the consumer with the first merged epoch that holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

from core.settings import HelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ("events", "scores", "deltas", "rollbacks", "alerts", "dead-letter")
SUBSCRIPTIONS = {"events-pipeline": "events", "deltas-serving": "deltas"}


class StackError(Exception):
    """A stack command that cannot be done (one line, exit 2)."""


def _state_path(stack_dir: str) -> str:
    return os.path.join(stack_dir, "stack.json")


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is still the process we started (its command line holds ``marker``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return marker.encode() in fh.read()
    except OSError:
        return False


def _spawn(name: str, argv: list[str], stack_dir: str, env: dict[str, str]) -> dict[str, Any]:
    log = os.path.join(stack_dir, f"{name}.log")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return {"pid": proc.pid, "marker": argv[2] if argv[1] == "-m" else argv[0], "log": log}


def up(args: argparse.Namespace) -> int:
    from pipelines.emulator import EmulatorUnavailable, free_port, start_emulator

    stack_dir = os.path.abspath(args.stack_dir)
    if os.path.exists(_state_path(stack_dir)):
        state = _load(stack_dir)
        if any(_alive(p["pid"], p["marker"]) for p in state["processes"].values()):
            raise StackError(f"a stack is already up under {stack_dir} (freshrec stack down --stack_dir {args.stack_dir})")
    os.makedirs(stack_dir, exist_ok=True)
    try:
        emulator = start_emulator(args.project, log_path=os.path.join(stack_dir, "emulator.log"))
    except EmulatorUnavailable as exc:
        raise StackError(f"Pub/Sub emulator: {exc}") from exc
    processes: dict[str, Any] = {"emulator": {"pid": emulator.proc.pid, "marker": "pubsub",
                                              "log": os.path.join(stack_dir, "emulator.log")}}
    state = {"project": args.project, "emulator_host": emulator.host, "processes": processes, "port": None}
    try:
        from google.cloud import pubsub_v1

        topic = lambda name: f"projects/{args.project}/topics/freshrec-{name}"  # noqa: E731
        sub = lambda name: f"projects/{args.project}/subscriptions/freshrec-{name}"  # noqa: E731
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        for name in TOPICS:
            publisher.create_topic(request={"name": topic(name)})
        for name, on in SUBSCRIPTIONS.items():
            subscriber.create_subscription(request={"name": sub(name), "topic": topic(on), "ack_deadline_seconds": 60})
        env = {**os.environ, "PUBSUB_EMULATOR_HOST": emulator.host}
        py = sys.executable
        model = ["--shards", str(args.shards)]
        processes["pipeline"] = _spawn("pipeline", [
            py, "-m", "pipelines.cli", "--events_subscription", sub("events-pipeline"),
            "--scores_topic", topic("scores"), "--deltas_topic", topic("deltas"), "--rollbacks_topic", topic("rollbacks"),
            "--alerts_topic", topic("alerts"), "--dead_letter_topic", topic("dead-letter"),
            "--checkpoint_dir", os.path.join(stack_dir, "checkpoints"),
            "--sync_dir", os.path.join(stack_dir, "sync"), "--output_dir", os.path.join(stack_dir, "out"),
            "--flush_interval_s", "1", "--sync_interval_s", "10", *model, *args.pipeline_flags], stack_dir, env)
        port = args.port or free_port()
        state["port"] = port
        processes["consumer"] = _spawn("consumer", [
            py, "-m", "pipelines.consumer", "--subscription", sub("deltas-serving"), "--port", str(port),
            "--checkpoint_dir", os.path.join(stack_dir, "checkpoints"), *model], stack_dir, env)
        if args.data:
            processes["publisher"] = _spawn("publisher", [
                py, "-m", "pipelines.publisher", "--topic", topic("events"), "--data", args.data,
                "--rate", str(args.rate), "--speedup", str(args.speedup)], stack_dir, env)
    except BaseException:
        _stop_all(state)
        raise
    with open(_state_path(stack_dir), "w") as fh:
        json.dump(state, fh, indent=2)
    print(f"freshrec stack up under {stack_dir}: emulator {emulator.host} (project {args.project}), "
          f"pipeline pid {processes['pipeline']['pid']}, consumer http://127.0.0.1:{port}/scores?user=ID "
          f"(/health, /metrics)" + (f", publisher pid {processes['publisher']['pid']} at {args.rate:g}/s" if args.data else "")
          + f"; topics freshrec-{{{','.join(TOPICS)}}}; logs *.log there; stop it: freshrec stack down")
    return 0


def _stop_all(state: dict[str, Any]) -> list[str]:
    """SIGTERM each recorded process group (publisher first, emulator last), SIGKILL what is left after 20 s."""
    stopped = []
    order = [n for n in ("publisher", "pipeline", "consumer", "emulator") if n in state["processes"]]
    for name in order:
        p = state["processes"][name]
        if not _alive(p["pid"], p["marker"]):
            continue
        try:
            os.killpg(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.time() + 20
        while time.time() < deadline and _alive(p["pid"], p["marker"]):
            time.sleep(0.2)
        if _alive(p["pid"], p["marker"]):
            os.killpg(p["pid"], signal.SIGKILL)
        stopped.append(f"{name} ({p['pid']})")
    return stopped


def _load(stack_dir: str) -> dict[str, Any]:
    path = _state_path(os.path.abspath(stack_dir))
    if not os.path.exists(path):
        raise StackError(f"no stack under {stack_dir} (no {path}); start one with freshrec stack up")
    with open(path) as fh:
        return json.load(fh)


def down(args: argparse.Namespace) -> int:
    state = _load(args.stack_dir)
    stopped = _stop_all(state)
    os.unlink(_state_path(os.path.abspath(args.stack_dir)))
    print("freshrec stack down: stopped " + (", ".join(stopped) or "nothing (none was running)"))
    return 0


def status(args: argparse.Namespace) -> int:
    state = _load(args.stack_dir)
    alive = {n: _alive(p["pid"], p["marker"]) for n, p in state["processes"].items()}
    for name, ok in alive.items():
        print(f"  {name:10s} pid {state['processes'][name]['pid']:<8d} {'running' if ok else 'not running'}")
    if alive.get("consumer"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{state['port']}/health", timeout=5) as resp:
                print(f"  consumer /health: {resp.read().decode()}")
        except OSError as exc:
            print(f"  consumer /health: not answering ({exc})")
    return 0 if all(ok for name, ok in alive.items() if name != "publisher") else 1  # a publisher ends when done


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="freshrec stack", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--stack_dir", default=os.path.join("out", "stack"), help="where the stack keeps its state and logs")
    ap.add_argument("--project", default="freshrec-local", help="the emulator's project")
    ap.add_argument("--data", default=None, help="also start a publisher replaying this dataset (any --data the CLI reads)")
    ap.add_argument("--rate", type=float, default=100.0, help="the publisher's events/s")
    ap.add_argument("--speedup", type=float, default=1.0, help="the publisher divides the dataset's gaps between "
                    "events by this (event time starts now)")
    ap.add_argument("--shards", type=int, default=4, help="the pipeline's and the consumer's --shards")
    ap.add_argument("--port", type=int, default=0, help="the consumer's HTTP port on 127.0.0.1 (0: a free one)")
    ap.epilog = "Flags after -- go to the pipeline, e.g. freshrec stack up -- --batch_size 64"
    return ap


def stack_main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    args = make_parser().parse_args(argv[:cut])
    args.pipeline_flags = argv[cut + 1:]
    try:
        return {"up": up, "down": down, "status": status}[args.action](args)
    except StackError as exc:
        print(f"freshrec stack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(stack_main(sys.argv[1:]))
