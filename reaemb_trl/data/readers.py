"""Readers: each public-dataset format -> RecDataset (then `convert` writes the canonical folder).

Every error is a DataFormatError naming the file, the line and the fix. By default readers are strict:
an interaction with an unknown item, or with an item that has no text, stops the conversion. With
``strict=False`` such interactions are dropped and counted (`RecDataset` then excludes them). Ids must survive the
canonical folder (`canonical.id_problem`); timestamps must be finite numbers. Raw dumps (Amazon, Yelp) drop exact
duplicate reviews and repeated metadata records (first wins), as docs/data.md says.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from reaemb_trl.data.canonical import RecDataset, make_item
from reaemb_trl.data.errors import DataFormatError, iter_text_lines
from reaemb_trl.data.parsing import (
    DatasetCollector, find_file, finite_number, flat_text, json_records, required_field, whole_json,
)

# ---------- formats ----------

def read_handled(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Authors' format: `inter.txt` ("user item" per line, chronological) + `item_info.jsonline`
    ({"input": "<instruction>\\n key is value; key is value", "item_id": ..., "item": ...})."""
    folder = Path(path)
    inter, info = folder / "inter.txt", folder / "item_info.jsonline"
    b = DatasetCollector("handled", strict, bar=bar)
    for line, rec in json_records(info):
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
    return b.build(sort_by_time=False)


def _lcrec_files(path: Path) -> tuple[Path, Path]:
    if path.is_file() and path.name.endswith(".inter.json"):
        return path, path.with_name(path.name[: -len(".inter.json")] + ".item.json")
    inter = find_file(path, ["*.inter.json"], "LC-Rec interaction file (X.inter.json)")
    return inter, inter.with_name(inter.name[: -len(".inter.json")] + ".item.json")


