"""Avro schemas for every record freshrec puts on the wire, and their codecs.

The ``.avsc`` files beside this module are the contract; this module parses them
once (with fastavro, cross-checked by the reference ``avro`` parser in tests) and
offers schemaless encode/decode plus the CRC-64-AVRO fingerprint that travels
with each Pub/Sub message so consumers can tell which schema wrote it.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parent

RAW_EVENT = "raw_event"
FEATURIZED_EVENT = "featurized_event"
SCORED_OUTPUT = "scored_output"
MODEL_DELTA = "model_delta"
DEAD_LETTER = "dead_letter"
ROLLBACK = "rollback"
ALERT = "alert"
WINDOW_STATS = "window_stats"
ALL = (RAW_EVENT, FEATURIZED_EVENT, SCORED_OUTPUT, MODEL_DELTA, DEAD_LETTER, ROLLBACK, ALERT, WINDOW_STATS)

EVENT_TYPES = ("view", "click", "rating", "purchase")


def schema_path(name: str) -> Path:
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.exists():
        raise KeyError(f"no schema named {name!r}; known: {', '.join(ALL)}")
    return path


@cache
def load_schema(name: str) -> Any:
    """The parsed (fastavro) schema called ``name`` (file stem in ``schemas/``)."""
    with schema_path(name).open() as fh:
        return fastavro.parse_schema(json.load(fh))


@cache
def schema_fingerprint(name: str) -> str:
    """Hex CRC-64-AVRO fingerprint of the schema's parsing canonical form."""
    return str(fingerprint(to_parsing_canonical_form(load_schema(name)), "CRC-64-AVRO"))


def name_for_fingerprint(fp: str) -> str | None:
    for name in ALL:
        if schema_fingerprint(name) == fp:
            return name
    return None


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Schemaless Avro binary encoding of ``record``; raises ValueError if it does not fit."""
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, load_schema(name), record, strict=True)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"record does not fit schema {name!r}: {exc}") from exc
    return buf.getvalue()


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode`; raises ValueError on bytes the schema cannot read whole."""
    buf = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buf, load_schema(name), None)
    except Exception as exc:  # fastavro raises many types on garbage input
        raise ValueError(f"bytes are not a {name!r} record: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(data):
        raise ValueError(f"bytes are not a {name!r} record: {len(data) - buf.tell()} trailing bytes")
    if not isinstance(record, dict):
        raise ValueError(f"bytes are not a {name!r} record")
    return record
