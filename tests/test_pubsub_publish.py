"""Publishing in large requests (pipelines.pubsub.publish_batch) and the throttled publisher over it, against
a stand-in for the client's generated API."""

from __future__ import annotations

import time

from pipelines.publisher import publish
from pipelines.pubsub import MAX_REQUEST_MESSAGES, publish_batch


class FakeApi:
    def __init__(self) -> None:
        self.requests: list[tuple[float, str, list[tuple[bytes, dict[str, str]]]]] = []

    def publish(self, request, timeout):
        pb = request._pb
        self.requests.append((time.monotonic(), pb.topic, [(m.data, dict(m.attributes)) for m in pb.messages]))


class FakeClient:
    def __init__(self) -> None:
        self.api = FakeApi()


def test_publish_batch_sends_at_most_pubsubs_limits_per_request_in_order():
    client = FakeClient()
    messages = [(f"m{i}".encode(), {"n": str(i)}) for i in range(2 * MAX_REQUEST_MESSAGES + 500)]
    assert publish_batch(client, "projects/p/topics/t", messages) == len(messages)
    assert [len(r[2]) for r in client.api.requests] == [MAX_REQUEST_MESSAGES, MAX_REQUEST_MESSAGES, 500]
    assert {r[1] for r in client.api.requests} == {"projects/p/topics/t"}
    assert [m for r in client.api.requests for m in r[2]] == messages

    big = FakeClient()  # 4 MB each: two fit under the 10 MB request limit, not three
    assert publish_batch(big, "projects/p/topics/t", [(b"x" * 4_000_000, {})] * 5) == 5
    assert [len(r[2]) for r in big.api.requests] == [2, 2, 1]
    assert publish_batch(big, "projects/p/topics/t", []) == 0 and len(big.api.requests) == 3


def test_the_publisher_keeps_the_rate_and_sends_what_is_due_together():
    client = FakeClient()
    stamps: list[float] = []

    def messages():
        for i in range(100):
            stamps.append(time.monotonic())  # taken when due: the stamp a message carries is its publication
            yield f"m{i}".encode(), {}

    started = time.monotonic()
    assert publish("projects/p/topics/t", messages(), rate=500, publisher=client) == 100
    took = time.monotonic() - started
    assert 0.19 <= took < 2.0, took  # 100 at 500/s: the last is due at 0.198 s
    sent = [m for r in client.api.requests for m in r[2]]
    assert sent == [(f"m{i}".encode(), {}) for i in range(100)]
    assert 2 <= len(client.api.requests) <= 40, "messages due within a tick go in one request"
    assert all(stamps[i] - started >= i / 500 - 0.005 for i in range(100)), "none taken before it is due"
