"""Sync media: where the shards' publications of their shared parameters meet (``model.sync``).

A medium is a flat folder of immutable files, each written atomically (a temp name, then a rename),
so a reader sees a publication whole or not at all. ``FolderMedium`` is a local or mounted folder
(the DirectRunner, the PyFlink job, tests); ``transforms.medium.FileSystemsMedium`` is the same over
Beam's FileSystems (``gs://`` on Dataflow). ``check_medium`` proves at start that a medium can be
written and read back, so a missing or read-only one is one clear error, not silent divergence.

>>> import tempfile
>>> medium = FolderMedium(tempfile.mkdtemp())
>>> check_medium(medium)
>>> medium.put("a.sync", b"x"); medium.names(), medium.get("a.sync")
(['a.sync'], b'x')
"""

from __future__ import annotations

import os
import uuid
from typing import Any


class MediumError(ValueError):
    """The sync medium cannot be used; the message names its location."""


class FolderMedium:
    """A local or mounted folder (created if missing)."""

    def __init__(self, location: str):
        self.location = location

    def put(self, name: str, data: bytes) -> None:
        os.makedirs(self.location, exist_ok=True)
        tmp = os.path.join(self.location, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(self.location, name))

    def get(self, name: str) -> bytes:
        with open(os.path.join(self.location, name), "rb") as fh:
            return fh.read()

    def names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.location) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        os.remove(os.path.join(self.location, name))


def check_medium(medium: Any) -> None:
    """Write, read back and remove a probe file; ``MediumError`` naming the location if any step fails."""
    name = f"probe-{uuid.uuid4().hex}"
    try:
        medium.put(name, b"freshrec")
        ok = medium.get(name) == b"freshrec"
        medium.remove(name)
    except Exception as exc:  # noqa: BLE001 - any failure means the medium is unusable
        raise MediumError(f"sync medium {medium.location}: cannot be written and read back "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc})") from exc
    if not ok:
        raise MediumError(f"sync medium {medium.location}: a probe file read back differently")
