"""freshrec command line.

    freshrec [run] [FLAGS]                       run the pipeline (default: the synthetic stream, DirectRunner)
    freshrec show OUT [--user U] [--shard S]     look at a run's results
    freshrec report OUT [--html FILE]            a page of charts over event time (OUT/report.html)
    freshrec export --data PATH --output FILE    write a dataset as raw events (JSON lines or Avro)
    freshrec stack up|status|down [--data PATH]  the local Pub/Sub stack: emulator, pipeline, consumer, publisher

    freshrec --data ../shared/datasets/movielens-100k --output_dir out/ml
    freshrec --data ratings.csv --columns user_id=userId,item_id=movieId,event_time=timestamp
    freshrec --runner_config runner_configs/flink.yaml ...

Every flag is checked before any work starts: a mistake (an unknown flag, a missing path, a value out
of range, an unwritable output folder) is one line on stderr and exit code 2. ``python -m
pipelines.cli`` is the same command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from typing import Any

import yaml

from core.layout import LayoutError
from core.progress import ProgressPrinter
from core.settings import HelpFormatter, add_flags, check_flags, pipeline_config, sync_location
from pipelines.results import (
    DEAD_LETTER,
    check_dead_letter_fraction,
    clear_outputs,
    output_paths,
    remove_temp_dirs,
    window_totals,
)

BEAM_VERSION = "2.77.0"


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="freshrec", usage="freshrec [run] [FLAGS] | freshrec show OUT | freshrec report OUT | freshrec export --data PATH --output FILE",
                 description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    add_flags(ap)
    g = ap.add_argument_group("runner: where the pipeline runs (any other Beam pipeline option, e.g. --project or "
                              "--flink_master, passes through to the runner)")
    g.add_argument("--runner_config", help="YAML file of pipeline options, e.g. runner_configs/flink.yaml (flags given "
                                           "here win)")
    g.add_argument("--runner", default="DirectRunner", help="Beam runner (default: DirectRunner)")
    g.add_argument("--streaming", action="store_true", help="run as a streaming pipeline (default: off; on with "
                                                             "--events_subscription)")
    return ap


def load_runner_config(path: str) -> list[str]:
    """A runner config is a YAML mapping of pipeline options; returns them as --flags."""
    if not os.path.isfile(path):
        raise UsageError(f"--runner_config {path}: no such file")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--runner_config {path}: not YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("options", {}), dict):
        raise UsageError(f"--runner_config {path}: expected a mapping with an 'options' mapping of pipeline options")
    flags: list[str] = []
    for key, value in (data.get("options") or {}).items():
        if isinstance(value, bool):
            if value:
                flags.append(f"--{key}")
            continue
        for v in value if isinstance(value, list) else [value]:
            text = os.path.expandvars(str(v))
            if "${" in text:  # an environment variable the user did not set: leave the option out
                continue
            flags.append(f"--{key}={text}")
    return flags


def split_runner_config(argv: list[str]) -> list[str]:
    out, i = [], 0
    config_flags: list[str] = []
    while i < len(argv):
        arg = argv[i]
        if arg == "--runner_config":
            if i + 1 >= len(argv):
                raise UsageError("--runner_config: expected a file")
            config_flags = load_runner_config(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--runner_config="):
            config_flags = load_runner_config(arg.split("=", 1)[1])
            i += 1
            continue
        out.append(arg)
        i += 1
    return config_flags + out  # explicit flags win over the config's


def _beam_parser() -> argparse.ArgumentParser:
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes: dict[str, Any] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def check_unknown(rest: list[str], ours: argparse.ArgumentParser, runner: str) -> None:
    """What our parser did not take must be a Beam pipeline option. A flag close to one of ours is a typo
    (one line with the suggestion); on the DirectRunner any other unknown flag is too. Other runners take
    options of their own that only they know (the Flink job server's ``--checkpointing_interval``, say),
    so there the rest passes through to the runner, which checks it."""
    if not rest:
        return
    beam_parser = _beam_parser()
    _, unknown = beam_parser.parse_known_args(rest)
    mine = [o for a in ours._actions for o in a.option_strings if o.startswith("--")]
    direct = runner.split(".")[-1] in ("DirectRunner", "")
    for arg in unknown:
        if not arg.startswith("--"):
            if direct:
                raise UsageError(f"unexpected argument {arg!r} (flags start with --; see --help)")
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, mine, n=1, cutoff=0.85)
        if close:
            raise UsageError(f"unknown flag {name} (did you mean {close[0]}?)")
        if direct:
            known = mine + [o for a in beam_parser._actions for o in a.option_strings if o.startswith("--")]
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            raise UsageError(f"unknown flag {name}" + (f" (did you mean {near[0]}?)" if near else "; see --help"))


def _check_writable(flag: str, path: str | None) -> None:
    if not path:
        return
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"--{flag} {path}: exists and is not a folder")
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"--{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag} {path}: {probe} is not writable")


def check_sync_medium(ns: argparse.Namespace) -> None:
    """The shards' sync medium must take a file and give it back, before any work."""
    location = sync_location(ns)
    if location is None:
        return
    if "://" not in location:
        _check_writable("sync_dir" if ns.sync_dir else "output_dir", ns.sync_dir or ns.output_dir)
    from core.medium import MediumError, check_medium
    from transforms.medium import FileSystemsMedium

    medium = FileSystemsMedium(location)
    try:
        check_medium(medium)
    except MediumError as exc:
        raise UsageError(f"--sync_dir: {exc}") from exc
    if medium.names():  # another run's publications would be merged into this one
        raise UsageError(f"--sync_dir: {location} already holds publications of a run with --run_id {ns.run_id}; "
                         "give this run another --run_id (or leave it out)")


def input_events(ns: argparse.Namespace, layout: Any) -> int:
    """About how many events the run reads: the synthetic stream's, or the records of --data (up to --limit)."""
    if layout is None:
        return int(ns.synthetic_events)
    from core.readers import count_records

    n = count_records(ns.data, layout.mapping)
    return min(n, ns.limit) if ns.limit else n


def resolve_resume(ns: argparse.Namespace) -> str:
    """The run id ``--resume_from`` names ('latest': the newest run in --checkpoint_dir but this one), checked:
    it left checkpoints there, for as many shards as this run has, that load into this run's model."""
    from model.checkpoint import checkpoint_index, checkpoints, resume_state

    index = checkpoint_index(ns.checkpoint_dir)
    runs = sorted((r for r in index if r and r != ns.run_id), reverse=True)
    run = ns.resume_from
    if run == "latest":
        if not runs:
            raise UsageError(f"--resume_from latest: {ns.checkpoint_dir} holds no other run's checkpoints")
        run = runs[0]
    if run not in runs:
        raise UsageError(f"--resume_from {run}: no checkpoints of that run in {ns.checkpoint_dir} "
                         f"(runs there: {', '.join(runs[:5]) or 'none'})")
    cfg = pipeline_config(ns).learner
    for shard in sorted(s for s in index[run] if s < ns.shards):
        found = resume_state(ns.checkpoint_dir, shard, run, cfg)
        if found is None:
            raise UsageError(f"--resume_from {run}: no checkpoint of shard {shard} reads back into this model "
                             f"(newest: {checkpoints(ns.checkpoint_dir, shard, run)[0].name}; check --dim and the "
                             "other model flags)")
        shards = found[1].get("shards")
        if shards is not None and int(shards) != ns.shards:
            raise UsageError(f"--resume_from {run}: that run had --shards {shards}, this one {ns.shards} "
                             "(users would land on other shards' models)")
    if max(index[run]) >= ns.shards:
        raise UsageError(f"--resume_from {run}: that run has checkpoints of shards beyond --shards {ns.shards}")
    return run


def flink_job_server_jar_url(flink_version: str) -> str:
    name = f"beam-runners-flink-{flink_version}-job-server"
    return f"https://repo.maven.apache.org/maven2/org/apache/beam/{name}/{BEAM_VERSION}/{name}-{BEAM_VERSION}.jar"


def check_runner(opts: Any) -> None:
    """Fail early, and clearly, where a runner cannot start: Beam's FlinkRunner needs its job-server jar."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, StandardOptions

    runner = str(opts.view_as(StandardOptions).runner or "")
    if runner.split(".")[-1] not in ("FlinkRunner",):
        return
    flink = opts.view_as(FlinkRunnerOptions)
    url = flink_job_server_jar_url(flink.flink_version)
    jar = flink.flink_job_server_jar
    if jar and "://" not in jar and not os.path.exists(jar):
        raise UsageError(
            f"FlinkRunner: job-server jar {jar!r} does not exist. Beam {BEAM_VERSION} with Flink {flink.flink_version} "
            f"needs {url.rsplit('/', 1)[1]}: download it from {url} and pass --flink_job_server_jar=PATH "
            f"(or set FRESHREC_FLINK_JOB_SERVER_JAR for runner_configs/flink.yaml).")


def prepare(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """Parse and check everything a run needs, before any work; UsageError on the first mistake."""
    argv = split_runner_config(argv)
    parser = make_parser()
    ns, rest = parser.parse_known_args(argv)
    check_unknown(rest, parser, ns.runner or "")
    try:
        check_flags(ns)
        layout = pipeline_config(ns).layout
    except LayoutError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc
    bounded_direct = not (ns.streaming or ns.events_subscription) and str(ns.runner or "DirectRunner").endswith("DirectRunner")
    streamed = bounded_direct and input_events(ns, layout) > ns.batch_max_events
    if streamed:  # the batch engine would hold every step's whole output in memory
        ns.streaming, bounded_direct = True, False
        argv = [*argv, "--streaming"]
    syncing = ns.shards > 1 and not ns.no_sync
    alone = syncing and bounded_direct  # the batch engine runs one shard's whole input before the next one's
    if alone:
        ns.no_sync, syncing = True, False
        argv = [*argv, "--no_sync"]
    if (ns.checkpoint_dir or syncing) and not ns.run_id:  # one id for this run's checkpoints and sync, in every worker
        from model.checkpoint import new_run_id

        ns.run_id = new_run_id()
        argv = [*argv, f"--run_id={ns.run_id}"]
    _check_writable("output_dir", ns.output_dir)
    _check_writable("checkpoint_dir", ns.checkpoint_dir)
    check_sync_medium(ns)
    if ns.resume_from:
        ns.resume_from = resolve_resume(ns)
        argv = [*argv, f"--resume_from={ns.resume_from}"]
    from pipelines.freshrec_pipeline import make_options

    opts = make_options(argv)
    check_runner(opts)
    if layout is not None:
        print(f"freshrec: reading {ns.data} as {layout.described}")
    if streamed:
        print(f"freshrec: over --batch_max_events {ns.batch_max_events:,} events: running as a flow-controlled stream, "
              "in bounded memory", file=sys.stderr)
    if alone and any(a == "--shards" or a.startswith("--shards=") for a in argv):
        print("freshrec: note: a bounded DirectRunner run feeds its shards one after another, so they cannot share "
              "parameters in event time and learn alone; for a multi-shard run use --streaming (see README)", file=sys.stderr)
    return ns, opts


def run(ns: argparse.Namespace, opts: Any, probe: Any = None) -> int:
    import apache_beam as beam

    from core.run_summary import write_summary
    from pipelines.freshrec_pipeline import build_pipeline
    from pipelines.pubsub_read import drain_on_signals
    from pipelines.runner_metrics import counter_accounting, distributions_and_gauges, metric_counters

    paths = output_paths(ns.output_dir)
    clear_outputs(paths)
    started = time.time()
    printer = ProgressPrinter(0 if ns.quiet else ns.progress_s).start()
    restore = drain_on_signals() if ns.events_subscription else None  # SIGTERM/SIGINT drain a Pub/Sub run
    try:
        with beam.Pipeline(options=opts) as p:
            build_pipeline(p, opts, probe=probe)
    except BaseException:  # a failed run (a full disk, say) leaves no partial outputs behind
        clear_outputs(paths)
        raise
    finally:
        printer.stop()
        remove_temp_dirs(paths)
        if restore is not None:
            restore()
    result = p.result if hasattr(p, "result") else None
    print(f"freshrec: pipeline finished in {time.time() - started:.1f}s")
    for name, path in paths.items():
        if os.path.isdir(path):
            n = len([f for f in os.listdir(path) if not f.startswith(".")])
            print(f"  {name:12s} {path}  ({n} file{'s' if n != 1 else ''})")
        elif os.path.isfile(path):
            print(f"  {name:12s} {path}")
    counters = metric_counters(result) if result is not None else {}
    if os.path.exists(paths["summary"]):
        with open(paths["summary"]) as fh:
            summary = json.load(fh)
        received = counter_accounting(counters)
        if counters:
            summary["counters"] = counters
            summary["runner_metrics"] = distributions_and_gauges(result)
            summary["events_in"] = None if received is None else received[0]
        if os.path.isdir(paths["summaries"]):  # a windowed run: the windows' own summaries count what was on time
            summary["windows"] = window_totals(paths["summaries"])
        write_summary(summary, paths["summary"])
        print(json.dumps(summary, indent=2, sort_keys=True))
        if received is not None and received[0] != summary["events_accounted"]:
            print(f"freshrec: ACCOUNTING MISMATCH: {received[0]} in, {summary['events_accounted']} accounted", file=sys.stderr)
            return 1
    else:  # windowed outputs: a summary per window; totals from those, checked against the counters
        summary = window_totals(paths["summaries"])
        print(json.dumps({"counters": counters, "windows": summary}, indent=2, sort_keys=True))
        received = counter_accounting(counters)
        if received is not None and summary["windows"] and received[0] != summary["events_accounted"]:
            print(f"freshrec: ACCOUNTING MISMATCH: {received[0]} in, {summary['events_accounted']} accounted "
                  f"(window summaries)", file=sys.stderr)
            return 1
    return check_dead_letter_fraction(summary, ns.max_dead_letter_fraction, paths[DEAD_LETTER])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "run"
    if command in ("show", "export", "stack", "report") or (argv and argv[0] == "run"):
        argv = argv[1:]
    if command == "stack":
        from pipelines.stack import stack_main

        return stack_main(argv)
    if command == "show":
        from pipelines.results import show_main

        return show_main(argv)
    if command == "report":
        from pipelines.report import main as report_main

        return report_main(argv)
    if command == "export":
        from pipelines.export import export_main

        return export_main(argv)
    if command != "run":
        print(f"freshrec: error: unknown command {command!r} (run, show, report, export, stack; see --help)", file=sys.stderr)
        return 2
    debug = "--debug" in argv
    try:
        ns, opts = prepare(argv)
        return run(ns, opts)
    except UsageError as exc:
        if debug:
            raise
        print(f"freshrec: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the run itself failed: one line, the traceback with --debug
        if debug:
            raise
        print(f"freshrec: error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
              " (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
