"""Prequential (predict-then-learn) benchmark on time-ordered real data.

For every micro-batch of events, in event-time order, each model first scores the events (and the
same sampled negatives for every model), then learns from them. Models compared in one run:

  static       incremental learner trained on the first 20% (one pass + one more epoch), then frozen
  retrain      periodic full retrain from scratch every day of event time (``bench/retrain.py``)
  incremental  our micro-batch mode: one optimizer step per batch of ``--batch_size`` events
  online       our per-event mode: one optimizer step per event
  river        River's BiasedMF with logistic loss (online matrix factorisation), an outside peer

Reported: AUC and logloss overall and per time window, Recall@10/20 of the clicked item among
recent candidate items (sampled events), events/s of each model (learn + predict time only), and
forgetting: AUC on a fixed sample of the first 20% right after it and again after the replay.

    python -m bench.prequential                           # both datasets from ../shared/datasets
    python -m bench.prequential --dataset movielens --data /path/to/ml-100k
    python -m bench.prequential --data ratings.csv --columns user_id=userId,item_id=movieId  # any layout
    python -m bench.prequential --dataset globo --limit 0  # all 2,988,181 clicks (slow)

Datasets are read where they are (``--data`` or ``$FRESHREC_DATASETS``); nothing is copied. Official
sources: MovieLens 100K https://files.grouplens.org/datasets/movielens/ml-100k.zip (unzip; the folder
holds u.data); Globo.com news clicks: Kaggle dataset "gspmoreira/news-portal-user-interactions-by-globocom"
(`kaggle datasets download gspmoreira/news-portal-user-interactions-by-globocom`, unzip clicks.zip into clicks/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

import numpy as np

from bench.retrain import PeriodicRetrain, RetrainConfig
from core.cleaning import InvalidEvent, validate_event
from core.featurizers import FeatureConfig, ItemPopularity, UserFeaturizer
from core.layout import LayoutError, resolve_layout
from core.readers import read_replay
from core.settings import DEFAULTS, HelpFormatter, add_flags, feature_config, learner_config
from model.batch import event_label
from model.config import LearnerConfig
from model.learner import IncrementalLearner
from model.metrics import BinaryStats, exact_auc

DAY_MS = 86_400_000
DEFAULT_DIR = os.environ.get("FRESHREC_DATASETS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets"))
DATASETS = {
    "movielens": {"folder": "movielens-100k", "preset": "movielens", "limit": None, "retrain_window_ms": None},
    "globo": {"folder": "globo-news-clicks", "preset": "globo", "limit": 400_000, "retrain_window_ms": 2 * DAY_MS},
    "custom": {"folder": None, "preset": None, "limit": None, "retrain_window_ms": None},  # --data with any layout
}


# ---------------------------------------------------------------------- stream preparation
def featurize_stream(raw: list[dict[str, Any]], feature_cfg: FeatureConfig, negatives: int, seed: int,
                     pool_size: int = 10_000) -> tuple[list[dict[str, Any]], int]:
    """Validate, featurize (runner-free featurizers) and attach ``negatives`` sampled items per event.

    Negatives are items of recent events (a ring of the last ``pool_size`` events: popularity- and
    recency-proportional, so they are hard negatives), the same for every model. Every example of an
    event carries ``sample_log_q`` = log(k * q(item)), q being the ring's share of the item (smoothed by
    half an occurrence), so the learner can correct the sampling bias (see ``model.learner._log_q``)."""
    users, items = UserFeaturizer(feature_cfg), ItemPopularity(feature_cfg)
    ustate: dict[str, Any] = {}
    istate: dict[str, Any] = {}
    pool: deque[str] = deque(maxlen=pool_size)
    in_pool: Counter[str] = Counter()

    def log_q(item: str) -> float:
        return math.log(max(1, negatives) * (in_pool[item] + 0.5) / (len(pool) + 0.5))
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    invalid = 0
    for rec in raw:
        try:
            ev = validate_event(rec)
        except InvalidEvent:
            invalid += 1
            continue
        us = ustate.setdefault(ev["user_id"], users.new_state())
        it = istate.setdefault(ev["item_id"], items.new_state())
        uf, hist = users.transform_one(us, ev)
        ev["user_features"], ev["history"] = uf, hist
        ev["item_features"] = items.transform_one(it, ev)
        group = [ev]
        if negatives:
            ev["sample_log_q"] = log_q(ev["item_id"])
        if pool and negatives:
            for _ in range(negatives):
                neg = pool[rng.randrange(len(pool))]
                if neg == ev["item_id"]:
                    continue
                group.append({**ev, "event_id": ev["event_id"] + "-n", "item_id": neg, "label": 0.0, "sampled": True,
                              "event_type": "view", "value": None,
                              "item_features": items.transform_one(istate[neg], ev), "sample_log_q": log_q(neg)})
        out.extend(group)
        users.learn_one(us, ev)
        items.learn_one(it, ev)
        if len(pool) == pool.maxlen:
            in_pool[pool[0]] -= 1
        pool.append(ev["item_id"])
        in_pool[ev["item_id"]] += 1
    return out, invalid


def expected_hit(scores: np.ndarray, target: int, k: int) -> float:
    """P(target ranks in the top k) with ties broken uniformly at random: a model that scores many
    candidates the same (unknown items) gets no credit for the tie."""
    greater = int((scores > scores[target]).sum())
    equal = int((scores == scores[target]).sum()) - 1
    return float(min(1.0, max(0.0, (k - greater) / (equal + 1))))


# ---------------------------------------------------------------------- models
class RiverMF:
    """River's BiasedMF with logistic loss, driven one example at a time (predict, then learn)."""

    name = "river"

    def __init__(self, threshold: float, seed: int):
        from river import optim, reco

        self.model = reco.BiasedMF(n_factors=16, bias_optimizer=optim.SGD(0.05), latent_optimizer=optim.SGD(0.05),
                                   loss=optim.losses.Log(), l2_bias=1e-4, l2_latent=1e-4,
                                   latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.05, seed=seed), seed=seed)
        self.threshold = threshold

    def learn(self, batch: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        labels, probs = [], []
        for ev in batch:
            y = event_label(ev, self.threshold)
            p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, self.model.predict_one(ev["user_id"], ev["item_id"])))))
            labels.append(y)
            probs.append(p)
            self.model.learn_one(ev["user_id"], ev["item_id"], y > 0.5)
        return labels, probs

    def predict(self, batch: list[dict[str, Any]]) -> list[float]:
        return [self.model.predict_one(ev["user_id"], ev["item_id"]) for ev in batch]

    def score_candidates(self, user: str, items: list[str]) -> list[float]:
        return [self.model.predict_one(user, i) for i in items]


