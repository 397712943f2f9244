"""``freshrec report OUT``: one self-contained HTML page of what a run did, over event time.

It reads what the run wrote under OUT (``stats/``: one ``window_stats`` record per ``--stats_window_s``;
``alerts/``, ``summary.json``; Avro files of the Beam pipeline or JSON lines of the PyFlink job) and draws, with matplotlib, the charts
a person watching a self-updating model needs: prequential AUC and logloss (overall and per shard), traffic
and distinct users, processing rate and freshness lag, dead letters and late events by reason, embedding
table sizes and evictions per shard, rollbacks and alerts on the time axis, and the top items over time.
The charts are embedded as PNG: the page needs no network and no server.

    freshrec report out                    # writes out/report.html
    freshrec report out --html /tmp/r.html

Beam-free: it reads Avro with fastavro (``pipelines.results``). ``bench/prequential.py`` draws its model
comparison with ``model_lines`` and ``page``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.settings import HelpFormatter  # noqa: E402
from pipelines.results import ALERTS, STATS, load_summary, output_paths, records  # noqa: E402

CHARTS = ("Prequential AUC", "Prequential logloss", "Traffic", "Processing rate and freshness lag",
          "Dead letters and late events", "Embedding tables", "Rollbacks and alerts", "Top items over time")
TOP_ITEMS_SHOWN = 40


def _time(ms: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _figure(height: float = 3.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(11, height), dpi=90, layout="constrained")
    return fig, fig.add_subplot()


def _time_axis(ax: Any) -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.grid(alpha=0.3)
    ax.set_xlabel("event time (UTC)")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _rollback_windows(stats: list[dict[str, Any]]) -> list[tuple[dt.datetime, int]]:
    """(window middle, rollbacks) of the windows whose flushes rolled back."""
    return [(_mid(r), r["rollbacks"]) for r in stats if r["rollbacks"]]


def _marks(ax: Any, stats: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> None:
    """Windows with rollbacks (red) and alerts (orange) as vertical lines on a time chart."""
    for t, _n in _rollback_windows(stats):
        ax.axvline(t, color="tab:red", alpha=0.35, lw=0.8)
    for a in alerts:
        ax.axvline(_time(a["window_start_ms"]), color="tab:orange", alpha=0.5, lw=0.8, ls="--")


def _mid(r: dict[str, Any]) -> dt.datetime:
    return _time((r["window_start_ms"] + r["window_end_ms"]) / 2)


def quality_chart(stats: list[dict[str, Any]], key: str, alerts: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure()
    shards = sorted({s["shard"] for r in stats for s in r["shards"]})
    for shard in shards:
        pts = [(_mid(r), s[key]) for r in stats for s in r["shards"] if s["shard"] == shard and s[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=0.7, alpha=0.5, label=f"shard {shard}")
    pts = [(_mid(r), r[key]) for r in stats if r[key] is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), color="black", lw=1.8, label="all shards")
    _marks(ax, stats, [a for a in alerts if a["signal"].startswith("prequential")])
    ax.set_ylabel(key)
    ax.legend(loc="best", fontsize=7, ncol=min(6, len(shards) + 1))
    _time_axis(ax)
    return fig


def traffic_chart(stats: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure()
    t = [_mid(r) for r in stats]
    ax.plot(t, [r["events"] for r in stats], color="tab:blue", label="events per window")
    ax.set_ylabel("events per window", color="tab:blue")
    twin = ax.twinx()
    twin.plot(t, [r["distinct_users"] for r in stats], color="tab:green", lw=0.9, label="distinct users")
    twin.set_ylabel("distinct users (KMV)", color="tab:green")
    _time_axis(ax)
    return fig


def rate_chart(stats: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure()
    pts = [(_mid(r), r["applied"] / max(0.001, (r["last_emit_ms"] - r["first_emit_ms"]) / 1000))
           for r in stats if r["applied"] and r["first_emit_ms"] is not None and r["last_emit_ms"] > r["first_emit_ms"]]
    if pts:
        ax.plot(*zip(*pts, strict=True), color="tab:purple", marker=".", lw=0.8)
    ax.set_ylabel("events/s while processed", color="tab:purple")
    twin = ax.twinx()
    for q, style in (("p50", "-"), ("p99", ":")):
        lag = [(_mid(r), r["freshness_lag_ms"][q] / 1000) for r in stats if r["freshness_lag_ms"]]
        if lag:
            twin.plot(*zip(*lag, strict=True), color="tab:brown", ls=style, lw=0.9, label=f"lag {q}")
    twin.set_ylabel("freshness lag, s (emit - event time)", color="tab:brown")
    twin.set_yscale("symlog")
    twin.legend(loc="upper right", fontsize=7)
    _time_axis(ax)
    return fig


def dead_letter_chart(stats: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure()
    reasons = sorted({k for r in stats for k in r["dead_letters"]})
    t = mdates.date2num([_mid(r) for r in stats])
    width = (min((b - a for a, b in zip(t, t[1:], strict=False)), default=1 / 24)) * 0.9
    bottom = [0.0] * len(stats)
    for reason in reasons:
        h = [r["dead_letters"].get(reason, 0) for r in stats]
        ax.bar(t, h, width, bottom=bottom, label=reason)
        bottom = [b + x for b, x in zip(bottom, h, strict=True)]
    ax.xaxis_date()
    ax.set_ylabel("dead letters per window")
    if reasons:
        ax.legend(loc="upper right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no dead letters", transform=ax.transAxes, ha="center", va="center", color="#555")
    ax.set_xlim(_time(stats[0]["window_start_ms"]), _time(stats[-1]["window_end_ms"]))
    _time_axis(ax)
    return fig


def tables_chart(stats: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure()
    series: dict[tuple[int, str], list[tuple[dt.datetime, int, int]]] = {}
    for r in stats:
        for s in r["shards"]:
            for table, rows in s["table_rows"].items():
                series.setdefault((s["shard"], table), []).append((_mid(r), rows, s["evictions"].get(table, 0)))
    for (shard, table), pts in sorted(series.items()):
        t, rows, ev = zip(*pts, strict=True)
        line, = ax.plot(t, rows, lw=1, label=f"shard {shard} {table}")
        if any(ev):
            ax.plot(t, ev, lw=0.8, ls=":", color=line.get_color(), label=f"shard {shard} {table} evictions")
    ax.set_ylabel("rows (dotted: evictions so far)")
    if series:
        ax.legend(loc="upper left", fontsize=6, ncol=4)
    _time_axis(ax)
    return fig


def events_chart(alerts: list[dict[str, Any]], stats: list[dict[str, Any]]) -> Figure:
    fig, ax = _figure(2.8)
    names = sorted({a["signal"] for a in alerts})
    rows = {name: i + 1 for i, name in enumerate(names)}
    for a in alerts:
        ax.plot(_time(a["window_start_ms"]), rows[a["signal"]], "v",
                color="tab:red" if a["severity"] == "critical" else "tab:orange")
    for t, n in _rollback_windows(stats):
        ax.plot(t, 0, "x", color="tab:red", markersize=4 + min(n, 8))
    ax.set_yticks(range(len(names) + 1), ["rollback"] + names)
    if stats:
        ax.set_xlim(_time(stats[0]["window_start_ms"]), _time(stats[-1]["window_end_ms"]))
    _time_axis(ax)
    return fig


def top_items_chart(stats: list[dict[str, Any]]) -> Figure:
    """A heat map: the items that were ever among a window's top five (the ones with the highest peak share
    first kept), in order of first appearance, by their share of each window's events."""
    shares: dict[str, list[float]] = {}
    for i, r in enumerate(stats):
        for c in r["top_items"][:5]:
            shares.setdefault(c["id"], [0.0] * len(stats))
        for c in r["top_items"]:
            if c["id"] in shares:
                shares[c["id"]][i] = c["count"] / max(1, r["events"])
    keep = sorted(shares, key=lambda k: -max(shares[k]))[:TOP_ITEMS_SHOWN]
    keep.sort(key=lambda k: next(i for i, v in enumerate(shares[k]) if v > 0))
    fig, ax = _figure(max(3.0, 0.16 * len(keep) + 1.2))
    if keep and len(stats) > 1:
        t = mdates.date2num([_time(r["window_start_ms"]) for r in stats] + [_time(stats[-1]["window_end_ms"])])
        image = ax.pcolormesh(t, range(len(keep) + 1), [shares[k] for k in keep], cmap="viridis", shading="flat")
        fig.colorbar(image, ax=ax, label="share of the window's events")
        ax.set_yticks([i + 0.5 for i in range(len(keep))], keep, fontsize=6)
        ax.xaxis_date()
        ax.invert_yaxis()
    _time_axis(ax)
    return fig


