"""What every reader shares: a collector that checks items and interactions as they arrive, and the parsing helpers
(files in a folder, JSON records per line, whole-file JSON with the line of each key, finite numbers), each error a
DataFormatError naming the file and the line."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Iterator

from reaemb_trl.data.canonical import RecDataset, id_problem, item_has_text
from reaemb_trl.data.errors import DataFormatError, iter_text_lines

LENIENT_HINT = "or convert with --lenient to drop such interactions"


class DatasetCollector:
    """Collects items and timestamped interactions, checking ids as they arrive; counts them on `bar` (a tqdm bar,
    or None)."""

    def __init__(self, source_format: str, strict: bool = True, catalogue_given: bool = True, bar=None):
        # catalogue_given: the item file *is* the catalogue (check every item's text at once); for raw
        # dumps (Amazon, Yelp) with millions of never-used items, only items someone interacted with matter.
        self.source_format, self.strict, self.catalogue_given = source_format, strict, catalogue_given
        self.items: dict[str, dict] = {}
        self.textless: dict[str, tuple[str, int]] = {}
        self.events: dict[str, list[tuple]] = {}
        self.reviews: set[tuple] = set()
        self.dropped = 0
        self.bar = bar
        self.unreported = 0  # events not yet counted on the bar (updating it per event costs more than reading)

    def add_item(self, item: dict, file, line: int, duplicates_ok: bool = False) -> None:
        item_id = item["item_id"]
        problem = id_problem(item_id)
        if problem:
            raise DataFormatError(file, line, f"item id {item_id!r} {problem}", "Fix the id or remove the record")
        if item_id in self.items or item_id in self.textless:
            if duplicates_ok:
                return  # raw dumps repeat some records; the first one wins
            raise DataFormatError(file, line, f"duplicate item id {item_id!r}", "Remove the repeated record")
        if not item_has_text(item):
            if self.catalogue_given and self.strict:
                raise DataFormatError(file, line, f"item {item_id!r} has no text (no non-empty attribute)",
                                      f"Fill in its title or other attributes, {LENIENT_HINT}")
            self.textless[item_id] = (str(file), line)
            return
        self.items[item_id] = item

    def add_event(self, user: str, item: str, time, file, line: int) -> None:
        if user not in self.events:  # a new user: check the id once
            if not user:
                raise DataFormatError(file, line, "empty user id", "Fix or remove this line")
            problem = id_problem(user)
            if problem:
                raise DataFormatError(file, line, f"user id {user!r} {problem}", "Fix the id or remove the line")
        self.unreported += 1
        if self.unreported >= 65536:
            self._report()
        if item not in self.items:
            if self.strict:
                if item in self.textless:
                    src, src_line = self.textless[item]
                    raise DataFormatError(src, src_line, f"item {item!r} has no text but users interact with it "
                                          f"(e.g. {Path(file).name} line {line})",
                                          f"Fill in its attributes, {LENIENT_HINT}")
                raise DataFormatError(file, line, f"unknown item id {item!r} (no such item in the item file)",
                                      f"Add the item or remove the line, {LENIENT_HINT}")
            self.dropped += 1
            return
        seq = self.events.setdefault(user, [])
        seq.append((time, len(seq), item))

    def add_review(self, user: str, item: str, time, file, line: int) -> None:
        """An interaction of a raw review dump, whose exact duplicates (same user, item and time) are dropped."""
        if (user, item, time) in self.reviews:
            return
        self.reviews.add((user, item, time))
        self.add_event(user, item, time, file, line)

    def _report(self) -> None:
        if self.bar is not None:
            self.bar.update(self.unreported)
        self.unreported = 0

    def build(self, sort_by_time: bool = True) -> RecDataset:
        self._report()
        source_format = self.source_format
        sequences, timestamps, used = {}, {}, set()
        for user, events in self.events.items():
            if sort_by_time and all(e[0] is not None for e in events):
                events = sorted(events, key=lambda e: (e[0], e[1]))  # stable: ties keep file order
            sequences[user] = [e[2] for e in events]
            timestamps[user] = [e[0] for e in events]
            used.update(sequences[user])
        items = list(self.items.values())
        if not self.catalogue_given:
            items = [it for it in items if it["item_id"] in used]
        if not items or not sequences:
            raise DataFormatError(source_format, None, "no usable items or interactions were read",
                                  "Check the input folder and --format")
        if self.dropped:
            print(f"[{source_format}] dropped {self.dropped:,} interactions with unknown or text-less items")
        return RecDataset(items=items, sequences=sequences, source_format=source_format, timestamps=timestamps)


# ---------- parsing helpers ----------

def find_file(path: str | Path, patterns: list[str], what: str) -> Path:
    """Return the one file in folder `path` matching any glob in `patterns` (first pattern that matches)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataFormatError(folder, None, "input must be a folder", f"Pass the folder holding the {what}")
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataFormatError(folder, None, f"several candidate {what}: {[h.name for h in hits]}",
                                  "Keep only one in the folder")
    raise DataFormatError(folder, None, f"no {what} found (looked for {patterns})", "Check the folder and --format")


