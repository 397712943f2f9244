"""Downstream consumer: applies the delta stream to a serving copy of the model and serves scores.

Deltas are applied per shard strictly in ``sequence`` order. A duplicate (sequence already applied)
is ignored. A gap (a sequence was lost) triggers a resync from the shard's latest checkpoint
(``--checkpoint_dir`` of the pipeline, whose files record the delta sequence they include), after
which buffered deltas newer than the checkpoint are applied. Scores come from the same code the
pipeline uses (``model.serving``), so for the same version they are the same. Each shard's copy is a
``ServingModel``: the published tables alone, no optimizer state or undo log.

    python -m pipelines.consumer --subscription projects/P/subscriptions/deltas-sub --shards 4 --port 8080
    curl 'localhost:8080/scores?user=42&k=10'    # "known": false for a user the serving copy has no row of
    curl localhost:8080/health                   # {"status": "ok", ...}
    curl localhost:8080/metrics                  # Prometheus text: per shard sequence, deltas, buffered, resyncs, lag
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import schemas
from core.settings import HelpFormatter, add_flags, pipeline_config
from model.checkpoint import checkpoints, verified_state
from model.config import LearnerConfig
from model.deltas import ModelDelta
from model.hashing import shard_of
from model.serving import BadDelta, ServingModel

LOG = logging.getLogger("freshrec.consumer")
MAX_K = 1000


@dataclass
class _ShardReplica:
    model: ServingModel
    applied_sequence: int = 0
    pending: dict[int, ModelDelta] = field(default_factory=dict)  # checked deltas waiting for a gap to close
    deltas_applied: int = 0
    resyncs: int = 0
    newest_emit_ms: dict[int, int] = field(default_factory=dict)  # emit time of each pending sequence
    applied_emit_ms: int = 0  # emit time of the newest delta applied (or of the checkpoint's last one)


class DeltaConsumer:
    def __init__(self, cfg: LearnerConfig, shards: int, checkpoint_dir: str | None = None):
        self.cfg, self.shards, self.checkpoint_dir = cfg, shards, checkpoint_dir
        self.replicas = {s: _ShardReplica(ServingModel(cfg, s)) for s in range(shards)}
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_message(self, data: bytes, message_id: str = "?") -> str:
        """Take one Pub/Sub message's data; a message that is not a delta this copy can apply is refused
        (counted and logged with its id), never raised: the copy keeps serving its last good state."""
        try:
            record = schemas.decode(schemas.MODEL_DELTA, data)
        except Exception as exc:  # any decoding failure of one message: bytes from anywhere
            return self._refuse("undecodable", f"message {message_id}: {type(exc).__name__}: {exc}")
        return self.handle(record, message_id)

    def _refuse(self, reason: str, detail: str) -> str:
        self.counters["refused"] += 1
        self.counters[f"refused_{reason}"] += 1
        LOG.error("delta refused (%s): %s", reason, detail)
        return "refused"

    def handle(self, record: dict[str, Any], message_id: str = "?") -> str:
        """Take one delta record (``schemas/model_delta.avsc``); returns what happened to it: applied,
        buffered (waiting for a gap to close), duplicate or refused."""
        with self._lock:
            shard = int(record["shard"])
            if shard not in self.replicas:
                return self._refuse("unknown_shard", f"message {message_id}: shard {shard} of {self.shards}")
            rep = self.replicas[shard]
            try:
                delta = ModelDelta.from_record(record)
                rep.model.check_delta(delta)
            except BadDelta as exc:
                return self._refuse(exc.reason, f"message {message_id}: shard {shard}: {exc}")
            except (TypeError, ValueError, RuntimeError) as exc:  # rows that do not even make a tensor
                return self._refuse("malformed", f"message {message_id}: shard {shard}: {exc}")
            seq = int(record["sequence"])
            if seq <= rep.applied_sequence or seq in rep.pending:
                self.counters["duplicates"] += 1
                return "duplicate"
            rep.pending[seq] = delta
            rep.newest_emit_ms[seq] = int(record.get("emit_time_ms") or 0)
            if seq != rep.applied_sequence + 1:
                self.counters["gaps"] += 1
                if not self._resync(shard):
                    return "buffered"
            self._drain(rep)
            return "applied"

    def _drain(self, rep: _ShardReplica) -> None:
        while rep.applied_sequence + 1 in rep.pending:
            rep.model.apply_delta(rep.pending.pop(rep.applied_sequence + 1))
            rep.applied_sequence += 1
            rep.applied_emit_ms = max(rep.applied_emit_ms, rep.newest_emit_ms.pop(rep.applied_sequence, 0))
            rep.deltas_applied += 1
            self.counters["applied"] += 1

    def _resync(self, shard: int) -> bool:
        """Load the shard's newest readable checkpoint (an unreadable one is counted and skipped for the next
        older); deltas it already contains are dropped from the buffer."""
        if not self.checkpoint_dir:
            return False
        rep = self.replicas[shard]
        for path in checkpoints(self.checkpoint_dir, shard):
            try:
                state = verified_state(path)
                seq = int(state.get("meta", {}).get("delta_sequence", 0))
                model = ServingModel.from_state(state, self.cfg) if seq > rep.applied_sequence else None
            except Exception as exc:  # truncated, corrupted, refused pickle, another model's tables
                self.counters["checkpoint_errors"] += 1
                LOG.error("shard %d: checkpoint %s unreadable (%s: %s); trying an older one", shard, path,
                          type(exc).__name__, exc)
                continue
            if model is None:
                return False
            break
        else:
            return False
        rep.model = model
        rep.applied_sequence = seq
        rep.pending = {s: r for s, r in rep.pending.items() if s > seq}
        rep.newest_emit_ms = {s: t for s, t in rep.newest_emit_ms.items() if s > seq}
        rep.resyncs += 1
        self.counters["resyncs"] += 1
        LOG.warning("shard %d resynced from %s (delta sequence %d)", shard, path, seq)
        return True

    def version(self, shard: int) -> int:
        return self.replicas[shard].model.version

    def scores(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        with self._lock:
            model = self.replicas[shard_of(user_id, self.shards)].model
            return model.topk([user_id], k)[user_id]

    def knows(self, user_id: str) -> bool:
        """Whether the serving copy holds a row of ``user_id`` (otherwise its scores are the item side's alone)."""
        with self._lock:
            return user_id in self.replicas[shard_of(user_id, self.shards)].model.queries.index

    def collect(self):
        """Prometheus metrics (``prometheus_client`` collector protocol): per shard and refusals by reason."""
        now_ms = time.time() * 1000
        gauges = {
            "applied_sequence": GaugeMetricFamily("freshrec_consumer_applied_sequence",
                                                  "Newest delta sequence applied, per shard", labels=["shard"]),
            "pending": GaugeMetricFamily("freshrec_consumer_buffered_deltas",
                                         "Deltas received out of order, waiting for a gap to close", labels=["shard"]),
            "lag": GaugeMetricFamily("freshrec_consumer_seconds_behind",
                                     "Seconds since the newest applied delta was emitted by the pipeline", labels=["shard"]),
            "version": GaugeMetricFamily("freshrec_consumer_model_version", "Model version served", labels=["shard"]),
        }
        applied = CounterMetricFamily("freshrec_consumer_deltas_applied", "Deltas applied", labels=["shard"])
        resyncs = CounterMetricFamily("freshrec_consumer_resyncs", "Resyncs from a checkpoint after a gap", labels=["shard"])
        refused = CounterMetricFamily("freshrec_consumer_refused", "Messages refused, by reason", labels=["reason"])
        with self._lock:
            for shard, rep in sorted(self.replicas.items()):
                label = [str(shard)]
                gauges["applied_sequence"].add_metric(label, rep.applied_sequence)
                gauges["pending"].add_metric(label, len(rep.pending))
                gauges["lag"].add_metric(label, max(0.0, (now_ms - rep.applied_emit_ms) / 1000) if rep.applied_emit_ms
                                         else float("nan"))
                gauges["version"].add_metric(label, rep.model.version)
                applied.add_metric(label, rep.deltas_applied)
                resyncs.add_metric(label, rep.resyncs)
            for key, n in sorted(self.counters.items()):
                if key.startswith("refused_"):
                    refused.add_metric([key[len("refused_"):]], n)
        yield from (*gauges.values(), applied, resyncs, refused)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"status": "ok", "shards": self.shards, "deltas_applied": self.counters["applied"],
                    "refused": self.counters["refused"],
                    "model_versions": {str(s): r.model.version for s, r in sorted(self.replicas.items())}}


