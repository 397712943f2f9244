"""No input record can end a run: hostile lines become dead letters with a precise reason, and the
count of events in is the file's physical line count."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.cleaning import InvalidEvent, validate_event
from core.readers import PRESETS, ColumnMapping, map_row, read_replay
from core.records import csv_records, jsonl_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_700_000_000_000


def good(n: int) -> str:
    return json.dumps({"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "event_type": "click",
                       "event_time_ms": T0 + 1000 * n})


def event_line(**over) -> str:
    base = {"event_id": "h", "user_id": "u1", "item_id": "i1", "event_type": "click", "event_time_ms": T0}
    return json.dumps({**base, **over})


HOSTILE = {  # line -> the reason it must be dead-lettered with
    "[" * 100_000: "too_large",
    "[" * 10_000: "too_deep",
    event_line().replace('"u1"', "9" * 5000): "number_out_of_range",
    event_line().replace(str(T0), "9" * 5000): "number_out_of_range",
    event_line(user_id="\ud800"): "invalid_utf8",
    event_line(user_id="u\u202e1"): "id_invalid",
    event_line(user_id="u\u00001"): "id_invalid",
    event_line(user_id=" u1"): "id_invalid",
    "": "blank",
    "not json at all": "not_json",
    "[1, 2, 3]": "not_an_object",
    '"a string"': "not_an_object",
    event_line(user_id="x" * 200_000): "too_large",
    event_line(value=1e300): "value_out_of_range",
}


def write_mixed(path) -> int:
    lines = []
    for n, line in enumerate(HOSTILE):
        lines += [good(n), line]
    lines += [good(n) for n in range(len(HOSTILE), 40)]
    with open(path, "wb") as fh:
        fh.write(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
        fh.write(event_line(event_id="bytes").encode().replace(b'"u1"', b'"u\xff\xfe1"') + b"\n")
    return len(lines) + 1


def reasons_of(records) -> list[str]:
    out = []
    for n, rec in enumerate(records):
        _, event = map_row(rec, ColumnMapping(format="jsonl", event_id="col:event_id", value="col:value"), n)
        try:
            validate_event(event)
            out.append("ok")
        except InvalidEvent as exc:
            out.append(exc.reason.split(":")[0])
    return out


def test_each_hostile_line_is_a_dead_letter_with_its_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = write_mixed(path)
    reasons = reasons_of(jsonl_records(str(path)))
    assert len(reasons) == lines
    hostile = [r for r in reasons if r != "ok"]
    assert sorted(hostile) == sorted([*HOSTILE.values(), "invalid_utf8"])


def test_the_cli_runs_a_hostile_file_to_completion_and_counts_every_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = write_mixed(path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "--data", str(path), "--output_dir", str(out),
                           "--shards", "1", "--batch_size", "16", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_in"] == lines
    assert summary["events_dead_lettered"] == len(HOSTILE) + 1
    assert summary["events_applied"] + summary["events_dead_lettered"] == lines


def test_quoting_never_swallows_lines(tmp_path):
    path = tmp_path / "u.data"
    rows = [f"{u}\t{i}\t3\t{881250949 + n}" for n, (u, i) in enumerate((n % 9, n % 13) for n in range(200))]
    rows[50] = '7\t"12\t3\t881251000'  # an unterminated quote
    path.write_text("\n".join(rows) + "\n")
    records = list(csv_records(str(path), "\t", ("user", "item", "rating", "ts")))
    assert len(records) == 200
    assert records[50]["__reason__"] == "bad_quoting" and records[51]["user"] == rows[51].split("\t")[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=20))
def test_arbitrary_bytes_never_crash_the_reader_and_every_line_is_counted(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert len(reasons_of(jsonl_records(str(path)))) == len(lines)
    csv_path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    csv_path.write_bytes(b"\n".join(lines) + b"\n")
    mapping = ColumnMapping(format="csv", columns=("user_id", "item_id", "event_time_ms"), event_id="{__line__}",
                            event_type="click")
    rows = list(csv_records(str(csv_path), ",", mapping.columns))
    assert len(rows) == len(lines)
    for n, row in enumerate(rows):
        _, event = map_row(row, mapping, n)
        with contextlib.suppress(InvalidEvent):
            validate_event(event)


def test_values_are_checked_against_the_declared_domain(tmp_path):
    from core.settings import pipeline_config
    from pipelines.cli import make_parser

    path = tmp_path / "u.data"
    path.write_text("1\t10\t4\t881250949\n1\t11\t7\t881250950\n2\t12\t-1\t881250951\n")
    folder_args = make_parser().parse_args(["--data", str(tmp_path)])
    events = {e["item_id"]: e for e in read_replay(str(tmp_path), PRESETS["movielens"])}
    cfg = pipeline_config(folder_args).clean
    assert cfg.value_range == (1.0, 5.0)  # MovieLens's rating scale, from its preset
    assert validate_event(events["10"], cfg)["value"] == 4.0
    for item in ("11", "12"):
        with pytest.raises(InvalidEvent, match="value_out_of_range"):
            validate_event(events[item], cfg)
    wide = pipeline_config(make_parser().parse_args(["--data", str(tmp_path), "--value_range=-5,10"])).clean
    assert validate_event(events["11"], wide)["value"] == 7.0
    with pytest.raises(ValueError, match="--value_range"):
        pipeline_config(make_parser().parse_args(["--value_range", "5"]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=12),
       n_good=st.integers(0, 30), preset=st.sampled_from(["jsonl", "movielens"]), seed=st.integers(0, 2**16))
def test_arbitrary_bytes_through_the_whole_cli_path_are_all_accounted_for(tmp_path_factory, junk, n_good, preset, seed):
    """The command line, reader to summary, on a file of valid lines and arbitrary byte lines: it runs to
    the end, and the file's physical lines are exactly the events applied plus those dead-lettered."""
    import random

    from pipelines import cli

    folder = tmp_path_factory.mktemp("cli-fuzz")
    if preset == "jsonl":
        valid = [good(n).encode() for n in range(n_good)]
        path = folder / "events.jsonl"
    else:
        valid = [f"{n % 7 + 1}\t{n % 11 + 1}\t{n % 5 + 1}\t{881250949 + n}".encode() for n in range(n_good)]
        path = folder / "u.data"
    lines = valid + junk
    random.Random(seed).shuffle(lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = folder / "out"
    code = cli.main(["--data", str(path if preset == "jsonl" else folder), "--data_format", preset, "--output_dir",
                     str(out), "--shards", "1", "--batch_size", "8", "--max_dead_letter_fraction", "1", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events_in"] == len(lines) == summary["events_applied"] + summary["events_dead_lettered"]
