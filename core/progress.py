"""Progress of a run in this process: counters the steps bump, and a line printed every few seconds.

The steps (Beam DoFns or PyFlink functions) call ``note_read``, ``note_dead`` and ``note_flush``; a
``ProgressPrinter`` started by the command line prints ``BOARD.line()`` every ``interval_s`` while the
run goes on. On a runner whose workers are other processes each worker has its own board, and the
runner's own metrics (Beam counters, Flink metric groups) are what shows progress.

>>> board = ProgressBoard()
>>> board.note_read(3); board.note_dead(1)
>>> stats = BinaryStats()
>>> stats.update([1.0, 0.0], [0.9, 0.2])
>>> board.note_flush(shard=0, events=2, version=1, stats=stats)
>>> board.line(elapsed_s=2.0)
'2 s: 3 read, 2 applied, 1 dead-lettered, 1 events/s applied, 1 flushes, versions 0:1, running AUC 1.000'
>>> newest_counts(["starting", board.line(elapsed_s=2.0)])
(3, 2, 1)
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from model.metrics import BinaryStats


class ProgressBoard:
    """Counters of one process's run (approximate under threads: they only feed progress lines)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.read = self.dead = self.applied = self.flushes = self.emitted = 0
        self.durable = 0  # applied events that survive a crash: in a checkpoint (or applied, where none is written)
        self.acks = 0  # times a source acknowledged everything it had read (its ack epoch)
        self.flush_requested = False  # a source waits to acknowledge: steps that buffer flush what they get now
        self.versions: dict[int, int] = {}
        self.stats = BinaryStats()
        self.started = time.monotonic()

    def note_emitted(self, n: int = 1) -> None:
        """A source emitted ``n`` events (for flow control: ``in_flight``)."""
        self.emitted += n

    def in_flight(self) -> int:
        """Events a source emitted that are neither applied nor dead-lettered yet."""
        return self.emitted - self.applied - self.dead

    def settled(self) -> bool:
        """Every event a source emitted is durable (``note_durable``) or dead-lettered: what it read may be
        acknowledged."""
        return self.durable + self.dead >= self.emitted

    def note_durable(self, n: int) -> None:
        """``n`` applied events are now in a checkpoint on disk (or were applied, where the run writes none)."""
        self.durable += n

    def note_acked(self) -> None:
        """A source acknowledged everything it had read: a new ack epoch (``acks``) begins, and any flush
        request ends."""
        self.acks += 1
        self.flush_requested = False

    def request_flush(self, requested: bool = True) -> None:
        """A source is about to wait until what it read is durable (``settled``): the steps that buffer
        events flush each input as it comes (``flush_requested``) until the source acknowledges or gives up
        (``requested=False``), so the wait is one pass through the pipeline, not a flush interval."""
        self.flush_requested = requested

    def note_read(self, n: int = 1) -> None:
        self.read += n

    def note_dead(self, n: int = 1) -> None:
        self.dead += n

    def note_flush(self, shard: int, events: int, version: int, stats: BinaryStats) -> None:
        """A flush of ``events`` that left ``shard`` at ``version``; ``stats``: its prequential statistics."""
        self.applied += events
        self.flushes += 1
        self.versions[shard] = version
        self.stats = self.stats.merge(stats)

    def line(self, elapsed_s: float | None = None) -> str:
        elapsed = time.monotonic() - self.started if elapsed_s is None else elapsed_s
        auc = self.stats.auc()
        versions = " ".join(f"{s}:{v}" for s, v in sorted(self.versions.items())) or "none yet"
        return (f"{elapsed:.0f} s: {self.read:,} read, {self.applied:,} applied, {self.dead:,} dead-lettered, "
                f"{self.applied / max(elapsed, 1e-9):,.0f} events/s applied, {self.flushes:,} flushes, "
                f"versions {versions}, running AUC " + ("n/a" if auc != auc else f"{auc:.3f}"))


BOARD = ProgressBoard()
_COUNTS = re.compile(r"([\d,]+) read, ([\d,]+) applied, ([\d,]+) dead-lettered")


def newest_counts(lines: Sequence[str]) -> tuple[int, int, int]:
    """(read, applied, dead-lettered) of the newest progress line (``ProgressBoard.line``) among a run's output
    lines, for programs that watch a run from outside; zeros before the first."""
    for line in reversed(lines):
        if m := _COUNTS.search(line):
            read, applied, dead = (int(g.replace(",", "")) for g in m.groups())
            return read, applied, dead
    return 0, 0, 0


class ProgressPrinter:
    """Prints ``BOARD.line()`` to ``stream`` every ``interval_s`` seconds until stopped (a daemon thread)."""

    def __init__(self, interval_s: float, stream: TextIO | None = None, prefix: str = "freshrec: "):
        self.interval_s, self.stream, self.prefix = interval_s, stream or sys.stderr, prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="freshrec-progress", daemon=True)

    def start(self) -> ProgressPrinter:
        BOARD.reset()
        if self.interval_s > 0:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            print(self.prefix + BOARD.line(), file=self.stream, flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)