def query(consumer: DeltaConsumer, path: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a GET: every bad parameter is a 400 with a one-line error."""
    url = urlparse(path)
    if url.path == "/health":
        return 200, consumer.health()
    if url.path != "/scores":
        return 404, {"error": f"no such endpoint {url.path!r}: GET /scores?user=ID&k=N, /health or /metrics"}
    q = parse_qs(url.query)
    users = q.get("user", [])
    if len(users) != 1 or not users[0]:
        return 400, {"error": "user: expected one user id, as /scores?user=ID"}
    raw_k = q.get("k", ["10"])
    try:
        k = int(raw_k[0]) if len(raw_k) == 1 else 0
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        return 400, {"error": f"k: expected one integer from 1 to {MAX_K}, got {','.join(raw_k)!r}"}
    user = users[0]
    shard = shard_of(user, consumer.shards)
    return 200, {"user_id": user, "shard": shard, "model_version": consumer.version(shard), "known": consumer.knows(user),
                 "items": [{"item_id": i, "score": s} for i, s in consumer.scores(user, k)]}


def serve(consumer: DeltaConsumer, port: int) -> ThreadingHTTPServer:
    """GET /scores?user=ID&k=N, /health and /metrics (Prometheus text) on 127.0.0.1:``port`` (0: any free
    port) in a daemon thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(consumer)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            content_type = "application/json"
            try:
                if urlparse(self.path).path == "/metrics":
                    status, data, content_type = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                else:
                    status, body = query(consumer, self.path)
                    data = json.dumps(body).encode()
            except Exception as exc:  # never drop a connection without an answer
                LOG.exception("GET %s failed", self.path)
                status, data = 500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--subscription", required=True, help="projects/P/subscriptions/S on the delta topic")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--checkpoint_dir", default=None)
    add_flags(ap, ("model", "sharding"), skip=("device",))  # the pipeline's flags: the same tables and shards
    return ap


def main(argv: list[str] | None = None) -> int:
    from google.cloud import pubsub_v1

    ap = make_parser()
    args = ap.parse_args(argv)
    cfg = pipeline_config(args)
    consumer = DeltaConsumer(cfg.learner, cfg.sharding.shards, args.checkpoint_dir)
    serve(consumer, args.port)

    def callback(message: Any) -> None:
        consumer.handle_message(message.data, getattr(message, "message_id", "?"))  # refusals are counted and logged
        message.ack()

    # ordered per shard by sequence in handle(); flow control keeps memory bounded
    future = pubsub_v1.SubscriberClient().subscribe(args.subscription, callback,
                                                    flow_control=pubsub_v1.types.FlowControl(max_messages=1))
    print(f"consuming {args.subscription}; serving http://127.0.0.1:{args.port}/scores?user=ID")
    try:
        future.result()
    except KeyboardInterrupt:
        future.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
