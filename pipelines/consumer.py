"""Downstream consumer: applies the delta stream to a serving copy of the model and serves scores.

Deltas are applied per shard strictly in ``sequence`` order. A duplicate (sequence already applied)
is ignored. A gap (a sequence was lost) triggers a resync from the shard's latest checkpoint
(``--checkpoint_dir`` of the pipeline, whose files record the delta sequence they include), after
which buffered deltas newer than the checkpoint are applied. Scores come from the same code the
pipeline uses (``model.serving``), so for the same version they are the same. Each shard's copy is a
``ServingModel``: the published tables alone, no optimizer state or undo log.

    python -m pipelines.consumer --subscription projects/P/subscriptions/deltas-sub --shards 4 --port 8080
    curl 'localhost:8080/scores?user=42&k=10'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import schemas
from core.settings import HelpFormatter, add_flags, pipeline_config
from model.checkpoint import checkpoint_meta, latest_checkpoint
from model.config import LearnerConfig
from model.deltas import ModelDelta
from model.hashing import shard_of
from model.serving import ServingModel

LOG = logging.getLogger("freshrec.consumer")


@dataclass
class _ShardReplica:
    model: ServingModel
    applied_sequence: int = 0
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)


class DeltaConsumer:
    def __init__(self, cfg: LearnerConfig, shards: int, checkpoint_dir: str | None = None):
        self.cfg, self.shards, self.checkpoint_dir = cfg, shards, checkpoint_dir
        self.replicas = {s: _ShardReplica(ServingModel(cfg, s)) for s in range(shards)}
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, record: dict[str, Any]) -> str:
        """Take one delta record (``schemas/model_delta.avsc``); returns what happened to it."""
        with self._lock:
            shard = int(record["shard"])
            if shard not in self.replicas:
                raise ValueError(f"DeltaConsumer: delta for shard {shard} but only {self.shards} shards configured")
            rep = self.replicas[shard]
            seq = int(record["sequence"])
            if seq <= rep.applied_sequence or seq in rep.pending:
                self.counters["duplicates"] += 1
                return "duplicate"
            rep.pending[seq] = record
            if seq != rep.applied_sequence + 1:
                self.counters["gaps"] += 1
                if not self._resync(shard):
                    return "buffered"
            self._drain(rep)
            return "applied"

    def _drain(self, rep: _ShardReplica) -> None:
        while rep.applied_sequence + 1 in rep.pending:
            rec = rep.pending.pop(rep.applied_sequence + 1)
            rep.model.apply_delta(ModelDelta.from_record(rec))
            rep.applied_sequence += 1
            self.counters["applied"] += 1

    def _resync(self, shard: int) -> bool:
        """Load the shard's newest checkpoint; deltas it already contains are dropped from the buffer."""
        if not self.checkpoint_dir:
            return False
        path = latest_checkpoint(self.checkpoint_dir, shard)
        if path is None:
            return False
        seq = int(checkpoint_meta(path).get("delta_sequence", 0))
        rep = self.replicas[shard]
        if seq <= rep.applied_sequence:
            return False
        rep.model = ServingModel.from_checkpoint(path, self.cfg)
        rep.applied_sequence = seq
        rep.pending = {s: r for s, r in rep.pending.items() if s > seq}
        self.counters["resyncs"] += 1
        LOG.warning("shard %d resynced from %s (delta sequence %d)", shard, path, seq)
        return True

    def version(self, shard: int) -> int:
        return self.replicas[shard].model.version

    def scores(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        with self._lock:
            model = self.replicas[shard_of(user_id, self.shards)].model
            return model.topk([user_id], k)[user_id]


def serve(consumer: DeltaConsumer, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path != "/scores" or "user" not in q:
                self.send_error(404, "GET /scores?user=ID&k=N")
                return
            user = q["user"][0]
            k = int(q.get("k", ["10"])[0])
            shard = shard_of(user, consumer.shards)
            body = json.dumps({"user_id": user, "shard": shard, "model_version": consumer.version(shard),
                               "items": [{"item_id": i, "score": s} for i, s in consumer.scores(user, k)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

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
        try:
            consumer.handle(schemas.decode(schemas.MODEL_DELTA, message.data))
        except ValueError as exc:
            LOG.error("undecodable delta message dropped: %s", exc)
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