class OurModel:
    def __init__(self, name: str, learner: IncrementalLearner | PeriodicRetrain):
        self.name = name
        self.learner = learner

    def learn(self, batch: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        r = self.learner.learn(batch)
        return r.labels, r.probs

    def predict(self, batch: list[dict[str, Any]]) -> list[float]:
        return self.learner.predict(batch)

    def score_candidates(self, user: str, items: list[str]) -> list[float]:
        return self.learner.score_candidates(user, items)


def make_models(feature_cfg: FeatureConfig, args: argparse.Namespace, retrain_window_ms: int | None) -> list[Any]:
    # the model flags as the pipeline takes them; negatives are sampled once for all models (featurize_stream)
    base = replace(learner_config(args, feature_cfg), mode="incremental", negatives=0, gate_window=2_000)
    retrain = RetrainConfig(every_ms=DAY_MS, epochs=2, window_ms=retrain_window_ms, batch=args.retrain_batch)
    models: list[Any] = [
        OurModel("static", IncrementalLearner(replace(base, gate=False))),
        OurModel("retrain", PeriodicRetrain(base, retrain)),
        OurModel("incremental", IncrementalLearner(base)),
        OurModel("online", IncrementalLearner(replace(base, mode="online", lr=args.online_lr))),
    ]
    if not args.no_river:
        models.append(RiverMF(base.rating_threshold, args.seed))
    return [m for m in models if m.name in args.models]


# ---------------------------------------------------------------------- the run
def run_dataset(name: str, path: str, limit: int | None, args: argparse.Namespace) -> dict[str, Any]:
    spec = DATASETS[name]
    t0 = time.time()
    preset = None if args.columns else args.data_format or spec["preset"]
    layout = resolve_layout(path, preset, args.columns, args.time_unit)
    print(f"{name}: reading {path} as {layout.described}", flush=True)
    raw = read_replay(path, layout.mapping, limit)
    feature_cfg = feature_config(args)
    stream, invalid = featurize_stream(raw, feature_cfg, args.negatives, args.seed)
    del raw
    prep_s = time.time() - t0
    positives = [i for i, e in enumerate(stream) if not e.get("sampled")]
    n_events = len(positives)
    cut = positives[int(n_events * 0.2)] if n_events else 0  # stream index where the first 20% of events end
    print(f"\n== {name}: {n_events} events (+{len(stream) - n_events} sampled negatives, {invalid} invalid) "
          f"from {path}; prepared in {prep_s:.1f}s", flush=True)

    rng = random.Random(args.seed + 1)
    head_sample = stream[:cut]
    if len(head_sample) > args.forgetting_sample:
        head_sample = rng.sample(head_sample, args.forgetting_sample)
    threshold = LearnerConfig().rating_threshold
    head_labels = [event_label(e, threshold) for e in head_sample]

    models = make_models(feature_cfg, args, spec["retrain_window_ms"])
    n_windows = args.windows
    window_of = np.minimum((np.arange(len(stream)) * n_windows) // max(1, len(stream)), n_windows - 1)
    stats = {m.name: BinaryStats() for m in models}
    wstats = {m.name: [BinaryStats() for _ in range(n_windows)] for m in models}
    hits = {m.name: {10: 0.0, 20: 0.0} for m in models}
    whits = {m.name: [{10: 0.0, 20: 0.0} for _ in range(n_windows)] for m in models}
    wprobes = [0] * n_windows
    recall_n = 0
    seconds = {m.name: 0.0 for m in models}
    forgetting: dict[str, dict[str, float]] = {m.name: {} for m in models}
    recent: deque[str] = deque(maxlen=args.candidate_pool)
    positive_seen = 0
    batch = args.batch_size
    for start in range(0, len(stream), batch):
        chunk = stream[start : start + batch]
        # Recall@K on sampled positive events, before anyone learns this chunk
        probes = []
        for ev in chunk:
            if ev.get("sampled") or event_label(ev, threshold) < 0.5:
                continue
            positive_seen += 1
            if positive_seen % args.recall_every == 0 and len(recent) >= 20:
                probes.append(ev)
        if probes:
            candidates = list(dict.fromkeys(recent))
            for ev in probes:
                cands = candidates if ev["item_id"] in candidates else candidates + [ev["item_id"]]
                target = cands.index(ev["item_id"])
                recall_n += 1
                w = window_of[start]
                wprobes[w] += 1
                for m in models:
                    scores = np.asarray(m.score_candidates(ev["user_id"], cands))
                    for k in (10, 20):
                        hit = expected_hit(scores, target, k)
                        hits[m.name][k] += hit
                        whits[m.name][w][k] += hit
        for m in models:
            t = time.perf_counter()
            labels, probs = m.learn(chunk)
            seconds[m.name] += time.perf_counter() - t
            stats[m.name].update(labels, probs)
            w = window_of[start]
            wstats[m.name][w].update(labels, probs)
        for ev in chunk:
            if not ev.get("sampled"):
                recent.append(ev["item_id"])
        if start < cut <= start + batch:  # the first 20% is over
            for m in models:
                if m.name == "static":
                    for s2 in range(0, cut, batch):  # one more epoch over the head, then freeze
                        m.learn(stream[s2 : min(cut, s2 + batch)])
                    m.learner.frozen = True
                probs = m.predict(head_sample)
                forgetting[m.name]["auc_head_before"] = exact_auc(head_labels, probs)
        if args.progress and (start // batch) % 200 == 0:
            done = min(len(stream), start + batch) / len(stream)
            line = " ".join(f"{m.name}={stats[m.name].auc():.3f}" for m in models)
            print(f"  {done:6.1%}  auc {line}", flush=True)
    for m in models:
        forgetting[m.name]["auc_head_after"] = exact_auc(head_labels, m.predict(head_sample))

    ends = [int(stream[min(len(stream) - 1, ((w + 1) * len(stream) - 1) // n_windows)]["event_time_ms"])
            for w in range(n_windows)] if stream else []
    result: dict[str, Any] = {"dataset": name, "events": n_events, "examples": len(stream), "invalid": invalid,
                              "negatives_per_event": args.negatives, "batch": batch, "recall_probes": recall_n,
                              "candidate_pool": args.candidate_pool, "window_end_ms": ends, "models": {}}
    for m in models:
        s = stats[m.name]
        result["models"][m.name] = {
            "auc": s.auc(), "logloss": s.logloss(),
            "recall@10": hits[m.name][10] / recall_n if recall_n else None,
            "recall@20": hits[m.name][20] / recall_n if recall_n else None,
            "events_per_s": n_events / seconds[m.name] if seconds[m.name] else None,
            "auc_by_window": [w.auc() for w in wstats[m.name]],
            "recall@10_by_window": [h[10] / n if n else None for h, n in zip(whits[m.name], wprobes)],
            "recall@20_by_window": [h[20] / n if n else None for h, n in zip(whits[m.name], wprobes)],
            "logloss_by_window": [w.logloss() for w in wstats[m.name]],
            **forgetting[m.name],
        }
    return result


def fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(result: dict[str, Any]) -> None:
    models = result["models"]
    base = models.get("static")
    print(f"\n{result['dataset']}: {result['events']} events, {result['negatives_per_event']} negatives/event, "
          f"batch {result['batch']}, Recall@K over {result['recall_probes']} probes among the last "
          f"{result['candidate_pool']} events' items")
    print(f"{'model':12s} {'AUC':>7s} {'logloss':>8s} {'R@10':>7s} {'R@20':>7s} {'events/s':>10s} "
          f"{'vs static':>9s} {'headAUC before':>15s} {'after':>7s}")
    for name, m in models.items():
        ratio = m["events_per_s"] / base["events_per_s"] if base and base["events_per_s"] and m["events_per_s"] else None
        print(f"{name:12s} {fmt(m['auc']):>7s} {fmt(m['logloss']):>8s} {fmt(m['recall@10']):>7s} {fmt(m['recall@20']):>7s} "
              f"{fmt(m['events_per_s'], '.0f'):>10s} {fmt(ratio, '.2f') + 'x':>9s} "
              f"{fmt(m.get('auc_head_before')):>15s} {fmt(m.get('auc_head_after')):>7s}")
    for metric in ("auc", "logloss", "recall@10", "recall@20"):
        print(f"{metric} by time window (equal example counts):")
        for name, m in models.items():
            print(f"  {name:12s} " + " ".join(fmt(a, ".3f") for a in m[f"{metric}_by_window"]))
    if "incremental" in models and base:
        verdict = "beats" if models["incremental"]["auc"] > base["auc"] else "does NOT beat"
        print(f"incremental {verdict} static: AUC {fmt(models['incremental']['auc'])} vs {fmt(base['auc'])}")


def comparison_page(result: dict[str, Any]) -> str:
    """The model comparison as a page of charts (``pipelines.report``): one line per model over event time."""
    from pipelines.report import model_lines, page

    ends = result["window_end_ms"]
    sections = []
    for metric, label in (("auc", "prequential AUC"), ("logloss", "prequential logloss"), ("recall@10", "Recall@10")):
        lines = {name: [(t, v) for t, v in zip(ends, m[f"{metric}_by_window"], strict=False)
                        if v is not None and not (isinstance(v, float) and math.isnan(v))]
                 for name, m in result["models"].items()}
        sections.append((f"{label} over time", f"Each model's {label} per window of equal example counts, plotted at "
                         "the window's last event time.", model_lines(f"{result['dataset']}: {label}", metric, lines)))
    facts = {"dataset": result["dataset"], "events": result["events"], "batch": result["batch"],
             **{f"{name} AUC / R@10": f"{fmt(m['auc'])} / {fmt(m['recall@10'])}" for name, m in result["models"].items()}}
    return page(f"prequential comparison: {result['dataset']}", sections, facts)


def make_parser() -> argparse.ArgumentParser:
    """This entry point's flags (tests/test_settings.py compares their defaults with core.settings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--dataset", choices=["movielens", "globo", "all", "custom"], default=None,
                    help="a shared dataset, both, or custom (any --data); default: all, or custom with --data")
    ap.add_argument("--data", help="dataset file or folder (with a single --dataset); default $FRESHREC_DATASETS/<name>")
    add_flags(ap, ("input",), only=("data_format", "columns", "time_unit"))
    ap.add_argument("--limit", type=int, default=None, help="events to replay (0 = all; default: all for MovieLens, 400000 for Globo)")
    ap.add_argument("--retrain_batch", type=int, default=512, help="batch size of the daily full retrain")
    ap.add_argument("--online_lr", type=float, default=DEFAULTS["lr"], help="learning rate of the online model")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--recall_every", type=int, default=20, help="probe Recall@K on every Nth positive event")
    ap.add_argument("--candidate_pool", type=int, default=2_000, help="Recall@K candidates: items of the last N events")
    ap.add_argument("--forgetting_sample", type=int, default=5_000)
    ap.add_argument("--models", default="static,retrain,incremental,online,river")
    ap.add_argument("--no_river", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    add_flags(ap, ("model", "stability"), skip=("mode", "flush_interval_s", "top_k"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    dataset = args.dataset or ("custom" if args.data else "all")
    names = ["movielens", "globo"] if dataset == "all" else [dataset]
    if args.data and len(names) > 1:
        ap.error("--data needs a single --dataset")
    if dataset == "custom" and not args.data:
        ap.error("--dataset custom needs --data")
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        path = args.data or os.path.join(DEFAULT_DIR, str(DATASETS[name]["folder"]))
        if not os.path.exists(path):
            print(f"{name}: no data at {path}; pass --data or set FRESHREC_DATASETS (see the module docstring for the download)",
                  file=sys.stderr)
            return 2
        limit = DATASETS[name]["limit"] if args.limit is None else (args.limit or None)
        try:
            result = run_dataset(name, path, limit, args)
        except LayoutError as exc:
            print(f"prequential: error: {exc}", file=sys.stderr)
            return 2
        report(result)
        with open(os.path.join(args.out, f"prequential-{name}.json"), "w") as fh:
            json.dump(result, fh, indent=1, default=lambda x: None)
        page = os.path.join(args.out, f"prequential-{name}.html")
        with open(page, "w", encoding="utf-8") as fh:
            fh.write(comparison_page(result))
        print(f"{name}: the models over time: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
