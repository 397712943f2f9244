"""Recognise a dataset's layout, so that any tabular or JSON-lines file replays with ``--data`` alone.

``resolve_layout`` turns a path (and optional ``--data_format``, ``--columns``, ``--time_unit``) into a
``ColumnMapping`` and a one-line description of what it chose. For a file it sniffs the delimiter and
the header, maps columns by their common names (``userId``, ``visitor``, ``movieId``, ``article``,
``rating``, ``timestamp`` ...), and tells the time unit (seconds, float seconds, milliseconds,
microseconds or ISO-8601) from the values. A guess that would put most events outside 1990-2100 is an
error (``LayoutError``), not a stream of dead letters.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "ratings.csv")
>>> _ = open(path, "w").write("userId,movieId,rating,timestamp\\n1,31,2.5,1260759144\\n1,1029,3.0,1260759179\\n")
>>> layout = resolve_layout(path)
>>> layout.described
'csv with a header: user_id=userId, item_id=movieId, event_time=timestamp (s), value=rating, event_type=rating (constant)'
>>> resolve_layout(path, columns="user_id=movieId,item_id=userId").mapping.user_id
'col:movieId'
"""

from __future__ import annotations

import csv
import glob
import itertools
import os
from dataclasses import dataclass, replace
from typing import Any

from core.cleaning import MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS
from core.readers import PRESETS, TIME_UNITS, ColumnMapping, as_number, guess_preset, to_epoch_ms
from core.records import csv_records, jsonl_records
from schemas import EVENT_TYPES

FIELDS = ("user_id", "item_id", "event_time", "value", "event_type", "event_id")
ALIASES: dict[str, tuple[str, ...]] = {  # first match wins, so more specific names come first
    "user_id": ("user_id", "user", "uid", "visitor_id", "visitor", "customer_id", "customer", "member_id", "member",
                "reviewer_id", "reviewer", "account_id", "client_id", "session_id", "session"),
    "item_id": ("item_id", "item", "iid", "click_article_id", "article_id", "article", "movie_id", "movie",
                "product_id", "product", "sku", "asin", "track_id", "track", "song_id", "video_id", "content_id",
                "news_id", "book_id", "isbn", "business_id"),
    "event_time": ("event_time_ms", "event_time", "click_timestamp", "timestamp", "time", "ts", "datetime",
                   "created_at", "date", "unix_time", "epoch"),
    "value": ("value", "rating", "score", "stars", "rate", "preference"),
    "event_type": ("event_type", "event", "type", "action", "behavior", "behaviour", "interaction"),
    "event_id": ("event_id", "interaction_id"),
}
DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".dat", ".data", ".jsonl", ".ndjson", ".json", ".avro")
SAMPLE_BYTES, SAMPLE_ROWS = 1 << 16, 200


class LayoutError(ValueError):
    """The layout of ``--data`` cannot be told, or a guess or override does not fit it (one line)."""


@dataclass(frozen=True)
class Layout:
    mapping: ColumnMapping
    described: str


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _match(headers: list[str]) -> dict[str, str]:
    by_norm = {_norm(h): h for h in headers}
    out: dict[str, str] = {}
    for field, names in ALIASES.items():
        for name in names:
            hit = by_norm.get(_norm(name))
            if hit is not None and hit not in out.values():
                out[field] = hit
                break
    return out


def _plausible(values: list[Any], unit: str) -> float:
    ms = [to_epoch_ms(v, unit) for v in values]
    ok = [m for m in ms if isinstance(m, int) and MIN_EVENT_TIME_MS <= m <= MAX_EVENT_TIME_MS]
    return len(ok) / max(1, len(values))


def guess_time_unit(values: list[Any]) -> str | None:
    """The unit that puts at least 90% of ``values`` between 1990 and 2100, or None."""
    for unit in TIME_UNITS:
        if values and _plausible(values, unit) >= 0.9:
            return unit
    return None


