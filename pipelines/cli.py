"""freshrec command line: run the pipeline (default: the embedded synthetic stream on the DirectRunner).

    python -m pipelines.cli                                   # synthetic stream, DirectRunner
    python -m pipelines.cli --data ../shared/datasets/movielens-100k --output_dir out/ml
    python -m pipelines.cli --runner_config runner_configs/flink.yaml ...
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import apache_beam as beam
import yaml
from apache_beam.options.pipeline_options import StandardOptions

from pipelines.freshrec_pipeline import build_pipeline, make_options, output_paths
from transforms.sinks import write_summary


def load_runner_config(path: str) -> list[str]:
    """A runner config is a YAML mapping of pipeline options; returns them as --flags."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict) or not isinstance(data.get("options", {}), dict):
        raise ValueError(f"{path}: expected a mapping with an 'options' mapping of pipeline options")
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


BEAM_VERSION = "2.77.0"


def flink_job_server_jar_url(flink_version: str) -> str:
    name = f"beam-runners-flink-{flink_version}-job-server"
    return f"https://repo.maven.apache.org/maven2/org/apache/beam/{name}/{BEAM_VERSION}/{name}-{BEAM_VERSION}.jar"


class RunnerSetupError(RuntimeError):
    pass


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
        raise RunnerSetupError(
            f"FlinkRunner: job-server jar {jar!r} does not exist. Beam {BEAM_VERSION} with Flink {flink.flink_version} "
            f"needs {url.rsplit('/', 1)[1]}: download it from {url} and pass --flink_job_server_jar=PATH "
            f"(or set FRESHREC_FLINK_JOB_SERVER_JAR for runner_configs/flink.yaml).")


def split_runner_config(argv: list[str]) -> list[str]:
    out, i = [], 0
    config_flags: list[str] = []
    while i < len(argv):
        arg = argv[i]
        if arg == "--runner_config":
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


def metric_counters(result: Any) -> dict[str, int]:
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not report metrics
        return {}
    out: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace == "freshrec":
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return out


def clear_outputs(paths: dict[str, str]) -> None:
    """Remove what an earlier run left at exactly our output paths (never anything else)."""
    for path in paths.values():
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.WARNING)
    argv = split_runner_config(list(sys.argv[1:] if argv is None else argv))
    opts = make_options(argv)
    try:
        check_runner(opts)
    except RunnerSetupError as exc:
        print(f"freshrec: {exc}", file=sys.stderr)
        return 2
    clear_outputs(output_paths(opts.output_dir))
    started = time.time()
    try:
        with beam.Pipeline(options=opts) as p:
            built = build_pipeline(p, opts)
    except Exception as exc:
        if "flink" in str(opts.view_as(StandardOptions).runner or "").lower() and "jar" in str(exc).lower():
            from apache_beam.options.pipeline_options import FlinkRunnerOptions

            url = flink_job_server_jar_url(opts.view_as(FlinkRunnerOptions).flink_version)
            print(f"freshrec: FlinkRunner could not get its job-server jar ({exc}). Download {url} "
                  f"and pass --flink_job_server_jar=PATH.", file=sys.stderr)
            return 2
        raise
    result = p.result if hasattr(p, "result") else None
    elapsed = time.time() - started
    paths = output_paths(built["config"].output_dir)
    print(f"freshrec: pipeline finished in {elapsed:.1f}s")
    for name, path in paths.items():
        files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else ([path] if os.path.exists(path) else [])
        print(f"  {name:12s} {path}  ({len(files)} file{'s' if len(files) != 1 else ''})")
    if os.path.exists(paths["summary"]):
        with open(paths["summary"]) as fh:
            summary = json.load(fh)
        counters = metric_counters(result) if result is not None else {}
        if counters:
            summary["counters"] = counters
            summary["events_in"] = counters.get("events_in")
            write_summary(summary, paths["summary"])
        print(json.dumps(summary, indent=2, sort_keys=True))
        events_in = counters.get("events_in")
        if events_in is not None and events_in != summary["events_accounted"]:
            print(f"freshrec: ACCOUNTING MISMATCH: {events_in} in, {summary['events_accounted']} accounted", file=sys.stderr)
            return 1
    else:  # windowed outputs: a summary per window; totals from those, checked against the counters
        counters = metric_counters(result) if result is not None else {}
        totals = window_totals(paths["summaries"])
        print(json.dumps({"counters": counters, "windows": totals}, indent=2, sort_keys=True))
        received = counter_accounting(counters)
        if received is not None and totals["windows"] and received[0] != totals["events_accounted"]:
            print(f"freshrec: ACCOUNTING MISMATCH: {received[0]} in, {totals['events_accounted']} accounted "
                  f"(window summaries)", file=sys.stderr)
            return 1
    return 0


def window_totals(directory: str) -> dict[str, Any]:
    """Sums over the per-window summaries of a windowed run."""
    out: dict[str, Any] = {"windows": 0, "events_applied": 0, "events_dead_lettered": 0, "events_accounted": 0,
                           "flushes": 0, "rollbacks": 0, "dead_letter_by_reason": {}}
    for path in sorted(glob.glob(os.path.join(directory, "window-*.json"))):
        with open(path) as fh:
            w = json.load(fh)
        out["windows"] += 1
        for key in ("events_applied", "events_dead_lettered", "events_accounted", "flushes", "rollbacks"):
            out[key] += w[key]
        for reason, n in w["dead_letter_by_reason"].items():
            out["dead_letter_by_reason"][reason] = out["dead_letter_by_reason"].get(reason, 0) + n
    return out


def counter_accounting(counters: dict[str, int]) -> tuple[int, int] | None:
    """(received, applied + dead-lettered) from the Beam counters alone; None where the runner reported none."""
    if "events_in" not in counters:
        return None
    received = counters.get("messages_in", counters["events_in"])  # Pub/Sub counts messages before decoding
    accounted = counters.get("events_applied", 0) + sum(v for k, v in counters.items() if k.startswith("dead_letter_"))
    return received, accounted


if __name__ == "__main__":
    sys.exit(main())
