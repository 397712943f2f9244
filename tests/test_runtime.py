"""Worker-side tuning (transforms.runtime): the garbage collector settings, once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import gc, json
before = gc.get_threshold()
from transforms.runtime import tune_worker
tune_worker()
tune_worker()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def probe(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_tuning_raises_the_young_threshold_and_freezes_the_startup_heap():
    got = probe({"FRESHREC_GC_TUNING": "1"})
    assert got["after"][0] == 10_000 > got["before"][0]
    assert got["after"][1:] == got["before"][1:]
    assert got["frozen"] > 0


def test_worker_tuning_can_be_switched_off():
    got = probe({"FRESHREC_GC_TUNING": "0"})
    assert got["after"] == got["before"] and got["frozen"] == 0
