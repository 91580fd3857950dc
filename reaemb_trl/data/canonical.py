"""The canonical dataset folder: `items.jsonl`, `interactions.csv`, `meta.json`.

Every reader converts into this folder; every consumer (prompt formatter, LRCL/CRRL, evaluation)
reads only this folder. An item is a dict ``{"item_id": str, "attributes": [{"key", "value"}, ...]}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from reaemb_trl.data.errors import DataFormatError, iter_text_lines

ITEMS_FILE = "items.jsonl"
INTERACTIONS_FILE = "interactions.csv"
META_FILE = "meta.json"
INTERACTIONS_HEADER = ["user_id", "item_id", "timestamp"]


def make_item(item_id, attributes: Iterable[tuple[str, object]]) -> dict:
    """Build a canonical item from (key, value) pairs; empty/None values are dropped, values become strings."""
    pairs = []
    for key, value in attributes:
        if value is None:
            continue
        text = str(value).strip()
        if text:
            pairs.append({"key": str(key), "value": text})
    return {"item_id": str(item_id), "attributes": pairs}


def id_problem(value: str) -> str | None:
    """Why an item or user id cannot live in the canonical folder (None when it can): interactions.csv is read
    line by line, so an id may hold any character but a line break."""
    if not value:
        return "is empty"
    if "\n" in value or "\r" in value:
        return "contains a line break, which interactions.csv cannot hold"
    return None


def item_has_text(item: Mapping) -> bool:
    return any(str(a.get("value", "")).strip() for a in item.get("attributes", []))


def _items_file(path: str | Path) -> Path:
    path = Path(path)
    return path / ITEMS_FILE if path.is_dir() else path


def _check_item(record, file: Path, line: int, seen: dict[str, int]) -> dict:
    """Validate one parsed items.jsonl record; raise DataFormatError naming file and line."""
    if not isinstance(record, dict):
        raise DataFormatError(file, line, "expected a JSON object", 'Write {"item_id": ..., "attributes": [...]}')
    item_id = record.get("item_id")
    if item_id is None or item_id == "":
        raise DataFormatError(file, line, "missing item_id", "Give every item a non-empty string item_id")
    if not isinstance(item_id, str):
        raise DataFormatError(file, line, f"item_id {item_id!r} is not a string", "Quote the id as a JSON string")
    if item_id in seen:
        raise DataFormatError(
            file, line, f"duplicate item_id {item_id!r} (first seen on line {seen[item_id]})",
            "Make item ids unique or merge the duplicates",
        )
    attributes = record.get("attributes")
    if not isinstance(attributes, list) or not attributes:
        raise DataFormatError(file, line, f"item {item_id!r} has no attributes", "Give every item at least one attribute")
    for attr in attributes:
        if not (isinstance(attr, dict) and isinstance(attr.get("key"), str) and isinstance(attr.get("value"), str)):
            raise DataFormatError(
                file, line, f"item {item_id!r} has a malformed attribute {attr!r}",
                'Write attributes as {"key": "<string>", "value": "<string>"}',
            )
    if not item_has_text({"attributes": attributes}):
        raise DataFormatError(file, line, f"item {item_id!r} has no text (all attribute values empty)",
                              "Fill in at least one attribute or drop the item")
    seen[item_id] = line
    return {"item_id": item_id, "attributes": [{"key": a["key"], "value": a["value"]} for a in attributes]}


def read_items(path: str | Path) -> list[dict]:
    """Read and validate items.jsonl (path = dataset folder or the file itself) into a list of items."""
    file = _items_file(path)
    items: list[dict] = []
    seen: dict[str, int] = {}
    for number, text in iter_text_lines(file):
        if not text.strip():
            continue  # a blank (e.g. trailing) line carries no item
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(file, number, f"broken JSON ({exc.msg})", "Fix or remove this line") from None
        items.append(_check_item(record, file, number, seen))
    if not items:
        raise DataFormatError(file, None, "no items", "The catalogue must hold at least one item")
    return items


def items_features():
    from datasets import Features, List, Value

    return Features({"item_id": Value("string"), "attributes": List({"key": Value("string"), "value": Value("string")})})


def load_items(path: str | Path):
    """Load items.jsonl as a `datasets.Dataset` (columns item_id, attributes), validated first."""
    from datasets import Dataset

    return Dataset.from_list(read_items(path), features=items_features())


def _parse_time(value: str, file: Path, line: int) -> float | None:
    """A numeric timestamp, None for another text (such as a date); NaN or inf is an error."""
    try:
        when = float(value)
    except ValueError:
        return None
    if not math.isfinite(when):
        raise DataFormatError(file, line, f"timestamp {value!r} is not a finite number", "Fix or remove this line")
    return when


def load_interactions(folder: str | Path, item_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read interactions.csv into {user_id: [item_id, ...]} in chronological order.

    Item ids are checked against `item_ids` (default: the folder's items.jsonl). Rows must be grouped by
    user and, where timestamps are numeric, non-decreasing within a user.
    """
    folder = Path(folder)
    file = folder / INTERACTIONS_FILE if folder.is_dir() else folder
    known = set(item_ids) if item_ids is not None else {it["item_id"] for it in read_items(file.parent)}
    sequences: dict[str, list[str]] = {}
    current, last_time, header_seen = None, None, False
    for number, text in iter_text_lines(file):
        if not text.strip():
            continue
        try:
            row = next(csv.reader([text]))
        except csv.Error as exc:
            raise DataFormatError(file, number, f"broken CSV line ({exc})", "Fix or remove this line") from None
        if not header_seen:
            if [c.strip() for c in row] != INTERACTIONS_HEADER:
                raise DataFormatError(file, number, f"header is {row}, expected {INTERACTIONS_HEADER}",
                                      "Write the header line user_id,item_id,timestamp")
            header_seen = True
            continue
        if len(row) == 2:
            row.append("")  # timestamp is optional
        if len(row) != 3 or not row[0] or not row[1]:
            raise DataFormatError(file, number, f"expected user_id,item_id,timestamp, got {text!r}",
                                  "Fix or remove this line")
        user, item, stamp = row
        if item not in known:
            raise DataFormatError(file, number, f"unknown item id {item!r} (not in {ITEMS_FILE})",
                                  f"Add the item to {ITEMS_FILE} or drop the interaction")
        if user != current:
            if user in sequences:
                raise DataFormatError(file, number, f"rows of user {user!r} are not contiguous",
                                      "Group rows by user, chronological within each user")
            current, last_time = user, None
            sequences[user] = []
        when = _parse_time(stamp, file, number) if stamp else None
        if when is not None and last_time is not None and when < last_time:
            raise DataFormatError(file, number, f"timestamp {stamp} goes back in time for user {user!r}",
                                  "Sort each user's rows chronologically")
        if when is not None:
            last_time = when
        sequences[user].append(item)
    if not header_seen:
        raise DataFormatError(file, None, "empty file", "Write the header user_id,item_id,timestamp and the rows")
    return sequences


