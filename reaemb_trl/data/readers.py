"""Readers: each public-dataset format -> RecDataset (then `convert` writes the canonical folder).

Every error is a DataFormatError naming the file, the line and the fix. By default readers are strict:
an interaction with an unknown item, or with an item that has no text, stops the conversion. With
``strict=False`` such interactions are dropped and counted (`RecDataset` then excludes them).
"""

from __future__ import annotations

import ast
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from reaemb_trl.data.canonical import RecDataset, item_has_text, make_item
from reaemb_trl.data.errors import DataFormatError, iter_text_lines

LENIENT_HINT = "or convert with --lenient to drop such interactions"


class _Builder:
    """Collects items and timestamped interactions, checking ids as they arrive."""

    def __init__(self, strict: bool = True, catalogue_given: bool = True):
        # catalogue_given: the item file *is* the catalogue (check every item's text at once); for raw
        # dumps (Amazon, Yelp) with millions of never-used items, only items someone interacted with matter.
        self.strict, self.catalogue_given = strict, catalogue_given
        self.items: dict[str, dict] = {}
        self.textless: dict[str, tuple[str, int]] = {}
        self.events: dict[str, list[tuple]] = {}
        self.dropped = 0

    def add_item(self, item: dict, file, line: int, duplicates_ok: bool = False) -> None:
        item_id = item["item_id"]
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
        if not user:
            raise DataFormatError(file, line, "empty user id", "Fix or remove this line")
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

    def build(self, source_format: str, sort_by_time: bool = True) -> RecDataset:
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


# ---------- small helpers ----------

def _find(path: str | Path, patterns: list[str], what: str) -> Path:
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


def _records(file: Path, literal: bool = False) -> Iterator[tuple[int, dict]]:
    for line, text in iter_text_lines(file):
        if text.strip():
            yield line, _parse_record(text, file, line, literal)


def _field(record: dict, key: str, file, line: int):
    value = record.get(key)
    if value is None or value == "":
        raise DataFormatError(file, line, f"missing field {key!r}", "Fix or remove this line")
    return value


