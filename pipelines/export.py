"""``freshrec export``: any dataset the CLI replays, written as the raw events the PyFlink job, the
publisher and ``--data`` read back: JSON lines (every row, in event-time order) or an Avro container
of ``schemas/raw_event.avsc`` (the rows that pass validation; the others are counted).

    freshrec export --data ../shared/datasets/movielens-100k --output /tmp/events.jsonl
    freshrec export --data ratings.csv --columns user_id=userId,item_id=movieId --output /tmp/events.avro
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import fastavro

import schemas
from core.cleaning import InvalidEvent, validate_event
from core.layout import LayoutError
from core.readers import read_replay
from core.settings import HelpFormatter, add_flags, input_layout


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="freshrec export", description=__doc__,
                                 formatter_class=HelpFormatter, allow_abbrev=False)
    ap.add_argument("--output", required=True, help="FILE.jsonl or FILE.avro")
    add_flags(ap, ("input",), only=("data", "data_format", "columns", "time_unit", "limit"))
    return ap


def export(data_args: argparse.Namespace, output: str) -> tuple[int, int]:
    """(written, refused); raises LayoutError, ValueError or OSError before writing anything it cannot."""
    if not output.endswith((".jsonl", ".avro")):
        raise ValueError(f"--output {output}: expected a .jsonl or .avro file name")
    layout = input_layout(data_args)
    if layout is None:
        raise ValueError("--data is required (a dataset file or folder)")
    print(f"freshrec export: reading {data_args.data} as {layout.described}", file=sys.stderr)
    events = read_replay(data_args.data, layout.mapping, data_args.limit)
    if output.endswith(".jsonl"):
        return write_jsonl(events, output), 0
    valid, refused = [], 0
    for e in events:
        try:
            valid.append(validate_event(e))
        except InvalidEvent:
            refused += 1
    tmp = output + ".tmp"
    with open(tmp, "wb") as fh:
        fastavro.writer(fh, schemas.load_schema(schemas.RAW_EVENT), valid)
    os.replace(tmp, output)
    return len(valid), refused


def write_jsonl(events: Iterable[dict[str, Any]], output: str) -> int:
    """``events`` as JSON lines at ``output`` (written to a temp file, then renamed), each with its position in
    ``events`` as ``seq`` (so that a reader of the file can keep events of one time in this order); how many."""
    tmp, n = output + ".tmp", 0
    with open(tmp, "w") as fh:
        for e in events:
            fh.write(json.dumps({**e, "seq": n}, default=str) + "\n")
            n += 1
    os.replace(tmp, output)
    return n


def export_main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    try:
        written, refused = export(args, args.output)
    except (LayoutError, ValueError, OSError) as exc:
        print(f"freshrec export: error: {exc}", file=sys.stderr)
        return 2
    print(f"freshrec export: wrote {written:,} events to {args.output}"
          + (f" ({refused:,} rows refused by validation)" if refused else ""))
    return 0
