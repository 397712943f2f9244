"""Physical records of an input file: each one a row, or an unparsable record with the reason why.

Every line of a line format (csv, tsv, jsonl) is one record, blank and broken ones included, so the
count of records a replay reads equals the file's line count (a header line excepted). A line that
cannot be a row becomes ``{"__unparsable__": its first KB, "__reason__": code}`` and validation
dead-letters it with that code: ``blank``, ``too_large`` (over ``max_bytes``, checked before parsing),
``invalid_utf8``, ``bad_quoting`` (a quote that is not closed on its line: quoting never swallows
the lines after it), ``not_json``, ``too_deep``, ``number_out_of_range``, ``not_an_object``,
``bad_avro``. No single record can end a replay.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "e.jsonl")
>>> _ = open(path, "wb").write(b'{"user_id": "u1"}\\n\\n[1, 2]\\n' + b"[" * 10_000 + b"\\n")
>>> [r.get("__reason__", "row") for r in jsonl_records(path)]
['row', 'blank', 'not_an_object', 'too_deep']
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from typing import Any

MAX_EVENT_BYTES = 64 * 1024
KEEP_BYTES = 2048


def unparsable(reason: str, raw: bytes) -> dict[str, Any]:
    """The record for a line that cannot be a row: its first ``KEEP_BYTES``, its length and SHA-256."""
    head = raw[:KEEP_BYTES].decode("utf-8", "replace")
    if len(raw) > KEEP_BYTES:
        head += f"... ({len(raw):,} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:16]})"
    return {"__unparsable__": head, "__reason__": reason}


def _texts(path: str, max_bytes: int) -> Iterator[str | dict[str, Any]]:
    """Each line (split on newline bytes only: a carriage return inside a record stays inside it) as text,
    or an unparsable record."""
    with open(path, "rb") as fh:
        for raw in fh:
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if len(raw) > max_bytes:
                yield unparsable("too_large", raw)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield unparsable("invalid_utf8", raw)
                continue
            yield text if text.strip() else unparsable("blank", raw)


def csv_records(path: str, delimiter: str, columns: tuple[str, ...] | None,
                max_bytes: int = MAX_EVENT_BYTES) -> Iterator[dict[str, Any]]:
    """Rows of a delimited file, one per line; the first line is the header unless ``columns`` name them."""
    header = list(columns) if columns else None
    if max_bytes > csv.field_size_limit():
        csv.field_size_limit(max_bytes)
    for text in _texts(path, max_bytes):
        if isinstance(text, dict):
            if header is not None:
                yield text
            continue
        try:
            row = next(csv.reader([text], delimiter=delimiter, strict=True))
        except csv.Error:
            if header is not None:
                yield unparsable("bad_quoting", text.encode())
            continue
        if header is None:
            header = row
            continue
        yield dict(zip(header, row, strict=False))


def jsonl_records(path: str, max_bytes: int = MAX_EVENT_BYTES) -> Iterator[dict[str, Any]]:
    """One JSON object per line."""
    for text in _texts(path, max_bytes):
        if isinstance(text, dict):
            yield text
            continue
        try:
            rec = json.loads(text)
        except RecursionError:
            yield unparsable("too_deep", text.encode())
            continue
        except ValueError as exc:  # JSONDecodeError, or an integer over Python's digit limit
            reason = "number_out_of_range" if "digits" in str(exc) else "not_json"
            yield unparsable(reason, text.encode())
            continue
        if not isinstance(rec, dict):
            yield unparsable("not_an_object", text.encode())
            continue
        try:  # an escaped lone surrogate ("\ud800") decodes to a string no coder can write
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            yield unparsable("invalid_utf8", text.encode("utf-8", "surrogatepass"))
            continue
        except (RecursionError, ValueError):
            yield unparsable("too_deep", text.encode("utf-8", "surrogatepass"))
            continue
        yield rec


def avro_records(path: str) -> Iterator[dict[str, Any]]:
    """Records of an Avro container file; a damaged block ends the file with one ``bad_avro`` record."""
    import fastavro

    with open(path, "rb") as fh:
        try:
            for rec in fastavro.reader(fh):
                yield rec if isinstance(rec, dict) else unparsable("not_an_object", repr(rec).encode())
        except Exception as exc:  # a truncated or corrupted container: fastavro raises many kinds
            yield unparsable("bad_avro", f"{type(exc).__name__}: {exc}".encode())
