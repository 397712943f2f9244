"""The runner's own metrics of a run, read back: what Dataflow's and Flink's UIs show under ``freshrec``.

The pipeline's steps report through Beam's ``Metrics``: counters (events in, applied, dead letters by
reason, flushes, rollbacks, alerts, sync epochs), distributions (``freshness_lag_ms`` and
``prequential_logloss_micro`` per flush, ``flush_events``) and gauges (``model_version``,
``table_rows_item`` and ``table_rows_user``, per shard as ``..._shard_N``). The command line folds them
into the summary (``counters``, ``runner_metrics``) and checks its accounting against the counters.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "freshrec"


def _query(result: Any) -> dict[str, Any] | None:
    try:
        return result.metrics().query()
    except Exception:  # some runners do not report metrics
        return None


def _value(metric: Any) -> Any:
    return metric.committed if metric.committed is not None else metric.attempted


def metric_counters(result: Any) -> dict[str, int]:
    """The ``freshrec`` counters of a finished run, summed over steps."""
    query = _query(result)
    out: dict[str, int] = {}
    for c in (query or {}).get("counters", []):
        if c.key.metric.namespace == NAMESPACE:
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(_value(c) or 0)
    return out


def distributions_and_gauges(result: Any) -> dict[str, Any]:
    """``{"distributions": {name: {count, sum, min, max, mean}}, "gauges": {name: value}}`` of a finished run."""
    query = _query(result) or {}
    dists: dict[str, dict[str, float]] = {}
    for d in query.get("distributions", []):
        v = _value(d)
        if d.key.metric.namespace != NAMESPACE or v is None or not v.count:
            continue
        acc = dists.setdefault(d.key.metric.name, {"count": 0, "sum": 0, "min": v.min, "max": v.max})
        acc["count"] += v.count
        acc["sum"] += v.sum
        acc["min"], acc["max"] = min(acc["min"], v.min), max(acc["max"], v.max)
    for acc in dists.values():
        acc["mean"] = round(acc["sum"] / acc["count"], 3)
    latest: dict[str, Any] = {}  # a gauge reported by several steps or stages: the value set last wins
    for g in query.get("gauges", []):
        v = _value(g)
        name = g.key.metric.name
        if g.key.metric.namespace == NAMESPACE and v is not None and (name not in latest or v.timestamp >= latest[name].timestamp):
            latest[name] = v
    gauges = {name: v.value for name, v in latest.items()}
    return {"distributions": dict(sorted(dists.items())), "gauges": dict(sorted(gauges.items()))}


def counter_accounting(counters: dict[str, int]) -> tuple[int, int] | None:
    """(received, applied + dead-lettered) from the Beam counters alone; None where the runner reported none."""
    if "events_in" not in counters:
        return None
    received = counters.get("messages_in", counters["events_in"])  # Pub/Sub counts messages before decoding
    accounted = counters.get("events_applied", 0) + sum(v for k, v in counters.items() if k.startswith("dead_letter_"))
    return received, accounted