def _parse_record(text: str, file, line: int, literal: bool) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        if not literal:
            raise DataFormatError(file, line, f"broken JSON ({exc.msg})", "Fix or remove this line") from None
        try:  # Amazon 2014 metadata is Python dict literals, not JSON
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc2:
            raise DataFormatError(file, line, f"neither JSON nor a Python literal ({exc2})",
                                  "Fix or remove this line") from None
    if not isinstance(record, dict):
        raise DataFormatError(file, line, "expected an object per line", "Fix or remove this line")
    return record


def json_records(file: Path, literal: bool = False) -> Iterator[tuple[int, dict]]:
    for line, text in iter_text_lines(file):
        if text.strip():
            yield line, _parse_record(text, file, line, literal)


def required_field(record: dict, key: str, file, line: int):
    value = record.get(key)
    if value is None or value == "":
        raise DataFormatError(file, line, f"missing field {key!r}", "Fix or remove this line")
    return value


def flat_text(value) -> str:
    """Lists (Amazon categories/features/description) become one comma-joined string, duplicates removed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        parts: list[str] = []
        for v in value:
            text = flat_text(v)
            if text and text not in parts:
                parts.append(text)
        return ", ".join(parts)
    return re.sub(r"\s+", " ", str(value)).strip()


def whole_json(file: Path) -> tuple[object, dict[str, int]]:
    """Load a whole-file JSON document and the line of each top-level key (when it is an object), turning decode
    errors into file+line errors."""
    if not file.is_file():
        raise DataFormatError(file, None, "file not found", "Check the path")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(file, raw[: exc.start].count(b"\n") + 1, "not valid UTF-8 text",
                              "Re-encode the file as UTF-8") from None
    try:
        return _object_with_lines(text)
    except (ValueError, IndexError):
        pass  # not an object, or broken: the decoder names the problem and its line
    try:
        return json.loads(text), {}
    except json.JSONDecodeError as exc:
        raise DataFormatError(file, exc.lineno, f"broken JSON ({exc.msg})", "Fix the file") from None


_SPACE = re.compile(r"[ \t\n\r]*")


def _object_with_lines(text: str) -> tuple[dict, dict[str, int]]:
    """A top-level JSON object and the line of each key's first occurrence, in one pass: lines are counted
    between consecutive keys only, so the whole text is scanned once (ValueError/IndexError if not an object)."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text).end()
    if text[pos] != "{":
        raise ValueError("not an object")
    data: dict = {}
    lines: dict[str, int] = {}
    line, counted = 1, 0
    pos = _SPACE.match(text, pos + 1).end()
    if text[pos] == "}":
        pos += 1
    else:
        while True:
            if text[pos] != '"':
                raise ValueError("expected a key")
            line += text.count("\n", counted, pos)
            counted = pos
            key, pos = json.decoder.scanstring(text, pos + 1)
            lines.setdefault(key, line)
            pos = _SPACE.match(text, pos).end()
            if text[pos] != ":":
                raise ValueError("expected ':'")
            data[key], pos = decoder.raw_decode(text, _SPACE.match(text, pos + 1).end())
            pos = _SPACE.match(text, pos).end()
            if text[pos] == "}":
                pos += 1
                break
            if text[pos] != ",":
                raise ValueError("expected ',' or '}'")
            pos = _SPACE.match(text, pos + 1).end()
    if _SPACE.match(text, pos).end() != len(text):
        raise ValueError("extra data")
    return data, lines


def finite_number(value: str, file, line: int, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DataFormatError(file, line, f"{what} {value!r} is not a number", "Fix or remove this line") from None
    if not math.isfinite(number):
        raise DataFormatError(file, line, f"{what} {value!r} is not a finite number", "Fix or remove this line")
    return number
