"""Pub/Sub messages on the wire: schemaless-Avro data plus attributes (Beam-free, for the publisher
and the consumer as much as for the pipeline).

Every message carries its schema's CRC-64-AVRO fingerprint (``schema_fingerprint``); events carry
their event time in ``event_time_ms``; outputs carry ``shard``, ``model_version`` and a per-shard
``sequence`` so consumers can detect gaps and duplicates.
"""

from __future__ import annotations

from typing import Any

import schemas

EVENT_TIME_ATTR = "event_time_ms"
FINGERPRINT_ATTR = "schema_fingerprint"


def event_message(record: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) for one raw event; raises ValueError if it does not fit the schema."""
    data = schemas.encode(schemas.RAW_EVENT, record)
    return data, {FINGERPRINT_ATTR: schemas.schema_fingerprint(schemas.RAW_EVENT),
                  EVENT_TIME_ATTR: str(int(record["event_time_ms"]))}


def output_attributes(schema_name: str, record: dict[str, Any]) -> dict[str, str]:
    attrs = {FINGERPRINT_ATTR: schemas.schema_fingerprint(schema_name)}
    for key in ("shard", "model_version", "sequence", "table", "user_id", "step"):
        if record.get(key) is not None:
            attrs[key] = str(record[key])
    return attrs