@dataclass
class DatasetStats:
    users: int
    items: int
    interactions: int
    sparsity: float
    mean_sequence_length: float
    tail_user_share: float
    tail_item_share: float
    tail_user_threshold: int
    tail_item_threshold: int

    def as_dict(self) -> dict:
        return asdict(self)


def item_popularity(sequences: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Number of distinct users who interacted with each item."""
    popularity: dict[str, int] = {}
    for seq in sequences.values():
        for item in set(seq):
            popularity[item] = popularity.get(item, 0) + 1
    return popularity


def compute_stats(items: Sequence[Mapping], sequences: Mapping[str, Sequence[str]],
                  tail_user_threshold: int = 10, tail_item_threshold: int = 20) -> DatasetStats:
    """Tail users: sequence length < tail_user_threshold. Tail items: < tail_item_threshold distinct users
    (items nobody interacted with count as tail). Sparsity = 1 - interactions / (users * items)."""
    n_users, n_items = len(sequences), len(items)
    n_inter = sum(len(s) for s in sequences.values())
    popularity = item_popularity(sequences)
    tail_items = sum(1 for it in items if popularity.get(it["item_id"], 0) < tail_item_threshold)
    tail_users = sum(1 for s in sequences.values() if len(s) < tail_user_threshold)
    cells = n_users * n_items
    return DatasetStats(
        users=n_users, items=n_items, interactions=n_inter,
        sparsity=1.0 - n_inter / cells if cells else 1.0,
        mean_sequence_length=n_inter / n_users if n_users else 0.0,
        tail_user_share=tail_users / n_users if n_users else 0.0,
        tail_item_share=tail_items / n_items if n_items else 0.0,
        tail_user_threshold=tail_user_threshold, tail_item_threshold=tail_item_threshold,
    )


def render_stats_table(stats: DatasetStats, title: str | None = None) -> str:
    """Plain-text two-column table of the statistics (what `reaemb data stats` prints)."""
    rows = [
        ("users", f"{stats.users:,}"),
        ("items", f"{stats.items:,}"),
        ("interactions", f"{stats.interactions:,}"),
        ("sparsity", f"{stats.sparsity:.4%}"),
        ("mean sequence length", f"{stats.mean_sequence_length:.2f}"),
        (f"tail users (history < {stats.tail_user_threshold})", f"{stats.tail_user_share:.2%}"),
        (f"tail items (< {stats.tail_item_threshold} users)", f"{stats.tail_item_share:.2%}"),
    ]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "-" * (width + vwidth + 3)
    out = io.StringIO()
    if title:
        out.write(title + "\n")
    out.write(rule + "\n")
    for key, value in rows:
        out.write(f"{key:<{width}} | {value:>{vwidth}}\n")
    out.write(rule + "\n")
    return out.getvalue()


@dataclass
class RecDataset:
    """A catalogue (ordered items) and chronological user sequences of item ids."""

    items: list[dict]
    sequences: dict[str, list[str]]
    source_format: str = "canonical"
    timestamps: dict[str, list] | None = field(default=None, repr=False)

    @property
    def item_ids(self) -> list[str]:
        return [it["item_id"] for it in self.items]

    def stats(self, tail_user_threshold: int = 10, tail_item_threshold: int = 20) -> DatasetStats:
        return compute_stats(self.items, self.sequences, tail_user_threshold, tail_item_threshold)

    @classmethod
    def load(cls, folder: str | Path) -> "RecDataset":
        items = read_items(folder)
        sequences = load_interactions(folder, [it["item_id"] for it in items])
        meta_path = Path(folder) / META_FILE
        source = "canonical"
        if meta_path.is_file():
            try:
                source = json.loads(meta_path.read_text(encoding="utf-8")).get("source_format", source)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # meta.json is informative only; a broken one must not block loading
        return cls(items=items, sequences=sequences, source_format=source)

    def save(self, folder: str | Path) -> Path:
        return write_dataset(folder, self.items, self.sequences, self.source_format, timestamps=self.timestamps)


def print_stats(folder: str | Path, tail_user_threshold: int = 10, tail_item_threshold: int = 20) -> DatasetStats:
    stats = RecDataset.load(folder).stats(tail_user_threshold, tail_item_threshold)
    print(render_stats_table(stats, title=str(folder)))
    return stats


def _format_time(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # unix seconds read as floats: write 874965758, not 874965758.0
    return str(value)


def _validate_for_write(items: Sequence[Mapping], sequences: Mapping[str, Sequence[str]], timestamps) -> None:
    seen: set[str] = set()
    for index, item in enumerate(items):
        item_id = item.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"item #{index} has no string item_id: {item!r}")
        if id_problem(item_id):
            raise ValueError(f"item id {item_id!r} (item #{index}) {id_problem(item_id)}")
        if item_id in seen:
            raise ValueError(f"duplicate item_id {item_id!r} (item #{index})")
        if not item_has_text(item):
            raise ValueError(f"item {item_id!r} (item #{index}) has no text")
        seen.add(item_id)
    for user, seq in sequences.items():
        if not str(user):
            raise ValueError("empty user id")
        if id_problem(str(user)):
            raise ValueError(f"user id {user!r} {id_problem(str(user))}")
        for item in seq:
            if item not in seen:
                raise ValueError(f"user {user!r} interacts with unknown item {item!r}")
        if timestamps is not None and len(timestamps.get(user, seq)) != len(seq):
            raise ValueError(f"user {user!r}: {len(timestamps[user])} timestamps for {len(seq)} items")


def write_dataset(folder: str | Path, items: Sequence[Mapping], user_sequences: Mapping[str, Sequence[str]],
                  source_format: str, timestamps: Mapping[str, Sequence] | None = None,
                  extra_meta: Mapping | None = None) -> Path:
    """Write the canonical folder atomically: build it in a temp dir next to the target, then rename.

    An existing target is replaced only if it is empty or already a canonical folder (holds items.jsonl),
    so a typo in --output cannot wipe an unrelated directory.
    """
    folder = Path(folder)
    _validate_for_write(items, user_sequences, timestamps)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / ITEMS_FILE).exists())):
        raise FileExistsError(f"{folder} exists and is not a canonical dataset folder; choose another --output")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Named before the `try` and created inside it: no interrupt can land between creating and cleaning up.
    token = secrets.token_hex(6)
    tmp, backup = folder.parent / f".{folder.name}.tmp-{token}", folder.parent / f".{folder.name}.old-{token}"
    try:
        tmp.mkdir()  # mode 0o777 minus the umask: normal permissions
        with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as handle:
            for item in items:
                record = {"item_id": item["item_id"],
                          "attributes": [{"key": str(a["key"]), "value": str(a["value"])} for a in item["attributes"]]}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        with open(tmp / INTERACTIONS_FILE, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(INTERACTIONS_HEADER)
            for user, seq in user_sequences.items():
                stamps = timestamps.get(user) if timestamps else None
                for pos, item in enumerate(seq):
                    stamp = "" if stamps is None else _format_time(stamps[pos])
                    writer.writerow([user, item, stamp])
        stats = compute_stats(items, user_sequences)
        meta = {"source_format": source_format, "stats": stats.as_dict(), **(extra_meta or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            os.rename(folder, backup)
        os.rename(tmp, folder)
    finally:  # on success, on any exception, KeyboardInterrupt (and SIGTERM turned into one) included
        if backup.exists() and not folder.exists():
            os.rename(backup, folder)  # stopped between the two renames: put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
    return folder