def _flat(value) -> str:
    """Lists (Amazon categories/features/description) become one comma-joined string, duplicates removed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        parts: list[str] = []
        for v in value:
            text = _flat(v)
            if text and text not in parts:
                parts.append(text)
        return ", ".join(parts)
    return re.sub(r"\s+", " ", str(value)).strip()


def _whole_json(file: Path):
    """Load a whole-file JSON document, turning decode errors into file+line errors."""
    if not file.is_file():
        raise DataFormatError(file, None, "file not found", "Check the path")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(file, raw[: exc.start].count(b"\n") + 1, "not valid UTF-8 text",
                              "Re-encode the file as UTF-8") from None
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise DataFormatError(file, exc.lineno, f"broken JSON ({exc.msg})", "Fix the file") from None


def _line_of(text: str, needle: str) -> int | None:
    """Line of the first occurrence of `needle` (to point whole-file JSON errors at a line)."""
    at = text.find(needle)
    return None if at < 0 else text.count("\n", 0, at) + 1


def _number(value: str, file, line: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(file, line, f"{what} {value!r} is not a number", "Fix or remove this line") from None


# ---------- formats ----------

def read_handled(path: str | Path, strict: bool = True) -> RecDataset:
    """Authors' format: `inter.txt` ("user item" per line, chronological) + `item_info.jsonline`
    ({"input": "<instruction>\\n key is value; key is value", "item_id": ..., "item": ...})."""
    folder = Path(path)
    inter, info = folder / "inter.txt", folder / "item_info.jsonline"
    b = _Builder(strict)
    for line, rec in _records(info):
        item_id = rec.get("item_id", rec.get("item"))
        if item_id is None or item_id == "":
            raise DataFormatError(info, line, "missing item_id (and item)", "Give every line its item id")
        text = rec.get("input")
        if not isinstance(text, str):
            raise DataFormatError(info, line, "missing 'input' text", "Give every line its 'input' prompt")
        body = text.split("\n", 1)[1] if "\n" in text else text  # first line is the instruction
        pairs = []
        for part in body.split("; "):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition(" is ")
            if not sep:
                raise DataFormatError(info, line, f"attribute {part[:60]!r} is not 'key is value'",
                                      "Write attributes as 'key is value' joined by '; '")
            pairs.append((key.strip(), value))
        b.add_item(make_item(item_id, pairs), info, line)
    for line, text in iter_text_lines(inter):
        if not text.strip():
            continue
        fields = text.split()
        if len(fields) != 2:
            raise DataFormatError(inter, line, f"expected 'user item', got {text!r}", "Fix or remove this line")
        b.add_event(fields[0], fields[1], None, inter, line)
    return b.build("handled", sort_by_time=False)


def _lcrec_files(path: Path) -> tuple[Path, Path]:
    if path.is_file() and path.name.endswith(".inter.json"):
        return path, path.with_name(path.name[: -len(".inter.json")] + ".item.json")
    inter = _find(path, ["*.inter.json"], "LC-Rec interaction file (X.inter.json)")
    return inter, inter.with_name(inter.name[: -len(".inter.json")] + ".item.json")


def read_lcrec(path: str | Path, strict: bool = True) -> RecDataset:
    """LC-Rec / LETTER: `X.inter.json` {user: [items]} and `X.item.json` {item: {title, description, ...}}."""
    inter, item_file = _lcrec_files(Path(path))
    item_data, item_text = _whole_json(item_file)
    if not isinstance(item_data, dict):
        raise DataFormatError(item_file, 1, "expected an object {item_id: {...}}", "Check the file")
    b = _Builder(strict)
    keys = list(item_data)
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)  # 0-based integer ids: catalogue order = id order
    for key in keys:
        info = item_data[key]
        line = _line_of(item_text, json.dumps(key)) or 1
        if not isinstance(info, dict):
            raise DataFormatError(item_file, line, f"item {key!r} is not an object", "Check the file")
        pairs = [(k, _flat(info.get(k))) for k in ("title", "description", "brand", "categories")]
        pairs += [(k, _flat(v)) for k, v in info.items() if k not in ("title", "description", "brand", "categories")]
        b.add_item(make_item(key, pairs), item_file, line)
    seqs, inter_text = _whole_json(inter)
    if not isinstance(seqs, dict):
        raise DataFormatError(inter, 1, "expected an object {user: [items]}", "Check the file")
    for user, items in seqs.items():
        line = _line_of(inter_text, json.dumps(user)) or 1
        if not isinstance(items, list):
            raise DataFormatError(inter, line, f"user {user!r}: expected a list of items", "Check the file")
        for item in items:
            b.add_event(str(user), str(item), None, inter, line)
    return b.build("lcrec", sort_by_time=False)


# RecBole ml-* field names -> the attribute keys the prompt uses (title, year, genres; docs/method.md,
# "The item prompt").
_RECBOLE_KEYS = {"movie_title": "title", "release_year": "year", "class": "genres"}


def _atomic_rows(file: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a RecBole atomic file as {field_name_without_type: value}."""
    names = None
    for line, text in iter_text_lines(file):
        if names is None:
            names = [c.split(":", 1)[0].strip() for c in text.split("\t")]
            continue
        if not text.strip():
            continue
        cols = text.split("\t")
        if len(cols) != len(names):
            raise DataFormatError(file, line, f"{len(cols)} tab-separated fields, header has {len(names)}",
                                  "Fix or remove this line")
        yield line, dict(zip(names, cols))


def read_recbole(path: str | Path, strict: bool = True) -> RecDataset:
    """RecBole atomic files `X.inter` (user_id, item_id, [timestamp]) and `X.item` (item_id + text fields)."""
    path = Path(path)
    inter = path if path.suffix == ".inter" else _find(path, ["*.inter"], "RecBole .inter file")
    item_file = inter.with_suffix(".item")
    b = _Builder(strict)
    for line, row in _atomic_rows(item_file):
        if "item_id" not in row:
            raise DataFormatError(item_file, 1, "header has no item_id field", "Use RecBole's item_id:token")
        pairs = [(_RECBOLE_KEYS.get(k, k.replace("_", " ")), v) for k, v in row.items() if k != "item_id"]
        b.add_item(make_item(row["item_id"], pairs), item_file, line)
    for line, row in _atomic_rows(inter):
        if "user_id" not in row or "item_id" not in row:
            raise DataFormatError(inter, 1, "header needs user_id and item_id", "Use RecBole's typed header")
        stamp = row.get("timestamp")
        when = _number(stamp, inter, line, "timestamp") if stamp not in (None, "") else None
        b.add_event(row["user_id"], row["item_id"], when, inter, line)
    return b.build("recbole")


_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                  "Thriller", "War", "Western"]


