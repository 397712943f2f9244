"""Avro contracts and the runner-free validation of raw events."""

from __future__ import annotations

import json

import avro.schema
import pytest

import schemas
from core.cleaning import CleanConfig, InvalidEvent, LatenessTracker, decode_event, validate_event

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "rating",
        "event_time_ms": 1_700_000_000_000, "value": 4.0, "context": {"device": "phone"}}


@pytest.mark.parametrize("name", schemas.ALL)
def test_every_schema_parses_with_avro_and_fastavro(name):
    with schemas.schema_path(name).open() as fh:
        avro.schema.parse(fh.read())
    assert schemas.load_schema(name)
    assert len(schemas.schema_fingerprint(name)) == 16
    assert schemas.name_for_fingerprint(schemas.schema_fingerprint(name)) == name


def test_round_trip_and_refusals():
    data = schemas.encode(schemas.RAW_EVENT, GOOD)
    assert schemas.decode(schemas.RAW_EVENT, data) == GOOD
    with pytest.raises(ValueError, match="trailing"):
        schemas.decode(schemas.RAW_EVENT, data + b"\x00")
    with pytest.raises(ValueError, match="does not fit"):
        schemas.encode(schemas.RAW_EVENT, {**GOOD, "event_type": "teleport"})


def test_decode_accepts_wire_bytes_and_mapped_dicts():
    assert decode_event(schemas.encode(schemas.RAW_EVENT, GOOD)) == GOOD
    assert decode_event({**GOOD, "user_id": 7, "value": 4})["user_id"] == "7"
    # a reader's position stamp rides along (it orders events of one time); the wire's records have none
    assert decode_event({**GOOD, "seq": 12}) == {**GOOD, "seq": 12}


@pytest.mark.parametrize("change, reason", [
    ({"event_id": None}, "missing field 'event_id'"),
    ({"user_id": ""}, "field 'user_id' must have"),
    ({"item_id": "x" * 300}, "field 'item_id' must have"),
    ({"user_id": 1.5}, "must be a string or integer id"),
    ({"event_type": "teleport"}, "unknown event_type"),
    ({"event_time_ms": "soon"}, "event_time_ms must be an integer"),
    ({"event_time_ms": float("nan")}, "event_time_ms must be an integer"),
    ({"event_time_ms": 5}, "outside"),
    ({"event_time_ms": 10**16}, "outside"),
    ({"value": float("inf")}, "finite number"),
    ({"value": None}, "rating event without a value"),
    ({"context": {"k": "v" * 2000}}, "context entry longer"),
    ({"context": ["not", "a", "map"]}, "context must be a map"),
    ({"seq": -1}, "seq .* must be a non-negative integer"),
    ({"seq": "3"}, "seq .* must be a non-negative integer"),
    ({"seq": True}, "seq .* must be a non-negative integer"),
])
def test_validation_reasons(change, reason):
    with pytest.raises(InvalidEvent, match=reason):
        validate_event({**GOOD, **change})


def test_undecodable_bytes_and_non_records():
    with pytest.raises(InvalidEvent, match="undecodable Avro"):
        decode_event(b"\xff\x00\x13")
    with pytest.raises(InvalidEvent, match="expected a record"):
        decode_event(json.dumps(GOOD))


def test_lateness_tracker_is_conservative():
    t = LatenessTracker(allowed_lateness_ms=100)
    assert not t.is_late(0)  # nothing proven yet
    t.advance(1_000)
    assert not t.is_late(900) and t.is_late(899)
    t.advance(500)  # proofs never move backwards
    assert t.watermark_ms == 1_000


def test_clean_config_validates():
    with pytest.raises(ValueError):
        CleanConfig(min_event_time_ms=10, max_event_time_ms=5)
