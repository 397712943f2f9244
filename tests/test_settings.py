"""One configuration for every entry point, and the layout that keeps the core free of any runner.

Every entry point takes its model and pipeline flags from ``core.settings``; a flag of the same name
declared by hand with another default fails here. The runner-free packages import neither Beam nor
PyFlink, and the consumer and publisher load without Beam.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest

from core.settings import DEFAULTS, FLAGS, GROUPS, add_flags, pipeline_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER_FREE = ("core", "model", "monitoring", "schemas")
FLINK_PY = os.path.join(ROOT, ".venv-flink", "bin", "python")


def cli_parser() -> argparse.ArgumentParser:
    from pipelines.freshrec_pipeline import FreshrecOptions

    parser = argparse.ArgumentParser()
    FreshrecOptions._add_argparse_args(parser)
    return parser


def entry_point_parsers() -> dict[str, argparse.ArgumentParser]:
    from bench import freshness, keyed_steps, prequential, scale, throughput
    from pipelines import consumer, publisher

    modules = {"consumer": consumer, "publisher": publisher, "bench.prequential": prequential,
               "bench.throughput": throughput, "bench.scale": scale, "bench.freshness": freshness,
               "bench.keyed_steps": keyed_steps}
    return {"cli": cli_parser(), **{name: m.make_parser() for name, m in modules.items()}}


# The model and pipeline flags: identical everywhere. (Input and output flags may differ in a benchmark:
# bench.scale's --data defaults to the Globo folder it is about.)
SHARED = {f.name for f in FLAGS if f.group in ("model", "stability", "state", "sharding")}


def defaults_of(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in parser._actions if a.dest in SHARED}


def test_every_entry_point_takes_the_shared_flags_with_the_shared_defaults():
    parsers = entry_point_parsers()
    for name, parser in parsers.items():
        assert defaults_of(parser) == {k: DEFAULTS[k] for k in defaults_of(parser)}, name
    # the CLI takes every flag; the entry points that build learners take the model flags
    assert {a.dest for a in parsers["cli"]._actions} >= set(DEFAULTS)
    model = {f.name for f in FLAGS if f.group == "model"}
    for name in ("consumer", "bench.prequential", "bench.throughput", "bench.scale"):
        assert {"dim", "lr", "negatives", "optimizer", "capacity"} <= set(defaults_of(parsers[name])), name
    assert {"dim", "batch_size", "top_k"} <= model


@pytest.mark.flink
def test_the_pyflink_job_takes_the_shared_flags_with_the_shared_defaults():
    if not os.path.exists(FLINK_PY):
        pytest.skip("PyFlink environment absent: run scripts/setup_flink.sh")
    code = ("import json; from pipelines.flink_job import make_parser; "
            "print(json.dumps({a.dest: a.default for a in make_parser()._actions}))")
    out = subprocess.run([FLINK_PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    flink = {k: v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items() if k in SHARED}
    assert {"shards", "batch_size", "top_k", "dim", "negatives", "key_groups", "dedupe_ttl_s"} <= set(flink)
    assert flink == {k: DEFAULTS[k] for k in flink}


def test_a_flag_group_builds_the_configs_and_unknown_names_are_refused():
    parser = argparse.ArgumentParser()
    add_flags(parser, ("model", "sharding"))
    cfg = pipeline_config(parser.parse_args(["--shards", "3", "--mode", "online", "--embedding_ttl_days", "1"]))
    assert cfg.sharding.shards == 3 and cfg.update.batch_size == 1 and cfg.learner.mode == "online"
    assert cfg.learner.user_table.ttl_ms == 86_400_000 and cfg.learner.dim == DEFAULTS["dim"]
    assert cfg.dedupe_ttl_ms == int(DEFAULTS["dedupe_ttl_s"] * 1000)  # a group not taken keeps its defaults
    assert cfg.sharding.sync is not None and cfg.sharding.sync.keep_ms == int(DEFAULTS["sync_keep_s"] * 1000)
    kept = pipeline_config(parser.parse_args(["--shards", "3", "--sync_keep_s", "0", "--sync_interval_s", "7"])).sharding.sync
    assert kept is not None and (kept.keep_ms, kept.keep_epochs, kept.interval_ms) == (0, 0, 7_000)
    with pytest.raises(ValueError, match="no such flags"):
        add_flags(argparse.ArgumentParser(), ("model",), only=("dimension",))
    with pytest.raises(ValueError, match="shards must be >= 1"):
        pipeline_config(argparse.Namespace(shards=0))
    help_text = cli_parser().format_help()
    for flag in FLAGS:
        assert f"--{flag.name}" in help_text
    assert all(title in help_text for title in GROUPS.values())


def test_runner_free_packages_import_neither_beam_nor_pyflink():
    offenders = []
    for package in RUNNER_FREE:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                path = os.path.join(dirpath, f)
                if f.endswith(".py"):
                    with open(path, encoding="utf-8") as fh:
                        text = fh.read()
                    if "apache_beam" in text or "pyflink" in text:
                        offenders.append(path)
    assert offenders == []


def test_consumer_and_publisher_load_without_beam():
    code = ("import sys, pipelines.consumer, pipelines.publisher, core.settings; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'pyflink')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_python_file_is_over_450_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    long = {}
    for path in tracked.stdout.split():
        with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        if n > 450:
            long[path] = n
    assert long == {}


def test_doctests_of_the_runner_free_core_pass():
    examples = {}
    for package in RUNNER_FREE:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            module = importlib.import_module(info.name)
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
            assert result.failed == 0, info.name
            examples[info.name] = result.attempted
    # the featurizers, the keyed state, the configuration and the learner carry runnable examples
    for name in ("core.featurizers", "core.keyed_state", "core.settings", "model.learner", "model.deltas"):
        assert examples[name] > 0, name
