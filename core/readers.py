"""Runner-free event readers: a time-ordered file replay with column mappings, and the synthetic
drifting stream. Beam (``transforms.sources``), PyFlink (``pipelines.flink_job``), the publisher and
the benchmarks all read through these."""

from __future__ import annotations

import glob
import marshal
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import accumulate
from operator import itemgetter
from typing import Any

from core.records import MAX_EVENT_BYTES, avro_records, csv_records, jsonl_records

DATA_ENV = "FRESHREC_DATA"


@dataclass(frozen=True)
class ColumnMapping:
    """How one file format's columns become raw-event fields.

    A field given as ``"col:NAME"`` reads column NAME (or position N for header-less files);
    any other string is a constant. ``event_id`` may be a ``{NAME}`` template over columns.
    """

    format: str = "csv"  # csv | tsv | jsonl | avro
    columns: tuple[str, ...] | None = None  # names for header-less csv/tsv files
    event_id: str = "{__line__}"
    user_id: str = "col:user_id"
    item_id: str = "col:item_id"
    event_type: str = "col:event_type"
    event_time: str = "col:event_time_ms"
    time_unit: str = "ms"  # one of TIME_UNITS
    value: str | None = None
    context: tuple[str, ...] = ()
    file_glob: str = "*"
    delimiter: str | None = None  # csv/tsv: the field separator (default "," or a tab)
    value_range: tuple[float, float] | None = None  # the domain of value (a rating scale), where known

    def __post_init__(self) -> None:
        if self.format not in ("csv", "tsv", "jsonl", "avro"):
            raise ValueError(f"ColumnMapping.format must be csv, tsv, jsonl or avro, got {self.format!r}")
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"ColumnMapping.time_unit must be one of {', '.join(TIME_UNITS)}, got {self.time_unit!r}")

    @property
    def separator(self) -> str:
        return self.delimiter or ("\t" if self.format == "tsv" else ",")


TIME_UNITS = ("s", "ms", "us", "iso")  # seconds (integer or float), milliseconds, microseconds, ISO-8601 text


def to_epoch_ms(value: Any, unit: str) -> Any:
    """An event time in ``unit`` as epoch milliseconds (an int); a value that is not one is returned as it
    is, for validation to refuse."""
    if unit == "iso":
        if not isinstance(value, str):
            return value
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return value
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    value = as_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return value
    if unit == "ms":
        return value
    return int(value * (1000 if unit == "s" else 0.001))


PRESETS: dict[str, ColumnMapping] = {
    # MovieLens 100K u.data: user \t item \t rating \t unix seconds, no header.
    "movielens": ColumnMapping(
        format="tsv", columns=("user", "item", "rating", "ts"), event_id="ml-{user}-{item}-{ts}",
        user_id="col:user", item_id="col:item", event_type="rating", event_time="col:ts", time_unit="s",
        value="col:rating", file_glob="u.data", value_range=(1.0, 5.0)),
    # Globo.com news clicks: hourly CSV parts with a header.
    "globo": ColumnMapping(
        format="csv", event_id="g-{session_id}-{click_article_id}-{click_timestamp}", user_id="col:user_id",
        item_id="col:click_article_id", event_type="click", event_time="col:click_timestamp", time_unit="ms",
        context=("session_id", "click_environment", "click_deviceGroup", "click_os", "click_country",
                 "click_region", "click_referrer_type"),
        file_glob="clicks/clicks_hour_*.csv"),
    # Our own JSON lines export: one raw event (schemas/raw_event.avsc fields) per line.
    "jsonl": ColumnMapping(format="jsonl", event_id="col:event_id", value="col:value"),
    "avro": ColumnMapping(format="avro", event_id="col:event_id", value="col:value"),
}


def guess_preset(path: str) -> str:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "u.data")):
            return "movielens"
        if glob.glob(os.path.join(path, "clicks", "clicks_hour_*.csv")):
            return "globo"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".avro"):
        return "avro"
    raise ValueError(f"cannot tell the format of {path!r}; pass --data_format movielens|globo|jsonl|avro")


def _files(path: str, mapping: ColumnMapping) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, mapping.file_glob)))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"no input files under {path!r} matching {mapping.file_glob!r}")
    return files


