"""Runner-free decoding and validation of raw behaviour events.

``decode_event`` accepts Avro bytes (the wire format, ``schemas/raw_event.avsc``) or an already
mapped dict (file replay) and returns a normalised record that fits the schema, or raises
``InvalidEvent`` whose ``reason`` says what is wrong. Beam and PyFlink adapters call it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import schemas

MIN_EVENT_TIME_MS = 631_152_000_000  # 1990-01-01: older timestamps are treated as corrupt
MAX_EVENT_TIME_MS = 4_102_444_800_000  # 2100-01-01
MAX_ID_LENGTH = 256
MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_VALUE_LENGTH = 1024
MAX_ABS_VALUE = 1e6


class InvalidEvent(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CleanConfig:
    """What a valid event is. ``value_range``: the domain of ``value`` (a dataset's rating scale, from its
    preset or ``--value_range``); without one, a value beyond ±``MAX_ABS_VALUE`` is out of any rating,
    price or count and refused."""

    min_event_time_ms: int = MIN_EVENT_TIME_MS
    max_event_time_ms: int = MAX_EVENT_TIME_MS
    max_id_length: int = MAX_ID_LENGTH
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.min_event_time_ms >= self.max_event_time_ms:
            raise ValueError("CleanConfig: min_event_time_ms must be < max_event_time_ms")
        if self.value_range is not None and not (math.isfinite(self.value_range[0]) and math.isfinite(self.value_range[1])
                                                 and self.value_range[0] <= self.value_range[1]):
            raise ValueError(f"--value_range: expected LOW,HIGH with LOW <= HIGH, got {self.value_range}")


def raw_bytes(payload: Any) -> bytes:
    """The payload as bytes, for the dead-letter record."""
    if isinstance(payload, bytes):
        return payload
    try:
        return json.dumps(payload, default=str, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(payload)[:2048].encode("utf-8", "replace")
        except (ValueError, RecursionError):  # an integer of thousands of digits, a structure too deep
            return f"<{type(payload).__name__} that cannot be shown>".encode()


def _short(value: Any) -> str:
    """At most 40 characters of a value, for a reason (an integer of thousands of digits has no str)."""
    try:
        return str(value)[:40]
    except ValueError:
        return "an integer of over 4,300 digits"


def _id(record: dict[str, Any], name: str, cfg: CleanConfig) -> str:
    value = record.get(name)
    if value is None:
        raise InvalidEvent(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent(f"field {name!r} must be a string or integer id, got {type(value).__name__}")
    if isinstance(value, int) and abs(value) >= 10**40:
        raise InvalidEvent(f"number_out_of_range: field {name!r} is an integer of over 40 digits")
    text = str(value)
    if not text or len(text) > cfg.max_id_length:
        raise InvalidEvent(f"field {name!r} must have 1..{cfg.max_id_length} characters, got {len(text)}")
    if text != text.strip() or not text.isprintable():  # whitespace at an end, NUL, RTL overrides, lone surrogates
        raise InvalidEvent(f"id_invalid: field {name!r} must be printable text without surrounding spaces, "
                           f"got {text[:40]!r}")
    return text


def validate_event(record: Any, cfg: CleanConfig = CleanConfig()) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InvalidEvent(f"not_an_object: expected a record (dict), got {type(record).__name__}")
    if "__unparsable__" in record:  # a record the reader could not make a row of (core.records)
        raise InvalidEvent(f"{record.get('__reason__', 'unparsable')}: line {record.get('line')}")
    event: dict[str, Any] = {name: _id(record, name, cfg) for name in ("event_id", "user_id", "item_id")}
    etype = record.get("event_type")
    if etype not in schemas.EVENT_TYPES:
        raise InvalidEvent(f"unknown event_type {_short(etype)!r}; expected one of {', '.join(schemas.EVENT_TYPES)}")
    event["event_type"] = etype
    ts = record.get("event_time_ms")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or (isinstance(ts, float) and not math.isfinite(ts)):
        raise InvalidEvent(f"event_time_ms must be an integer (epoch ms), got {_short(ts)!r}")
    ts = int(ts)
    if not cfg.min_event_time_ms <= ts <= cfg.max_event_time_ms:
        shown = ts if abs(ts) < 10**40 else "of over 40 digits"
        raise InvalidEvent(f"event_time_ms {shown} outside [{cfg.min_event_time_ms}, {cfg.max_event_time_ms}]")
    event["event_time_ms"] = ts
    value = record.get("value")
    if value is not None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**300:
            raise InvalidEvent("number_out_of_range: value is an integer too large for a float")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise InvalidEvent(f"value must be a finite number or null, got {_short(value)!r}")
        value = float(value)
        low, high = cfg.value_range or (-MAX_ABS_VALUE, MAX_ABS_VALUE)
        if not low <= value <= high:
            raise InvalidEvent(f"value_out_of_range: value {value:g} outside [{low:g}, {high:g}]")
    if etype == "rating" and value is None:
        raise InvalidEvent("rating event without a value")
    event["value"] = value
    context = record.get("context") or {}
    if not isinstance(context, dict) or len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidEvent(f"context must be a map of at most {MAX_CONTEXT_ENTRIES} entries")
    clean_ctx = {}
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise InvalidEvent("context keys must be strings and values strings or numbers")
        text = str(v)
        if len(k) > MAX_CONTEXT_VALUE_LENGTH or len(text) > MAX_CONTEXT_VALUE_LENGTH:
            raise InvalidEvent(f"context entry longer than {MAX_CONTEXT_VALUE_LENGTH} characters")
        clean_ctx[k] = text
    event["context"] = clean_ctx
    seq = record.get("seq")
    if seq is not None:  # the event's position in its input (a reader's stamp): breaks ties in event time
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidEvent(f"seq (the position in the input) must be a non-negative integer, got {_short(seq)!r}")
        event["seq"] = seq
    return event


def decode_event(payload: Any, cfg: CleanConfig = CleanConfig()) -> dict[str, Any]:
    """Avro bytes or a mapped dict -> a validated raw event dict; raises InvalidEvent."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            record = schemas.decode(schemas.RAW_EVENT, bytes(payload))
        except ValueError as exc:
            raise InvalidEvent(f"undecodable Avro: {exc}") from exc
    else:
        record = payload
    return validate_event(record, cfg)


