"""Runner-free persistence of a shard's learner in keyed state: a snapshot plus a journal of the
micro-batches applied since. The learner is deterministic, so snapshot + journal replay rebuilds it
exactly; Beam's UpdateShardModel and the PyFlink job both keep their partitions this way."""

from __future__ import annotations

import struct

import schemas
from model.config import LearnerConfig
from model.learner import IncrementalLearner


def frame(records: list[bytes]) -> bytes:
    """Length-prefixed concatenation (one state entry holding a whole micro-batch)."""
    return b"".join(struct.pack("<I", len(r)) + r for r in records)


def unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def journal_entry(events: list[dict]) -> bytes:
    return frame([schemas.encode(schemas.FEATURIZED_EVENT, e) for e in events])


def restore_learner(cfg: LearnerConfig, shard: int, snapshot: bytes | None, journal: list[bytes]) -> IncrementalLearner:
    """Rebuild a shard's learner from its state: the snapshot, then every journaled micro-batch in order."""
    learner = IncrementalLearner.from_bytes(snapshot, cfg) if snapshot else IncrementalLearner(cfg, shard)
    for entry in journal:
        learner.learn([schemas.decode(schemas.FEATURIZED_EVENT, rec) for rec in unframe(entry)])
        learner.take_deltas()
    return learner
