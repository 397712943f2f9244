"""The sync medium over Beam's FileSystems: a local folder on the DirectRunner, ``gs://`` on Dataflow.

Publications are written under a temp name and renamed (FileSystems.rename: a local rename, a
copy-then-delete on object stores, whose readers never see a partial object either way)."""

from __future__ import annotations

import os
import uuid

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems


class FileSystemsMedium:
    def __init__(self, location: str):
        self.location = location.rstrip("/")

    def _path(self, name: str) -> str:
        return FileSystems.join(self.location, name)

    def put(self, name: str, data: bytes) -> None:
        if not FileSystems.exists(self.location):
            try:
                FileSystems.mkdirs(self.location)
            except OSError:  # another shard made it first
                if not FileSystems.exists(self.location):
                    raise
        tmp = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
        with FileSystems.create(tmp) as fh:
            fh.write(data)
        FileSystems.rename([tmp], [self._path(name)])

    def get(self, name: str) -> bytes:
        with FileSystems.open(self._path(name)) as fh:
            return fh.read()

    def names(self) -> list[str]:
        if "://" not in self.location:  # a local folder: a listing, not a glob that stats every file
            try:
                return [n for n in os.listdir(self.location) if n.endswith(".sync") and not n.startswith(".")]
            except FileNotFoundError:
                return []
        if not FileSystems.exists(self.location):
            return []
        found = FileSystems.match([self._path("*.sync")])[0].metadata_list
        return [m.path.rsplit("/", 1)[-1] for m in found]

    def remove(self, name: str) -> None:
        try:
            FileSystems.delete([self._path(name)])
        except BeamIOError as exc:
            if FileSystems.exists(self._path(name)):
                raise
            raise FileNotFoundError(self._path(name)) from exc