def count_records(path: str, mapping: ColumnMapping) -> int:
    """About how many events ``path`` holds, without parsing it: physical lines of the line formats (a
    header too), the record counts of an Avro file's blocks."""
    total = 0
    for f in _files(path, mapping):
        if mapping.format == "avro":
            import fastavro

            with open(f, "rb") as fh:
                try:
                    total += sum(block.num_records for block in fastavro.block_reader(fh))
                except Exception:  # a damaged file: the replay dead-letters it; count what its size suggests
                    total += os.path.getsize(f) // 64
            continue
        with open(f, "rb") as fh:
            last = b"\n"
            while chunk := fh.read(1 << 20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
            total += last != b"\n"
    return total


def _rows(path: str, mapping: ColumnMapping, max_bytes: int = MAX_EVENT_BYTES) -> Iterator[dict[str, Any]]:
    """One row (or unparsable record, ``core.records``) per physical record of the file."""
    if mapping.format in ("csv", "tsv"):
        return csv_records(path, mapping.separator, mapping.columns, max_bytes)
    if mapping.format == "jsonl":
        return jsonl_records(path, max_bytes)
    return avro_records(path)


def _field(spec: str | None, row: dict[str, Any]) -> Any:
    if spec is None:
        return None
    if spec.startswith("col:"):
        return row.get(spec[4:])
    return spec


def as_number(x: Any) -> Any:
    """Numbers stay numbers; numeric strings become numbers; anything else is left for validation to refuse."""
    if isinstance(x, (int, float)) or x is None:
        return x
    try:
        f = float(x)
    except (TypeError, ValueError):
        return x
    return int(f) if f.is_integer() else f


def map_row(row: dict[str, Any], mapping: ColumnMapping, line: int) -> tuple[int, dict[str, Any]]:
    """(sort key in ms, raw event dict) for one input row; unparsable times sort first and fail validation."""
    if "__unparsable__" in row:
        return (-1, {"__unparsable__": row["__unparsable__"], "__reason__": row.get("__reason__", "unparsable"),
                     "line": line})
    ts = to_epoch_ms(_field(mapping.event_time, row), mapping.time_unit)
    values = {k: ("" if v is None else v) for k, v in row.items()}
    try:
        event_id = mapping.event_id.format(__line__=line, **values) if "{" in mapping.event_id else _field(mapping.event_id, row)
    except (KeyError, IndexError, ValueError):
        event_id = None
    event = {
        "event_id": event_id,
        "user_id": _field(mapping.user_id, row),
        "item_id": _field(mapping.item_id, row),
        "event_type": _field(mapping.event_type, row),
        "event_time_ms": ts,
        "value": as_number(_field(mapping.value, row)),
        "context": row.get("context") if mapping.format in ("jsonl", "avro") and isinstance(row.get("context"), dict)
        else {c: str(row[c]) for c in mapping.context if c in row},
    }
    key = int(ts) if isinstance(ts, (int, float)) and math.isfinite(ts) else -1
    return key, event


def _sorted_rows(path: str, mapping: ColumnMapping, pack: Callable[[dict[str, Any]], Any],
                 max_bytes: int = MAX_EVENT_BYTES) -> list[Any]:
    keyed: list[tuple[int, int, Any]] = []
    line = 0
    for f in _files(path, mapping):
        for row in _rows(f, mapping, max_bytes):
            key, event = map_row(row, mapping, line)
            keyed.append((key, line, pack(event)))
            line += 1
    keyed.sort(key=itemgetter(0, 1))
    return [e for _, _, e in keyed]


def read_replay(path: str, mapping: ColumnMapping, limit: int | None = None,
                max_bytes: int = MAX_EVENT_BYTES) -> list[dict[str, Any]]:
    """Every record of the files, mapped to raw events and sorted by event time (stable: file order breaks
    ties); records that cannot be rows come first, for validation to dead-letter."""
    events = _sorted_rows(path, mapping, lambda e: e, max_bytes)
    return events[:limit] if limit is not None else events


def read_replay_packed(path: str, mapping: ColumnMapping, limit: int | None = None,
                       max_bytes: int = MAX_EVENT_BYTES) -> list[bytes]:
    """``read_replay`` with each event kept as ``marshal`` bytes (``unpack_event``): a replay source holds
    the whole sorted dataset, and packed it takes about a fifth of the memory of the dicts."""
    events = _sorted_rows(path, mapping, marshal.dumps, max_bytes)
    return events[:limit] if limit is not None else events


def unpack_event(packed: bytes) -> dict[str, Any]:
    return marshal.loads(packed)


# ---------------------------------------------------------------------- synthetic default
@dataclass(frozen=True)
class SyntheticConfig:
    """Users with drifting topic interests clicking items of those topics.

    Each user prefers one of ``topics`` topics; every ``drift_every_ms`` of event time each user
    switches preference with probability ``drift_prob``. A fraction of the stream is deliberately
    bad (``malformed_fraction``) or duplicated (``duplicate_fraction``) so the dead-letter path runs.
    """

    users: int = 500
    items: int = 400
    topics: int = 8
    events: int = 20_000
    start_ms: int = 1_700_000_000_000
    mean_gap_ms: int = 2_000
    drift_every_ms: int = 3_600_000
    drift_prob: float = 0.3
    on_topic: float = 0.85
    malformed_fraction: float = 0.005
    duplicate_fraction: float = 0.005
    seed: int = 7
    type_mix: tuple[tuple[str, float], ...] = (("view", 0.55), ("click", 0.3), ("purchase", 0.05), ("rating", 0.1))

    def __post_init__(self) -> None:
        if min(self.users, self.items, self.topics, self.events) < 1:
            raise ValueError("SyntheticConfig: users, items, topics and events must be >= 1")
        if not 0 <= self.malformed_fraction < 1 or not 0 <= self.duplicate_fraction < 1:
            raise ValueError("SyntheticConfig: fractions must be in [0, 1)")


def embedded_stream(events: int, seed: int) -> SyntheticConfig:
    """The synthetic stream a run reads without ``--data``: ``--synthetic_events`` events, drawn with
    ``--seed`` (offset by the stream's own default seed, 7), the same for every entry point."""
    return replace(SyntheticConfig(), events=events, seed=SyntheticConfig.seed + seed)


def synthetic_events(cfg: SyntheticConfig) -> Iterator[dict[str, Any]]:
    """Deterministic (seeded) stream of raw event dicts in event-time order, with some bad records."""
    rng = random.Random(cfg.seed)
    item_topic = [i % cfg.topics for i in range(cfg.items)]
    by_topic: dict[int, list[int]] = {}
    for i, t in enumerate(item_topic):
        by_topic.setdefault(t, []).append(i)
    prefer = [rng.randrange(cfg.topics) for _ in range(cfg.users)]
    # cumulative weights once (choices() with weights= accumulates them on every call; same draws)
    user_cum = list(accumulate(1.0 / (u + 1) ** 0.6 for u in range(cfg.users)))
    users = range(cfg.users)
    types, type_w = zip(*cfg.type_mix, strict=False)
    type_cum = list(accumulate(type_w))
    now = cfg.start_ms
    next_drift = cfg.start_ms + cfg.drift_every_ms
    previous: dict[str, Any] | None = None
    for n in range(cfg.events):
        now += int(rng.expovariate(1.0 / cfg.mean_gap_ms)) + 1
        while now >= next_drift:
            prefer = [rng.randrange(cfg.topics) if rng.random() < cfg.drift_prob else p for p in prefer]
            next_drift += cfg.drift_every_ms
        roll = rng.random()
        if previous is not None and roll < cfg.duplicate_fraction:
            yield dict(previous)
            continue
        if roll < cfg.duplicate_fraction + cfg.malformed_fraction:
            yield rng.choice([
                {"event_id": f"s{n}", "user_id": "u1", "item_id": "i1", "event_type": "teleport", "event_time_ms": now},
                {"event_id": f"s{n}", "user_id": "", "item_id": "i1", "event_type": "view", "event_time_ms": now},
                {"event_id": f"s{n}", "user_id": "u1", "item_id": "i1", "event_type": "view", "event_time_ms": "soon"},
                {"event_id": f"s{n}", "user_id": "u1", "event_type": "click", "event_time_ms": now},
            ])
            continue
        user = rng.choices(users, cum_weights=user_cum)[0]
        topic = prefer[user] if rng.random() < cfg.on_topic else rng.randrange(cfg.topics)
        pool = by_topic[topic]
        item = pool[min(int(rng.paretovariate(1.2)) - 1, len(pool) - 1)]
        etype = rng.choices(types, cum_weights=type_cum)[0]
        value = None
        if etype == "rating":
            value = float(5 if topic == prefer[user] and rng.random() < 0.8 else rng.randint(1, 3))
        elif etype == "purchase":
            value = round(rng.uniform(5, 50), 2)
        previous = {"event_id": f"s{n}", "user_id": f"u{user}", "item_id": f"i{item}", "event_type": etype,
                    "event_time_ms": now, "value": value, "context": {"topic": str(topic)}}
        yield dict(previous)