def read_lcrec(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """LC-Rec / LETTER: `X.inter.json` {user: [items]} and `X.item.json` {item: {title, description, ...}}."""
    inter, item_file = _lcrec_files(Path(path))
    item_data, item_lines = whole_json(item_file)
    if not isinstance(item_data, dict):
        raise DataFormatError(item_file, 1, "expected an object {item_id: {...}}", "Check the file")
    b = DatasetCollector("lcrec", strict, bar=bar)
    keys = list(item_data)
    if all(k.isdigit() for k in keys):  # 0-based integer ids: catalogue order = id order
        for key in keys:
            if not key.isascii():  # a digit int() does not read, such as '²'
                raise DataFormatError(item_file, item_lines.get(key, 1), f"item key {key!r} is not an integer, unlike "
                                      "the other keys", "Write LC-Rec item ids as 0-based integers")
        keys.sort(key=int)
    for key in keys:
        info = item_data[key]
        line = item_lines.get(key, 1)
        if not isinstance(info, dict):
            raise DataFormatError(item_file, line, f"item {key!r} is not an object", "Check the file")
        first = ("title", "description", "brand", "categories")
        pairs = [(k, flat_text(info.get(k))) for k in first]
        pairs += [(k, flat_text(v)) for k, v in info.items() if k not in first]
        b.add_item(make_item(key, pairs), item_file, line)
    seqs, user_lines = whole_json(inter)
    if not isinstance(seqs, dict):
        raise DataFormatError(inter, 1, "expected an object {user: [items]}", "Check the file")
    for user, items in seqs.items():
        line = user_lines.get(user, 1)
        if not isinstance(items, list):
            raise DataFormatError(inter, line, f"user {user!r}: expected a list of items", "Check the file")
        for item in items:
            b.add_event(str(user), str(item), None, inter, line)
    return b.build(sort_by_time=False)


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


def read_recbole(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """RecBole atomic files `X.inter` (user_id, item_id, [timestamp]) and `X.item` (item_id + text fields)."""
    path = Path(path)
    inter = path if path.suffix == ".inter" else find_file(path, ["*.inter"], "RecBole .inter file")
    item_file = inter.with_suffix(".item")
    b = DatasetCollector("recbole", strict, bar=bar)
    for line, row in _atomic_rows(item_file):
        if "item_id" not in row:
            raise DataFormatError(item_file, 1, "header has no item_id field", "Use RecBole's item_id:token")
        pairs = [(_RECBOLE_KEYS.get(k, k.replace("_", " ")), v) for k, v in row.items() if k != "item_id"]
        b.add_item(make_item(row["item_id"], pairs), item_file, line)
    for line, row in _atomic_rows(inter):
        if "user_id" not in row or "item_id" not in row:
            raise DataFormatError(inter, 1, "header needs user_id and item_id", "Use RecBole's typed header")
        stamp = row.get("timestamp")
        when = finite_number(stamp, inter, line, "timestamp") if stamp not in (None, "") else None
        b.add_event(row["user_id"], row["item_id"], when, inter, line)
    return b.build()


_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                  "Thriller", "War", "Western"]


def read_movielens(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Raw MovieLens: ml-100k (`u.data` + `u.item`, '|' separated, latin-1) or ml-1m (`ratings.dat` +
    `movies.dat`, '::' separated, latin-1). Attributes: title, year, genres."""
    folder = Path(path)
    b = DatasetCollector("movielens", strict, bar=bar)
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
        b.add_event(cols[0], cols[1], finite_number(cols[3], inter, line, "timestamp"), inter, line)
    return b.build()


def _amazon_files(path: Path) -> tuple[Path, Path]:
    meta = find_file(path, ["meta*.json", "meta*.json.gz", "meta*.jsonl", "meta*.jsonl.gz"], "metadata file (meta_*)")
    candidates = [p for pattern in ("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz") for p in path.glob(pattern)
                  if p.is_file() and not p.name.startswith("meta")]
    if len(candidates) != 1:
        raise DataFormatError(path, None, f"expected one review file besides {meta.name}, found "
                              f"{sorted(p.name for p in candidates)}", "Keep exactly one review file in the folder")
    return candidates[0], meta


def _read_amazon_old(path: str | Path, strict: bool, version: str, bar) -> RecDataset:
    reviews, meta = _amazon_files(Path(path))
    b = DatasetCollector(version, strict, catalogue_given=False, bar=bar)
    for line, rec in json_records(meta, literal=True):
        asin = required_field(rec, "asin", meta, line)
        if version == "amazon2014":
            pairs = [("title", rec.get("title")), ("categories", flat_text(rec.get("categories"))),
                     ("brand", rec.get("brand")), ("price", rec.get("price")),
                     ("description", flat_text(rec.get("description")))]
        else:
            pairs = [("title", rec.get("title")), ("categories", flat_text(rec.get("category"))),
                     ("brand", rec.get("brand")), ("price", rec.get("price")),
                     ("features", flat_text(rec.get("feature"))), ("description", flat_text(rec.get("description")))]
        b.add_item(make_item(asin, [(k, flat_text(v)) for k, v in pairs]), meta, line, duplicates_ok=True)
    for line, rec in json_records(reviews, literal=True):
        user, item = required_field(rec, "reviewerID", reviews, line), required_field(rec, "asin", reviews, line)
        when = finite_number(str(required_field(rec, "unixReviewTime", reviews, line)), reviews, line, "unixReviewTime")
        b.add_review(str(user), str(item), when, reviews, line)
    return b.build()


def read_amazon2014(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Amazon 2014: 5-core reviews (JSON lines) + metadata (Python-literal dicts) in one folder."""
    return _read_amazon_old(path, strict, "amazon2014", bar)


def read_amazon2018(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Amazon 2018: 5-core reviews (JSON lines) + metadata (JSON lines) in one folder."""
    return _read_amazon_old(path, strict, "amazon2018", bar)


def read_amazon2023(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Amazon 2023: reviews jsonl (user_id, parent_asin, timestamp ms) + meta jsonl (parent_asin, title, ...)."""
    reviews, meta = _amazon_files(Path(path))
    b = DatasetCollector("amazon2023", strict, catalogue_given=False, bar=bar)
    for line, rec in json_records(meta):
        asin = required_field(rec, "parent_asin", meta, line)
        price = rec.get("price")
        pairs = [("title", rec.get("title")),
                 ("categories", flat_text(rec.get("categories")) or flat_text(rec.get("main_category"))),
                 ("brand", rec.get("store")), ("price", None if price in (None, "None") else price),
                 ("features", flat_text(rec.get("features"))), ("description", flat_text(rec.get("description")))]
        b.add_item(make_item(asin, [(k, flat_text(v)) for k, v in pairs]), meta, line, duplicates_ok=True)
    for line, rec in json_records(reviews):
        user, item = required_field(rec, "user_id", reviews, line), required_field(rec, "parent_asin", reviews, line)
        when = finite_number(str(required_field(rec, "timestamp", reviews, line)), reviews, line, "timestamp")
        b.add_review(str(user), str(item), when, reviews, line)
    return b.build()


def read_yelp(path: str | Path, strict: bool = True, bar=None) -> RecDataset:
    """Yelp Open Dataset: business JSON lines (name, categories, city, stars) + review JSON lines."""
    folder = Path(path)
    business = find_file(folder, ["*business.json", "*business*.json"], "Yelp business file")
    reviews = find_file(folder, ["*review.json", "*review*.json"], "Yelp review file")
    b = DatasetCollector("yelp", strict, catalogue_given=False, bar=bar)
    for line, rec in json_records(business):
        pairs = [("name", rec.get("name")), ("categories", rec.get("categories")), ("city", rec.get("city")),
                 ("stars", rec.get("stars"))]
        business_id = required_field(rec, "business_id", business, line)
        b.add_item(make_item(business_id, [(k, flat_text(v)) for k, v in pairs]), business, line, duplicates_ok=True)
    for line, rec in json_records(reviews):
        date = str(required_field(rec, "date", reviews, line))
        try:
            when = datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise DataFormatError(reviews, line, f"date {date!r} is not 'YYYY-MM-DD HH:MM:SS'",
                                  "Fix or remove this line") from None
        user, item = required_field(rec, "user_id", reviews, line), required_field(rec, "business_id", reviews, line)
        b.add_review(str(user), str(item), when, reviews, line)
    return b.build()


PROGRESS_DELAY_S = 0.5  # a quick conversion (or a quick error) shows no bar

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


def read_dataset(fmt: str, path: str | Path, strict: bool = True, progress: bool = False) -> RecDataset:
    """Read `path` in format `fmt`; `progress` counts the interactions read on a bar (stderr, shown after
    PROGRESS_DELAY_S). Every reader takes that bar as `bar`."""
    from tqdm.auto import tqdm

    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    with tqdm(desc=f"reading {fmt}", unit=" interactions", unit_scale=True, file=sys.stderr, disable=not progress,
              delay=PROGRESS_DELAY_S, mininterval=0.5) as bar:
        return READERS[fmt](path, strict=strict, bar=bar)


def convert(fmt: str, input_path: str | Path, output: str | Path, kcore: int = 0,
            remap_ids: bool = False, strict: bool = True, progress: bool = False) -> RecDataset:
    """Read `input_path` in format `fmt`, optionally k-core filter and remap ids, write the canonical folder;
    `progress`: a bar of the interactions read."""
    from reaemb_trl.data.filtering import kcore as kcore_filter, remap_ids as remap

    if kcore < 0:
        raise ValueError(f"--kcore must be >= 0 (0: no filtering), got {kcore}")
    dataset = read_dataset(fmt, input_path, strict=strict, progress=progress)
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
