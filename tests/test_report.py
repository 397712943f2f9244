"""``freshrec report``: the page a run's window statistics make, checked in a real browser (Debian's headless
Chromium, installed by .ci/run): the screenshot is not blank and every chart's title is on the rendered page."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess

import pytest

from pipelines import cli
from pipelines.report import CHARTS
from pipelines.report import main as report_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "out")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["--output_dir", out, "--synthetic_events", "8000", "--stats_window_s", "1800", "--quiet"]) == 0
    return out


def test_a_run_without_window_statistics_is_refused_in_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--stats_window_s" in err


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is absent (Debian package chromium; .ci/run installs it)")
def test_the_report_renders_in_a_browser_with_every_chart(run_dir, tmp_path):
    from matplotlib.image import imread

    page = str(tmp_path / "report.html")
    assert report_main([run_dir, "--html", page]) == 0
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for title in CHARTS:
        assert f"<h2>{title}</h2>" in dom.stdout, title
    assert dom.stdout.count("<img") == len(CHARTS)
    shot = str(tmp_path / "shot.png")
    proc = subprocess.run([*common, "--window-size=1200,3000", f"--screenshot={shot}", f"file://{page}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and os.path.exists(shot), proc.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    not_white = (pixels.min(axis=2) < 0.9).mean()
    assert pixels.std() > 0.05 and not_white > 0.03, (pixels.std(), not_white)
