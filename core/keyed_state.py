"""Per-id state for keyed steps, grouped by key group, with an event-time TTL (runner-free).

A keyed step keyed by a unique id (an event id, a user, an item) pays its runner a state fetch, a
commit and a timer per id. Keyed by a *key group* instead (a stable hash of the id modulo
``groups``, as Flink's key groups), one state value holds the states of all ids of the group, and
``GroupStates`` keeps it a plain dict any runner's state can hold (the Beam adapters keep it
marshalled, the PyFlink job pickled). An id idle for ``ttl_ms`` of event time has expired: an event
that reads it (``state_for``, ``seen`` with ``ttl_ms``) finds none, as Flink's state TTL never returns an
expired value, whenever the state was last swept; and it is dropped when the group's newest event passes
it (``sweep``), so state stays bounded by the ids seen within the TTL. So what the steps compute does not
depend on when a runner's steps sweep (per event, per micro-batch) or clear idle groups.

>>> group = GroupStates.new()
>>> GroupStates.state_for(group, "u1", 1_000, dict, ttl_ms=60_000)["clicks"] = 1
>>> GroupStates.state_for(group, "u1", 61_001, dict, ttl_ms=60_000)  # idle for 60.001 s: expired, read as new
{}
>>> GroupStates.state_for(group, "u2", 90_000, dict, ttl_ms=60_000)
{}
>>> GroupStates.sweep(group, ttl_ms=60_000)  # u1 idle for 28.999 s, u2 for none: nothing to drop
0
>>> GroupStates.state_for(group, "u3", 200_000, dict, ttl_ms=60_000)
{}
>>> GroupStates.sweep(group, ttl_ms=60_000)  # as of 200 s: u1 and u2 idle for over 60 s
2
>>> sorted(group["states"])
['u3']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.batch import time_order
from model.hashing import stable_hash


def in_time_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch sorted by event time, equal times by their position in the input (``model.batch.time_order``)."""
    return sorted(events, key=time_order)


def key_group(key: str, groups: int) -> int:
    """The key group of an id: stable across processes and runs."""
    if groups < 1:
        raise ValueError(f"key groups must be >= 1, got {groups}")
    return stable_hash(key) % groups


class GroupStates:
    """The per-id states of one key group, as a plain dict a runner's state can hold.

    Layout: ``{"states": {id: state}, "touched": {id: newest event ms}, "newest": ms, "swept": ms}``.
    """

    @staticmethod
    def new() -> dict[str, Any]:
        return {"states": {}, "touched": {}, "newest": None, "swept": None}

    @staticmethod
    def touch(group: dict[str, Any], key: str, event_ms: int) -> None:
        touched = group["touched"]
        prev = touched.get(key)
        if prev is None or event_ms > prev:
            touched[key] = event_ms
        if group["newest"] is None or event_ms > group["newest"]:
            group["newest"] = event_ms

    @staticmethod
    def expired(group: dict[str, Any], key: str, event_ms: int, ttl_ms: int | None) -> bool:
        """Whether ``key`` was last touched ``ttl_ms`` or more before ``event_ms`` (never, without a TTL)."""
        last = group["touched"].get(key)
        return ttl_ms is not None and last is not None and last <= event_ms - ttl_ms

    @staticmethod
    def state_for(group: dict[str, Any], key: str, event_ms: int, new_state: Callable[[], Any],
                  ttl_ms: int | None = None) -> Any:
        """The state of ``key`` (``new_state()`` if it has none or it has expired), marked as touched at
        ``event_ms``."""
        states = group["states"]
        state = states.get(key)
        if state is None or GroupStates.expired(group, key, event_ms, ttl_ms):
            states[key] = state = new_state()
        GroupStates.touch(group, key, event_ms)
        return state

    @staticmethod
    def seen(group: dict[str, Any], key: str, event_ms: int, ttl_ms: int | None = None) -> bool:
        """Whether ``key`` was touched and has not expired (nor been swept); marks it touched at ``event_ms``
        if not. What a dedupe step keeps per event id."""
        if key in group["touched"] and not GroupStates.expired(group, key, event_ms, ttl_ms):
            return True
        GroupStates.touch(group, key, event_ms)
        return False

    @staticmethod
    def sweep(group: dict[str, Any], ttl_ms: int) -> int:
        """Drop ids idle for ``ttl_ms`` as of the group's newest event time, at most once per ``ttl_ms / 8``
        of event time. Returns how many were dropped."""
        newest = group["newest"]
        if newest is None:
            return 0
        every = max(1000, ttl_ms // 8)
        if group["swept"] is not None and newest - group["swept"] < every:
            return 0
        group["swept"] = newest
        cutoff = newest - ttl_ms
        touched, states = group["touched"], group["states"]
        idle = [k for k, t in touched.items() if t <= cutoff]
        for k in idle:
            del touched[k]
            states.pop(k, None)
        return len(idle)