# a resumed Pub/Sub run's refusal of an event its checkpoints hold as applied (Pub/Sub redelivered it): not bad input
REDELIVERED = "already applied: redelivered after a restart"


def dead_letter(payload: Any, reason: str, step: str, event: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record for ``schemas/dead_letter.avsc``."""
    return {
        "raw": raw_bytes(payload if event is None else event),
        "reason": reason,
        "step": step,
        "event_id": None if event is None else event.get("event_id"),
        "event_time_ms": None if event is None else event.get("event_time_ms"),
    }


@dataclass
class LatenessTracker:
    """Conservative lateness test from a lower bound on the watermark.

    Beam's Python DoFns cannot read the input watermark, but an event-time timer that fires at t
    proves the watermark has reached t. The Beam adapter feeds those proofs to ``advance`` and asks
    ``is_late``: an event is late when it is older than the proven watermark minus the allowed
    lateness. On-time data is never called late; late data may pass while no proof has arrived yet.
    """

    allowed_lateness_ms: int
    watermark_ms: int = -(2**62)

    def advance(self, watermark_ms: int) -> None:
        self.watermark_ms = max(self.watermark_ms, watermark_ms)

    def is_late(self, event_time_ms: int) -> bool:
        return event_time_ms < self.watermark_ms - self.allowed_lateness_ms

    def late_reason(self, event_time_ms: int) -> str:
        """The dead letter's reason for a late event."""
        return (f"late: event time is {self.watermark_ms - event_time_ms} ms behind the watermark "
                f"(allowed lateness {self.allowed_lateness_ms} ms)")
