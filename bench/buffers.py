"""Buffers: what the batch DirectRunner's engine (Beam's ``FnApiRunner``) holds between steps while a
flow-controlled stream runs, per buffer, in bytes per input event.

    python -m bench.buffers --events 40000 [--json FILE] [-- more CLI flags]

The engine runs the steps after a flatten or a group of several steps' outputs only when their input ends,
so what a run sends them stays in memory, encoded, until then, and is decoded at the end. This runs the CLI
in this process (``--synthetic_events N --batch_max_events 0 --quiet``) with the engine's buffers counted as
they are appended to, and prints the largest: bytes in, bytes per event, appends. Timer buffers
(``timers:``) are emptied as the engine collects their timers; the others are held until the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def count_buffers() -> tuple[collections.Counter, collections.Counter]:
    """Patch the engine so that every append to one of its buffers is counted: (bytes, appends) by buffer id."""
    from apache_beam.runners.portability.fn_api_runner import execution

    from transforms.runtime import keep_each_steps_timers_apart

    keep_each_steps_timers_apart()  # the pipeline's own patch of the engine's buffers first, counted below

    sizes: collections.Counter = collections.Counter()
    appends: collections.Counter = collections.Counter()
    get_buffer, counted = execution.BundleContextManager.get_buffer, set()

    def counting(self, buffer_id, transform_id):
        buf = get_buffer(self, buffer_id, transform_id)
        if id(buf) not in counted:
            counted.add(id(buf))
            append = buf.append

            def counted_append(data, _append=append, _key=buffer_id.decode()):
                sizes[_key] += len(data)
                appends[_key] += 1
                return _append(data)

            buf.append = counted_append
        return buf

    execution.BundleContextManager.get_buffer = counting
    return sizes, appends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=40_000, help="synthetic events (default: 40,000)")
    ap.add_argument("--top", type=int, default=8, help="buffers printed (default: 8)")
    ap.add_argument("--json", help="also write the counts here")
    ap.add_argument("cli_flags", nargs="*", help="more flags for the CLI (after --)")
    args = ap.parse_args(argv)
    sizes, appends = count_buffers()
    from pipelines import cli

    with tempfile.TemporaryDirectory(prefix="freshrec-buffers-") as out:
        code = cli.main(["--synthetic_events", str(args.events), "--batch_max_events", "0", "--quiet",
                         "--output_dir", out, *args.cli_flags])
    rows = [{"buffer": k, "bytes": v, "bytes_per_event": round(v / args.events, 1), "appends": appends[k]}
            for k, v in sizes.most_common()]
    total = sum(sizes.values())
    print(f"\n{args.events:,} events: {total / 1e6:.2f} MB through the engine's buffers, {total / args.events:.0f} bytes an event")
    for r in rows[: args.top]:
        print(f"  {r['bytes'] / 1e6:8.2f} MB  {r['bytes_per_event']:7.1f} B/event  {r['appends']:6d} appends  {r['buffer']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"events": args.events, "bytes": total, "buffers": rows}, fh, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
