"""Stable (process-independent) hashing: shard keys and sketch buckets must not depend on PYTHONHASHSEED."""

from __future__ import annotations

import hashlib
import zlib


def stable_hash(key: str) -> int:
    """A 32-bit hash of ``key`` that is the same in every process and run."""
    return zlib.crc32(key.encode("utf-8"))


def shard_of(user_id: str, shards: int) -> int:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return stable_hash(user_id) % shards


def hash64(key: str, salt: int) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, salt=salt.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")
