"""Beam coders that put freshrec records on the wire (and in state) as schemaless Avro."""

from __future__ import annotations

from typing import Any

from apache_beam import coders

import schemas


class AvroRecordCoder(coders.Coder):
    """Encodes dicts with one of the ``schemas/`` Avro schemas."""

    def __init__(self, schema_name: str):
        schemas.load_schema(schema_name)  # fail at construction on an unknown name
        self.schema_name = schema_name

    def encode(self, value: dict[str, Any]) -> bytes:
        return schemas.encode(self.schema_name, value)

    def decode(self, encoded: bytes) -> dict[str, Any]:
        return schemas.decode(self.schema_name, encoded)

    def is_deterministic(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AvroRecordCoder) and other.schema_name == self.schema_name

    def __hash__(self) -> int:
        return hash((type(self), self.schema_name))