def read_movielens(path: str | Path, strict: bool = True) -> RecDataset:
    """Raw MovieLens: ml-100k (`u.data` + `u.item`, '|' separated, latin-1) or ml-1m (`ratings.dat` +
    `movies.dat`, '::' separated, latin-1). Attributes: title, year, genres."""
    folder = Path(path)
    b = _Builder(strict)
    if (folder / "u.data").is_file():
        item_file, inter, sep = folder / "u.item", folder / "u.data", "\t"
        genres = list(_ML100K_GENRES)
        if (folder / "u.genre").is_file():
            genres = [t.split("|")[0] for _, t in iter_text_lines(folder / "u.genre", "latin-1") if t.strip()]
        for line, text in iter_text_lines(item_file, "latin-1"):
            if not text.strip():
                continue
            cols = text.split("|")
            if len(cols) < 5 + len(genres):
                raise DataFormatError(item_file, line, f"expected {5 + len(genres)} '|' fields, got {len(cols)}",
                                      "Fix or remove this line")
            flags = cols[5:5 + len(genres)]
            names = [g for g, f in zip(genres, flags) if f.strip() == "1"]
            year = cols[2].strip()[-4:]
            b.add_item(make_item(cols[0], [("title", cols[1]), ("year", year), ("genres", ", ".join(names))]),
                       item_file, line)
    elif (folder / "ratings.dat").is_file():
        item_file, inter, sep = folder / "movies.dat", folder / "ratings.dat", "::"
        for line, text in iter_text_lines(item_file, "latin-1"):
            if not text.strip():
                continue
            cols = text.split("::")
            if len(cols) != 3:
                raise DataFormatError(item_file, line, "expected MovieID::Title::Genres", "Fix or remove this line")
            match = re.search(r"\((\d{4})\)\s*$", cols[1])
            b.add_item(make_item(cols[0], [("title", cols[1]), ("year", match.group(1) if match else ""),
                                           ("genres", cols[2].replace("|", ", "))]), item_file, line)
    else:
        raise DataFormatError(folder, None, "no u.data (ml-100k) or ratings.dat (ml-1m) found",
                              "Pass the unpacked MovieLens folder")
    for line, text in iter_text_lines(inter, "latin-1"):
        if not text.strip():
            continue
        cols = text.split(sep)
        if len(cols) != 4:
            raise DataFormatError(inter, line, "expected user, item, rating, timestamp", "Fix or remove this line")
        b.add_event(cols[0], cols[1], _number(cols[3], inter, line, "timestamp"), inter, line)
    return b.build("movielens")


def _amazon_files(path: Path) -> tuple[Path, Path]:
    meta = _find(path, ["meta*.json", "meta*.json.gz", "meta*.jsonl", "meta*.jsonl.gz"], "metadata file (meta_*)")
    candidates = [p for pattern in ("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz") for p in path.glob(pattern)
                  if p.is_file() and not p.name.startswith("meta")]
    if len(candidates) != 1:
        raise DataFormatError(path, None, f"expected one review file besides {meta.name}, found "
                              f"{sorted(p.name for p in candidates)}", "Keep exactly one review file in the folder")
    return candidates[0], meta


def _read_amazon_old(path: str | Path, strict: bool, version: str) -> RecDataset:
    reviews, meta = _amazon_files(Path(path))
    b = _Builder(strict, catalogue_given=False)
    for line, rec in _records(meta, literal=True):
        asin = _field(rec, "asin", meta, line)
        if version == "amazon2014":
            pairs = [("title", rec.get("title")), ("categories", _flat(rec.get("categories"))),
                     ("brand", rec.get("brand")), ("price", rec.get("price")),
                     ("description", _flat(rec.get("description")))]
        else:
            pairs = [("title", rec.get("title")), ("categories", _flat(rec.get("category"))),
                     ("brand", rec.get("brand")), ("price", rec.get("price")),
                     ("features", _flat(rec.get("feature"))), ("description", _flat(rec.get("description")))]
        b.add_item(make_item(asin, [(k, _flat(v)) for k, v in pairs]), meta, line, duplicates_ok=True)
    seen = set()
    for line, rec in _records(reviews, literal=True):
        user, item = _field(rec, "reviewerID", reviews, line), _field(rec, "asin", reviews, line)
        when = _number(str(_field(rec, "unixReviewTime", reviews, line)), reviews, line, "unixReviewTime")
        if (user, item, when) in seen:
            continue  # the dumps contain exact duplicate reviews
        seen.add((user, item, when))
        b.add_event(str(user), str(item), when, reviews, line)
    return b.build(version)