def page(title: str, sections: Iterable[tuple[str, str, Figure]], facts: dict[str, Any], notes: str = "") -> str:
    """A self-contained HTML page: a table of ``facts``, then each (title, caption, figure) as a PNG."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}th{text-align:left;padding-right:1em}"
             "figure{margin:0 0 2em 0}figcaption{color:#555;font-size:90%}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><table>{rows}</table>{notes}"]
    for name, caption, fig in sections:
        parts.append(f"<section><h2>{html.escape(name)}</h2><figure><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{_png(fig)}'><figcaption>{html.escape(caption)}</figcaption>"
                     "</figure></section>")
    parts.append("</body></html>")
    return "".join(parts)


def model_lines(title: str, ylabel: str, lines: dict[str, list[tuple[float, float]]]) -> Figure:
    """One line per model over event time: ``lines`` maps a name to (event time ms, value) points."""
    fig, ax = _figure()
    for name, pts in lines.items():
        if pts:
            ax.plot([_time(t) for t, _ in pts], [v for _, v in pts], lw=1.2, label=name)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    _time_axis(ax)
    return fig


def run_report(out_dir: str) -> str:
    """The HTML of the run under ``out_dir`` (the Beam pipeline's --output_dir or the PyFlink job's --output);
    ValueError when it wrote no window statistics."""
    paths = output_paths(out_dir)
    found = list(records(paths[STATS])) if os.path.isdir(paths[STATS]) else []
    stats = sorted((r for r in found if r["events"] or r["applied"]), key=lambda r: r["window_start_ms"])
    if not stats:
        raise ValueError(f"{paths[STATS]} holds no window statistics: run the pipeline with --stats_window_s > 0 "
                         f"and --output_dir {out_dir}")
    alerts = sorted(records(paths[ALERTS]) if os.path.isdir(paths[ALERTS]) else [],
                    key=lambda a: a["window_start_ms"])
    summary = load_summary(out_dir) or {}
    pre = summary.get("prequential") or {}
    window_s = (stats[0]["window_end_ms"] - stats[0]["window_start_ms"]) // 1000
    facts = {"output": os.path.abspath(out_dir), "event time": f"{_time(stats[0]['window_start_ms']):%Y-%m-%d %H:%M} to "
             f"{_time(stats[-1]['window_end_ms']):%Y-%m-%d %H:%M} UTC, {len(stats)} windows of {window_s} s",
             "events applied": summary.get("events_applied"), "dead-lettered": summary.get("events_dead_lettered"),
             "prequential AUC / logloss": f"{pre.get('auc')} / {pre.get('logloss')}",
             "rollbacks": sum(r["rollbacks"] for r in stats), "alerts": f"{len(alerts)} {json.dumps(summary.get('alerts_by_signal', {}))}"}
    sections = [
        (CHARTS[0], "Scored before learned, per window; black: all shards; red lines: windows with rollbacks, dashed: "
         "quality alerts.",
         quality_chart(stats, "auc", alerts)),
        (CHARTS[1], "Lower is better.", quality_chart(stats, "logloss", alerts)),
        (CHARTS[2], "Valid events per window and distinct users (tfx-bsl KMV estimate).", traffic_chart(stats)),
        (CHARTS[3], "Events applied per second of processing time while the window's flushes ran; freshness lag: "
         "when a flush's outputs were emitted minus its newest event time (a replay of old data lags by its age).",
         rate_chart(stats)),
        (CHARTS[4], "Dead letters stamped in each window, by reason (late ones are the 'late' reason).",
         dead_letter_chart(stats)),
        (CHARTS[5], "Rows per embedding table and shard at each window's newest flush.", tables_chart(stats)),
        (CHARTS[6], "Each alert by signal (red: critical); windows with rollbacks at the bottom (bigger: more).", events_chart(alerts, stats)),
        (CHARTS[7], f"Items that were ever among a window's top five (at most {TOP_ITEMS_SHOWN}), in order of first "
         "appearance, by share of the window's events (tfx-bsl Misra-Gries).", top_items_chart(stats)),
    ]
    listed = "".join(f"<li>{html.escape(_time(a['window_start_ms']).strftime('%Y-%m-%d %H:%M'))}: {html.escape(a['message'])}"
                     "</li>" for a in alerts[:50])
    notes = f"<h2>Alerts</h2><ul>{listed or '<li>none</li>'}</ul>"
    return page(f"freshrec run: {os.path.basename(os.path.abspath(out_dir))}", sections, facts, notes)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="freshrec report", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("output_dir", help="a run's --output_dir")
    ap.add_argument("--html", default=None, help="where to write the page (default: OUTPUT_DIR/report.html)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        text = run_report(args.output_dir)
    except (OSError, ValueError) as exc:
        print(f"freshrec report: {exc}", file=sys.stderr)
        return 2
    path = args.html or os.path.join(args.output_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"freshrec report: wrote {path} ({len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
