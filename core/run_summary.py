"""The run summary: flush reports and dead letters merged into the ledger a run ends with (applied +
dead-lettered = accounted), its prequential AUC and logloss, model versions, rollbacks, sync traffic.

Runner-free and mergeable (counts and histograms): the Beam pipeline's ``SummaryFn`` (transforms/sinks.py)
and the PyFlink job's ``SummarizeRun`` (pipelines/flink_job.py) are thin adapters over it.

>>> acc = add(new(), ("dead_letter", {"reason": "malformed: not JSON"}))
>>> extract(merge([acc, new()]))["events_accounted"]
1
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from model.metrics import BinaryStats
from monitoring.alerts import SkippedStepsAlarm

SKIPPED_SIGNAL = SkippedStepsAlarm.SIGNAL


def new() -> dict[str, Any]:
    """An empty accumulator."""
    return {"applied": 0, "dead_letter": {}, "stats": BinaryStats().to_dict(), "versions": {},
            "steps": 0, "skipped_nonfinite": 0, "rollbacks": 0, "flushes": 0, "table_rows": {},
            "scores": 0, "deltas": 0, "alerts": 0, "alerts_by_signal": {}, "not_learned": {},
            "sync": {"merged": 0, "published": 0, "bytes_out": 0, "max_lag_epochs": 0},
            "probe": {"hits": 0.0, "probes": 0}}


def add(acc: dict[str, Any], item: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """One ledger item: ("report", a flush report), ("dead_letter", its record) or ("alert", a drift alert)."""
    kind, rec = item
    if kind == "dead_letter":
        reason = rec["reason"].split(":")[0]
        acc["dead_letter"][reason] = acc["dead_letter"].get(reason, 0) + 1
        return acc
    if kind == "alert":  # a drift alert (transforms.monitor); a shard's own alerts are counted in its reports
        acc["alerts"] += 1
        acc["alerts_by_signal"][rec["signal"]] = acc["alerts_by_signal"].get(rec["signal"], 0) + 1
        return acc
    acc["applied"] += rec["events"]
    acc["steps"] += rec["steps"]
    acc["skipped_nonfinite"] += rec["skipped_nonfinite"]
    acc["rollbacks"] += rec["rollbacks"]
    acc["scores"] += rec.get("scores", 0)
    acc["deltas"] += rec.get("deltas", 0)
    acc["alerts"] += rec.get("alerts", 0)
    if rec.get("alerts"):
        acc["alerts_by_signal"][SKIPPED_SIGNAL] = acc["alerts_by_signal"].get(SKIPPED_SIGNAL, 0) + rec["alerts"]
    if rec.get("not_learned"):
        shard_key = str(rec["shard"])
        acc["not_learned"][shard_key] = acc["not_learned"].get(shard_key, 0) + rec["not_learned"]
    for part in ("sync", "probe"):
        for k, n in (rec.get(part) or {}).items():
            if k == "lag_epochs":  # a level, not a count: the run's worst
                acc[part]["max_lag_epochs"] = max(acc[part]["max_lag_epochs"], n)
            else:
                acc[part][k] += n
    acc["flushes"] += 1
    acc["stats"] = BinaryStats.from_dict(acc["stats"]).merge(BinaryStats.from_dict(rec["stats"])).to_dict()
    shard = str(rec["shard"])
    if rec["version"] >= acc["versions"].get(shard, -1):
        acc["versions"][shard] = rec["version"]
        acc["table_rows"][shard] = rec["table_rows"]
    return acc


def merge(accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    accs = list(accs)
    out = new()
    for a in accs:
        out["applied"] += a["applied"]
        for k in ("steps", "skipped_nonfinite", "rollbacks", "flushes", "scores", "deltas", "alerts"):
            out[k] += a[k]
        for part in ("sync", "probe"):
            for k, n in a[part].items():
                out[part][k] = max(out[part][k], n) if k == "max_lag_epochs" else out[part][k] + n
        for part in ("dead_letter", "alerts_by_signal"):
            for r, n in a[part].items():
                out[part][r] = out[part].get(r, 0) + n
        out["stats"] = BinaryStats.from_dict(out["stats"]).merge(BinaryStats.from_dict(a["stats"])).to_dict()
        for s, n in a["not_learned"].items():
            out["not_learned"][s] = out["not_learned"].get(s, 0) + n
        for s, v in a["versions"].items():
            if v >= out["versions"].get(s, -1):
                out["versions"][s] = v
                out["table_rows"][s] = a["table_rows"][s]
    return out


def extract(acc: dict[str, Any]) -> dict[str, Any]:
    """The run summary (``freshrec show`` prints it)."""
    stats = BinaryStats.from_dict(acc["stats"])
    dead = sum(acc["dead_letter"].values())
    auc, ll = stats.auc(), stats.logloss()
    return {
        "events_applied": acc["applied"],
        "events_dead_lettered": dead,
        "events_accounted": acc["applied"] + dead,
        "dead_letter_by_reason": dict(sorted(acc["dead_letter"].items())),
        "prequential": {"examples": stats.count, "nonfinite_predictions": stats.nonfinite,
                        "auc": None if math.isnan(auc) else round(auc, 5),
                        "logloss": None if math.isnan(ll) else round(ll, 5),
                        **({"recall_probes": acc["probe"]["probes"],
                            "recall": round(acc["probe"]["hits"] / acc["probe"]["probes"], 5)}
                           if acc["probe"]["probes"] else {})},
        "model_versions": dict(sorted(acc["versions"].items(), key=lambda kv: int(kv[0]))),
        "table_rows": acc["table_rows"],
        "flushes": acc["flushes"],
        "optimizer_steps": acc["steps"],
        "steps_skipped_nonfinite": acc["skipped_nonfinite"],
        "rollbacks": acc["rollbacks"],
        "scores_written": acc["scores"],
        "deltas_written": acc["deltas"],
        "alerts": acc["alerts"],
        "alerts_by_signal": dict(sorted(acc["alerts_by_signal"].items())),
        "events_not_learned": sum(acc["not_learned"].values()),
        "events_not_learned_by_shard": dict(sorted(acc["not_learned"].items())),
        "sync": {"epochs_applied": acc["sync"]["merged"], "publications": acc["sync"]["published"],
                 "bytes_published": acc["sync"]["bytes_out"], "max_lag_epochs": acc["sync"]["max_lag_epochs"]},
    }


def write_summary(summary: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path
