"""The PyFlink job's inputs and outputs: what it reads (a JSONL file, a landing folder it watches, any dataset
the CLI reads, or the synthetic stream), the folders it writes (the Beam pipeline's ``scores/``, ``deltas/``,
``rollbacks/``, ``alerts/``, ``dead_letter/``, ``stats/``: JSON lines of the same Avro records, in part
files committed on checkpoints), and the run summary it ends with (``core.run_summary``, checked against
the input: applied + dead-lettered = in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pyflink.common import Duration, Encoder, Types
from pyflink.datastream.connectors.file_system import (
    FileSink,
    FileSource,
    OutputFileConfig,
    RollingPolicy,
    StreamFormat,
)
from pyflink.datastream.functions import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from core import run_summary
from core.readers import embedded_stream, synthetic_events
from core.run_summary import write_summary
from pipelines.results import (
    ALERTS,
    DEAD_LETTER,
    DELTAS,
    ROLLBACKS,
    SCORES,
    STATS,
    clear_outputs,
    count_lines,
    output_paths,
    records,
)

END_OF_TIME = 2**62
SUMMARY_PARTS = "summary_parts"  # the summary record's committed part file; summary.json is written from it
FOLDERS = (SCORES, DELTAS, ROLLBACKS, ALERTS, DEAD_LETTER, STATS, SUMMARY_PARTS)


def prepare_input(args: argparse.Namespace) -> str:
    """The file or folder the job reads: ``--input`` as given; else ``--data`` (exported as ``freshrec export``
    does) or the synthetic stream, written once under ``CHECKPOINT_DIR/input/`` (a restored run reads the same
    file). Raises ValueError or OSError (the caller prints one line and exits 2)."""
    if args.input:
        if not os.path.exists(args.input):
            raise ValueError(f"--input {args.input}: no such file or folder")
        if args.watch_s and not os.path.isdir(args.input):
            raise ValueError(f"--watch_s needs --input to be a landing folder, got the file {args.input}")
        return args.input
    if args.watch_s:
        raise ValueError("--watch_s needs --input DIR (the landing folder to watch)")
    path = os.path.join(args.checkpoint_dir, "input", "events.jsonl")
    if args.restore_from and os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from pipelines.export import export, write_jsonl

    if args.data:
        export(args, path)
    else:
        write_jsonl(synthetic_events(embedded_stream(args.synthetic_events, args.seed)), path)
    return path


def source(path: str, watch_s: float) -> FileSource:
    """Lines of a file, or of every file in a folder; with ``watch_s``, the folder is listed again every
    ``watch_s`` seconds and new files are read as they land (an unbounded stream)."""
    builder = FileSource.for_record_stream_format(StreamFormat.text_line_format(), path)
    if watch_s:
        builder = builder.monitor_continuously(Duration.of_millis(int(watch_s * 1000)))
    return builder.build()


def start_outputs(args: argparse.Namespace) -> dict[str, str]:
    """The output folders; a fresh run (no ``--restore_from``) first removes what an earlier run left at exactly
    these paths, as the Beam CLI does (a restored run adds to its own committed files)."""
    paths = {**output_paths(args.output), SUMMARY_PARTS: os.path.join(args.output, SUMMARY_PARTS)}
    if not args.restore_from:
        clear_outputs(paths)
    return paths


def sink_to_folder(stream, folder: str, name: str) -> None:
    """JSON lines into part files under ``folder``, rolled and committed on every checkpoint (exactly once,
    and visible a checkpoint interval after they were written: the default policy would hold a file open
    for up to a minute)."""
    config = OutputFileConfig.builder().with_part_prefix("part").with_part_suffix(".jsonl").build()
    sink = (FileSink.for_row_format(folder, Encoder.simple_string_encoder()).with_output_file_config(config)
            .with_rolling_policy(RollingPolicy.on_checkpoint_rolling_policy()).build())
    stream.sink_to(sink).uid(f"sink-{name}").name(f"Write{name.title().replace('_', '')}")


class SummarizeRun(KeyedProcessFunction):
    """Keyed by 0: the run's ledger (``core.run_summary``: flush reports, dead letters, drift alerts) in
    ValueState; when the input ends, the summary record."""

    def open(self, ctx: RuntimeContext):
        self.acc = ctx.get_state(ValueStateDescriptor("run_summary", Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, item, ctx):
        self.acc.update(run_summary.add(self.acc.value() or run_summary.new(), item))
        ctx.timer_service().register_event_time_timer(END_OF_TIME)

    def on_timer(self, timestamp, ctx):
        acc = self.acc.value()
        if acc is not None:
            yield json.dumps(run_summary.extract(acc))


def summarize(reports, dead, drift_alerts):
    """Flush reports (dicts), dead letters and drift alerts (JSON lines) -> the summary record (a JSON line)."""
    items = [reports.map(lambda r: ("report", r), output_type=Types.PICKLED_BYTE_ARRAY()).name("ReportToLedger"),
             dead.map(lambda s: ("dead_letter", json.loads(s)), output_type=Types.PICKLED_BYTE_ARRAY()).name("DeadToLedger")]
    if drift_alerts is not None:
        items.append(drift_alerts.map(lambda s: ("alert", json.loads(s)), output_type=Types.PICKLED_BYTE_ARRAY())
                     .name("AlertToLedger"))
    return (items[0].union(*items[1:]).key_by(lambda _: 0, key_type=Types.INT())
            .process(SummarizeRun(), output_type=Types.STRING()).uid("summarize-run").name("SummarizeRun"))


def finish_run(paths: dict[str, str], input_path: str, quiet: bool) -> int:
    """After a bounded run: ``summary.json`` from the committed summary record, with ``events_in`` (the
    input's lines, counted here), printed; 1 on an accounting mismatch (applied + dead-lettered != in)."""
    found = list(records(paths[SUMMARY_PARTS]))
    if len(found) != 1:
        print(f"flink_job: expected one committed summary record under {paths[SUMMARY_PARTS]}, found {len(found)}",
              file=sys.stderr)
        return 1
    summary: dict[str, Any] = found[0]
    summary["events_in"] = count_lines(input_path)
    write_summary(summary, paths["summary"])
    if not quiet:
        print(json.dumps(summary, indent=2, sort_keys=True))
    if summary["events_in"] != summary["events_accounted"]:
        print(f"flink_job: ACCOUNTING MISMATCH: {summary['events_in']} in, {summary['events_accounted']} accounted",
              file=sys.stderr)
        return 1
    return 0
