"""The PyFlink job's floor: the shape of ``pipelines/flink_job.py`` with nothing inside its steps.

One reader and one decoder (``json.loads``) on one subtask, then the job's four keyed steps (by the key group
of the event id, of the item, of the user, and by the user's shard), each a Python ``KeyedProcessFunction``
that reads and writes one ``ValueState`` (a dict per key, as ``core.keyed_state.GroupStates`` is kept) and
passes the event on; the last writes each event's id to a file sink. No dedupe, features, model, outputs or
checkpoints: what moving every event through PyFlink's Python steps costs on this machine, whatever the steps
do.
``bench.engines --engines flink-floor-p2`` submits it to the same standalone cluster as the job and reports
it beside the DirectRunner (the lines written are its ``applied``: every input line comes out).

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
from pyflink.datastream.state import ValueStateDescriptor  # noqa: E402

from core.keyed_state import key_group  # noqa: E402
from core.settings import DEFAULTS  # noqa: E402
from model.hashing import shard_of  # noqa: E402


class TouchState(KeyedProcessFunction):
    """Count the event under its field in the key's one dict of state, and pass it on (or its id, last)."""

    def __init__(self, field: str, last: bool = False):
        self.field, self.last = field, last

    def open(self, ctx: RuntimeContext):
        self.state = ctx.get_state(ValueStateDescriptor("group", Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, event, ctx):
        group = self.state.value() or {}
        key = str(event.get(self.field))
        group[key] = group.get(key, 0) + 1
        self.state.update(group)
        yield str(event.get("event_id")) if self.last else event


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, help="JSON lines of raw events")
    ap.add_argument("--output", required=True, help="folder of the event ids that came through")
    ap.add_argument("--parallelism", type=int, default=1, help="subtasks of every keyed step")
    ap.add_argument("--shards", type=int, default=DEFAULTS["shards"], help="shards the last step is keyed by")
    ap.add_argument("--cluster", action="store_true", help="(set by flink_cluster.sh submit)")
    args = ap.parse_args(argv)
    groups, shards = DEFAULTS["key_groups"], args.shards
    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(args.parallelism)
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), args.input).build()
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "ReplayEvents").set_parallelism(1)
    events = lines.map(json.loads, output_type=Types.PICKLED_BYTE_ARRAY()).name("Decode").set_parallelism(1)
    keys = (("event_id", lambda e: key_group(str(e.get("event_id")), groups)),
            ("item_id", lambda e: key_group(str(e.get("item_id")), groups)),
            ("user_id", lambda e: key_group(str(e.get("user_id")), groups)),
            ("user_id", lambda e: shard_of(str(e.get("user_id")), shards)))
    for i, (field, key) in enumerate(keys):
        last = i == len(keys) - 1
        events = (events.key_by(key, key_type=Types.INT())
                  .process(TouchState(field, last), output_type=Types.STRING() if last else Types.PICKLED_BYTE_ARRAY())
                  .name(f"TouchState{i + 1}"))
    events.sink_to(FileSink.for_row_format(args.output, Encoder.simple_string_encoder()).build())
    env.execute("freshrec-floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