def read_amazon2014(path: str | Path, strict: bool = True) -> RecDataset:
    """Amazon 2014: 5-core reviews (JSON lines) + metadata (Python-literal dicts) in one folder."""
    return _read_amazon_old(path, strict, "amazon2014")


def read_amazon2018(path: str | Path, strict: bool = True) -> RecDataset:
    """Amazon 2018: 5-core reviews (JSON lines) + metadata (JSON lines) in one folder."""
    return _read_amazon_old(path, strict, "amazon2018")


def read_amazon2023(path: str | Path, strict: bool = True) -> RecDataset:
    """Amazon 2023: reviews jsonl (user_id, parent_asin, timestamp ms) + meta jsonl (parent_asin, title, ...)."""
    reviews, meta = _amazon_files(Path(path))
    b = _Builder(strict, catalogue_given=False)
    for line, rec in _records(meta):
        asin = _field(rec, "parent_asin", meta, line)
        price = rec.get("price")
        pairs = [("title", rec.get("title")),
                 ("categories", _flat(rec.get("categories")) or _flat(rec.get("main_category"))),
                 ("brand", rec.get("store")), ("price", None if price in (None, "None") else price),
                 ("features", _flat(rec.get("features"))), ("description", _flat(rec.get("description")))]
        b.add_item(make_item(asin, [(k, _flat(v)) for k, v in pairs]), meta, line, duplicates_ok=True)
    seen = set()
    for line, rec in _records(reviews):
        user, item = _field(rec, "user_id", reviews, line), _field(rec, "parent_asin", reviews, line)
        when = _number(str(_field(rec, "timestamp", reviews, line)), reviews, line, "timestamp")
        if (user, item, when) in seen:
            continue
        seen.add((user, item, when))
        b.add_event(str(user), str(item), when, reviews, line)
    return b.build("amazon2023")


def read_yelp(path: str | Path, strict: bool = True) -> RecDataset:
    """Yelp Open Dataset: business JSON lines (name, categories, city, stars) + review JSON lines."""
    folder = Path(path)
    business = _find(folder, ["*business.json", "*business*.json"], "Yelp business file")
    reviews = _find(folder, ["*review.json", "*review*.json"], "Yelp review file")
    b = _Builder(strict, catalogue_given=False)
    for line, rec in _records(business):
        pairs = [("name", rec.get("name")), ("categories", rec.get("categories")), ("city", rec.get("city")),
                 ("stars", rec.get("stars"))]
        b.add_item(make_item(_field(rec, "business_id", business, line), [(k, _flat(v)) for k, v in pairs]),
                   business, line)
    for line, rec in _records(reviews):
        date = str(_field(rec, "date", reviews, line))
        try:
            when = datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise DataFormatError(reviews, line, f"date {date!r} is not 'YYYY-MM-DD HH:MM:SS'",
                                  "Fix or remove this line") from None
        b.add_event(str(_field(rec, "user_id", reviews, line)), str(_field(rec, "business_id", reviews, line)),
                    when, reviews, line)
    return b.build("yelp")


READERS: dict[str, Callable[..., RecDataset]] = {
    "handled": read_handled,
    "lcrec": read_lcrec,
    "recbole": read_recbole,
    "movielens": read_movielens,
    "amazon2014": read_amazon2014,
    "amazon2018": read_amazon2018,
    "amazon2023": read_amazon2023,
    "yelp": read_yelp,
}


def read_dataset(fmt: str, path: str | Path, strict: bool = True) -> RecDataset:
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    return READERS[fmt](path, strict=strict)


def convert(fmt: str, input_path: str | Path, output: str | Path, kcore: int = 0,
            remap_ids: bool = False, strict: bool = True) -> RecDataset:
    """Read `input_path` in format `fmt`, optionally k-core filter and remap ids, write the canonical folder."""
    from reaemb_trl.data.filtering import kcore as kcore_filter, remap_ids as remap

    dataset = read_dataset(fmt, input_path, strict=strict)
    if kcore and kcore > 1:
        dataset = kcore_filter(dataset, kcore)
        if not dataset.sequences:
            raise ValueError(f"{kcore}-core filtering left no users; use a smaller --kcore")
    extra: dict = {"kcore": kcore or 0, "remapped_ids": bool(remap_ids)}
    if remap_ids:
        dataset, maps = remap(dataset)
        extra["id_map"] = maps  # new id -> original id, so results can be traced back
    from reaemb_trl.data.canonical import write_dataset

    write_dataset(output, dataset.items, dataset.sequences, fmt, timestamps=dataset.timestamps, extra_meta=extra)
    return dataset
