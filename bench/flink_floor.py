"""The PyFlink job's floor: the shape of ``pipelines/flink_job.py`` with nothing inside its steps.

One reader and one decoder (``json.loads``) on one subtask, then the job's four keyed steps (by the key group
of the event id, of the item, of the user, and by the user's shard), each a Python ``KeyedProcessFunction``
that reads and writes one ``ValueState`` (a dict per key, as ``core.keyed_state.GroupStates`` is kept) and
passes the event on; the last writes each event's id to a file sink. No dedupe, features, model, outputs or
checkpoints: what moving every event through PyFlink's Python steps costs on this machine, whatever the steps
do.
``bench.engines --engines flink-floor-p2`` submits it to the same standalone cluster as the job and reports
it beside the DirectRunner (the lines written are its ``applied``: every input line comes out).

``--block N`` (``flink-floor-blocks-pN``) moves the events in blocks instead, the one design lever the job has
left: the decoder gathers N events, and each keyed step takes a bucket's part of a block (``--buckets`` buckets
of key groups; of shards, the shard), keeps one dict per key group in ``MapState`` and passes the block on,
split by the next step's buckets. A partial block waits in memory, not in state (there are no checkpoints
here); the end of the input sends it on.

    FRESHREC_FLINK_WORK=/tmp/c bash scripts/flink_cluster.sh submit --py bench/flink_floor.py -- \\
        --input events.jsonl --output /tmp/floor
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyflink.common import Encoder, Types, WatermarkStrategy  # noqa: E402
from pyflink.datastream import StreamExecutionEnvironment  # noqa: E402
from pyflink.datastream.connectors.file_system import FileSink, FileSource, StreamFormat  # noqa: E402
from pyflink.datastream.functions import KeyedProcessFunction, RuntimeContext  # noqa: E402
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor  # noqa: E402

from core.keyed_state import key_group  # noqa: E402
from core.settings import DEFAULTS  # noqa: E402
from model.hashing import shard_of  # noqa: E402
from pipelines.flink_io import END_OF_TIME  # noqa: E402

ROW = Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()])  # (bucket, [(key, event), ...])


def count(group: dict, event: dict, field: str) -> None:
    """A step's whole work: the event counted under its field in a key's dict."""
    name = str(event.get(field))
    group[name] = group.get(name, 0) + 1


class TouchState(KeyedProcessFunction):
    """Count the event under its field in the key's one dict of state, and pass it on (or its id, last)."""

    def __init__(self, field: str, last: bool = False):
        self.field, self.last = field, last

    def open(self, ctx: RuntimeContext):
        self.state = ctx.get_state(ValueStateDescriptor("group", Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, event, ctx):
        group = self.state.value() or {}
        count(group, event, self.field)
        self.state.update(group)
        yield str(event.get("event_id")) if self.last else event


def split(events: list[dict], key, buckets: int) -> list[tuple[int, list]]:
    """Events -> (bucket, [(key, event), ...]) rows, in the events' order within a bucket (``buckets`` 0: the
    key is the bucket, as shards are)."""
    rows: dict[int, list] = {}
    for event in events:
        k = key(event)
        rows.setdefault(k % buckets if buckets else k, []).append((k, event))
    return list(rows.items())


class GatherBlocks(KeyedProcessFunction):
    """Keyed by one constant: decode lines into blocks of ``size`` events, sent on split by the first step's
    buckets; the rest at the end of the input (an event-time timer at the end of time)."""

    def __init__(self, size: int, key, buckets: int):
        self.size, self.key, self.buckets = size, key, buckets

    def open(self, ctx: RuntimeContext):
        self.block: list[dict] = []

    def process_element(self, line, ctx):
        if not self.block:
            ctx.timer_service().register_event_time_timer(END_OF_TIME)
        self.block.append(json.loads(line))
        if len(self.block) >= self.size:
            yield from self.on_timer(END_OF_TIME, ctx)

    def on_timer(self, timestamp, ctx):
        block, self.block = self.block, []
        yield from split(block, self.key, self.buckets)


class TouchBlock(KeyedProcessFunction):
    """Keyed by bucket: count each event under its field in its key's dict (``MapState`` by key), and pass the
    events on split by the next step's buckets (or their ids, last)."""

    def __init__(self, field: str, next_key=None, buckets: int = 0):
        self.field, self.next_key, self.buckets = field, next_key, buckets

    def open(self, ctx: RuntimeContext):
        self.state = ctx.get_map_state(MapStateDescriptor("groups", Types.INT(), Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, row, ctx):
        touched: dict[int, dict] = {}
        for k, event in row[1]:
            group = touched.get(k)
            if group is None:
                group = touched[k] = self.state.get(k) or {}
            count(group, event, self.field)
        for k, group in touched.items():
            self.state.put(k, group)
        events = [event for _, event in row[1]]
        if self.next_key is None:
            yield "\n".join(str(event.get("event_id")) for event in events)
        else:
            yield from split(events, self.next_key, self.buckets)


def one_by_one(lines, keys):
    """Lines -> event ids, each event its own element through the decoder and the keyed steps."""
    events = lines.map(json.loads, output_type=Types.PICKLED_BYTE_ARRAY()).name("Decode").set_parallelism(1)
    for i, (field, key) in enumerate(keys):
        last = i == len(keys) - 1
        events = (events.key_by(key, key_type=Types.INT())
                  .process(TouchState(field, last), output_type=Types.STRING() if last else Types.PICKLED_BYTE_ARRAY())
                  .name(f"TouchState{i + 1}"))
    return events


def in_blocks(lines, keys, size: int, buckets: int):
    """Lines -> event ids, in blocks of ``size`` events split by ``buckets`` buckets of key groups per step."""
    per_step = [buckets] * (len(keys) - 1) + [0]  # the last step is keyed by shard itself
    blocks = (lines.key_by(lambda line: 0, key_type=Types.INT())
              .process(GatherBlocks(size, keys[0][1], per_step[0]), output_type=ROW)
              .name("DecodeIntoBlocks").set_parallelism(1))
    for i, (field, _) in enumerate(keys):
        last = i == len(keys) - 1
        step = TouchBlock(field) if last else TouchBlock(field, keys[i + 1][1], per_step[i + 1])
        blocks = (blocks.key_by(lambda row: row[0], key_type=Types.INT())
                  .process(step, output_type=Types.STRING() if last else ROW).name(f"TouchBlock{i + 1}"))
    return blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, help="JSON lines of raw events")
    ap.add_argument("--output", required=True, help="folder of the event ids that came through")
    ap.add_argument("--parallelism", type=int, default=1, help="subtasks of every keyed step")
    ap.add_argument("--shards", type=int, default=DEFAULTS["shards"], help="shards the last step is keyed by")
    ap.add_argument("--block", type=int, default=0, help="events per block (0: one event per element)")
    ap.add_argument("--buckets", type=int, default=8, help="buckets of key groups a block is split into per step")
    ap.add_argument("--cluster", action="store_true", help="(set by flink_cluster.sh submit)")
    args = ap.parse_args(argv)
    if args.block < 0 or args.buckets < 1:
        ap.error("--block must be >= 0 and --buckets >= 1")
    groups, shards = DEFAULTS["key_groups"], args.shards
    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(args.parallelism)
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), args.input).build()
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "ReplayEvents").set_parallelism(1)
    keys = (("event_id", lambda e: key_group(str(e.get("event_id")), groups)),
            ("item_id", lambda e: key_group(str(e.get("item_id")), groups)),
            ("user_id", lambda e: key_group(str(e.get("user_id")), groups)),
            ("user_id", lambda e: shard_of(str(e.get("user_id")), shards)))
    out = in_blocks(lines, keys, args.block, args.buckets) if args.block else one_by_one(lines, keys)
    out.sink_to(FileSink.for_row_format(args.output, Encoder.simple_string_encoder()).build())
    env.execute("freshrec-floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