def _sample_rows(path: str, fmt: str, delimiter: str, header: bool, first: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and the first ``SAMPLE_ROWS`` rows that parse (read as the replay reads them)."""
    if fmt == "jsonl":
        rows = [r for r in itertools.islice(jsonl_records(path), SAMPLE_ROWS * 2) if "__unparsable__" not in r]
        return list(dict.fromkeys(k for r in rows for k in r)), rows[:SAMPLE_ROWS]
    names = first if header else [f"c{i}" for i in range(len(first))]
    records = csv_records(path, delimiter, None if header else tuple(names))
    rows = [r for r in itertools.islice(records, SAMPLE_ROWS * 2) if "__unparsable__" not in r]
    return names, rows[:SAMPLE_ROWS]


def _positional(names: list[str], rows: list[dict[str, Any]]) -> dict[str, str]:
    """A header-less table: the time is the column that looks like one, then user, item, and a small value."""
    cols = {n: [r.get(n) for r in rows] for n in names}
    time_col = next((n for n in names if guess_time_unit(cols[n])), None)
    rest = [n for n in names if n != time_col]
    out = {"event_time": time_col} if time_col else {}
    if len(rest) >= 2:
        out["user_id"], out["item_id"] = rest[0], rest[1]
    for n in rest[2:]:
        nums = [as_number(v) for v in cols[n]]
        if nums and all(isinstance(x, (int, float)) and 0 <= x <= 10 for x in nums):
            out["value"] = n
            break
    return {k: v for k, v in out.items() if v is not None}


def _apply_columns(spec: str, names: list[str], chosen: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--columns field=COL,...``: (columns, constants) after the overrides."""
    constants: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        field, sep, col = part.partition("=")
        field, col = field.strip(), col.strip()
        if not sep or field not in FIELDS:
            raise LayoutError(f"--columns: expected FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}, got {part!r}")
        if col.isdigit() and names and names[0] == "c0" and int(col) < len(names):
            col = f"c{col}"
        if col in names:
            chosen[field] = col
        elif field == "event_type" and col in EVENT_TYPES:
            chosen.pop(field, None)
            constants[field] = col
        else:
            raise LayoutError(f"--columns: {field}={col}: no column {col!r} (columns: {', '.join(names)})")
    return chosen, constants


def _sniff_file(path: str, columns: str | None, time_unit: str | None) -> Layout:
    with open(path, "rb") as fh:
        head = fh.read(SAMPLE_BYTES)
    text = head.decode("utf-8", "replace")
    if not text.strip():
        raise LayoutError(f"--data {path}: the file is empty")
    first: list[str] = []
    if text.lstrip().startswith(("{", "[")):
        fmt, delimiter, header = "jsonl", "", True
    else:
        sample = "\n".join(text.splitlines()[:50])
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
        except csv.Error as exc:
            raise LayoutError(f"--data {path}: cannot tell the delimiter (comma, tab, ; or |); pass --data_format") from exc
        first = next(csv.reader([text.splitlines()[0]], delimiter=delimiter))
        header = len(_match(first)) >= 2 or not all(isinstance(as_number(v), (int, float)) for v in first) and csv.Sniffer().has_header(sample)
        fmt = "tsv" if delimiter == "\t" else "csv"
    names, rows = _sample_rows(path, fmt, delimiter, header, [] if fmt == "jsonl" else first)
    chosen = _match(names) if header else _positional(names, rows)
    if "event_time" not in chosen:  # a column named otherwise whose values read as times
        taken = set(chosen.values())
        found = next((n for n in names if n not in taken and guess_time_unit([r.get(n) for r in rows])), None)
        if found is not None:
            chosen["event_time"] = found
    chosen, constants = _apply_columns(columns, names, chosen) if columns else (chosen, {})
    for need in ("user_id", "item_id", "event_time"):
        if need not in chosen:
            raise LayoutError(f"--data {path}: no {need} column among {', '.join(names) or 'none'}; "
                              f"pass --columns {need}=COLUMN")
    times = [r.get(chosen["event_time"]) for r in rows]
    unit = time_unit or guess_time_unit(times)
    if unit is None or _plausible(times, unit) < 0.9:
        example = ", ".join(repr(t) for t in times[:3])
        how = f"as {unit}" if unit else "in s, ms, us or ISO-8601"
        raise LayoutError(f"--data {path}: column {chosen['event_time']!r} ({example}) does not read {how} as times "
                          f"between 1990 and 2100; pass --time_unit or --columns event_time=COLUMN")
    if "event_type" not in chosen and "event_type" not in constants:
        constants["event_type"] = "rating" if "value" in chosen else "click"
    col = lambda f: f"col:{chosen[f]}" if f in chosen else None  # noqa: E731
    mapping = ColumnMapping(
        format=fmt, columns=None if header else tuple(names), delimiter=delimiter or None,
        event_id=col("event_id") or "{__line__}", user_id=col("user_id") or "", item_id=col("item_id") or "",
        event_type=col("event_type") or constants["event_type"], event_time=col("event_time") or "",
        time_unit=unit, value=col("value"), file_glob="*" + os.path.splitext(path)[1])
    parts = [f"{f}={chosen[f]}" + (f" ({unit})" if f == "event_time" else "") for f in FIELDS if f in chosen]
    parts += [f"{f}={v} (constant)" for f, v in constants.items()]
    kind = "json lines" if fmt == "jsonl" else f"{fmt} with a header" if header else f"{fmt} without a header"
    if fmt != "jsonl" and delimiter not in (",", "\t"):
        kind += f" (delimiter {delimiter!r})"
    return Layout(mapping, f"{kind}: " + ", ".join(parts))


def resolve_layout(path: str, data_format: str | None = None, columns: str | None = None,
                   time_unit: str | None = None) -> Layout:
    """The mapping ``--data`` replays with: a preset (forced, or recognised from a folder or a suffix) or,
    for any other file or folder of files, what ``_sniff_file`` tells from the first one."""
    if not os.path.exists(path):
        raise LayoutError(f"--data {path}: no such file or folder")
    if data_format and columns:
        raise LayoutError("--data_format and --columns: pass one of them (a preset fixes the columns)")
    preset = data_format
    if preset is None and not columns and (os.path.isdir(path) or path.lower().endswith(".avro")):
        try:
            preset = guess_preset(path)  # the MovieLens and Globo folders, Avro files
        except ValueError:
            preset = None
    if preset is not None:
        mapping = PRESETS[preset]
        if time_unit:
            mapping = replace(mapping, time_unit=time_unit)
        return Layout(mapping, f"preset {preset!r}")
    target = path
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(DATA_SUFFIXES))
        if not files:
            raise LayoutError(f"--data {path}: no data files ({', '.join(DATA_SUFFIXES)}) in the folder")
        target = files[0]
    if target.lower().endswith(".avro"):
        return Layout(PRESETS["avro"], "preset 'avro'")
    layout = _sniff_file(target, columns, time_unit)
    if target != path:
        layout = Layout(layout.mapping, f"{layout.described}; every {layout.mapping.file_glob} file in the folder")
    return layout
