"""The DirectRunner's Pub/Sub read acknowledges only at safe points (``pipelines.pubsub_read``), without the
emulator: the hold-and-release rule and the board's notion of settled."""

from __future__ import annotations

import pipelines.pubsub_read as pubsub_read
from core.progress import ProgressBoard
from pipelines.pubsub_read import _Reader


def test_held_pulls_are_released_together_once_everything_read_is_settled_and_the_oldest_is_due(monkeypatch):
    monkeypatch.setattr(pubsub_read, "ACK_EVERY_S", 30.0)
    clock = [100.0]
    monkeypatch.setattr(pubsub_read.time, "monotonic", lambda: clock[0])
    reader = _Reader()
    reader.hold(["a", "b"])
    clock[0] += 10
    reader.hold(["c"])
    assert reader.release(settled=True, draining=False) == []  # not due: at most every ACK_EVERY_S
    clock[0] += 25
    assert reader.held_s() == 35  # the oldest pull's wait: the read pauses from ACK_EVERY_S on
    assert reader.release(settled=False, draining=False) == []  # something read is neither durable nor dead
    assert reader.release(settled=True, draining=False) == ["a", "b", "c"]
    assert reader.held_s() == 0 and reader.release(settled=True, draining=True) == []
    reader.hold(["d"])
    assert reader.release(settled=True, draining=True) == ["d"]  # a drain does not wait for the period


def test_the_board_is_settled_when_every_event_read_is_durable_or_dead_lettered():
    board = ProgressBoard()
    board.note_emitted(5)
    board.note_flush(shard=0, events=3, version=1, stats=board.stats)
    board.note_dead(2)
    assert not board.settled()  # applied, but not yet in a checkpoint
    board.note_durable(3)
    assert board.settled()
    board.note_acked()
    assert board.acks == 1
