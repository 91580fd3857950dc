import gzip
import json

import pytest

from reaemb_trl.data import DataFormatError, RecDataset, convert, read_dataset


def _w(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def _attrs(ds, item_id):
    item = next(it for it in ds.items if it["item_id"] == item_id)
    return {a["key"]: a["value"] for a in item["attributes"]}


# ---------- handled ----------

def _handled(tmp_path, inter="1 1\n1 2\n2 2\n", extra=""):
    lines = [{"input": "The CD item has the following attributes: \n title is Abbey Road; brand is Apple",
              "target": "", "item": "B001", "item_id": 1},
             {"input": "The CD item has the following attributes: \n title is Kind of Blue; categories is Jazz, CD",
              "target": "", "item": "B002", "item_id": 2}]
    _w(tmp_path / "item_info.jsonline", "".join(json.dumps(x) + "\n" for x in lines) + extra)
    _w(tmp_path / "inter.txt", inter)
    return tmp_path


def test_handled(tmp_path):
    ds = read_dataset("handled", _handled(tmp_path))
    assert ds.item_ids == ["1", "2"]
    assert _attrs(ds, "1") == {"title": "Abbey Road", "brand": "Apple"}
    assert _attrs(ds, "2")["categories"] == "Jazz, CD"
    assert ds.sequences == {"1": ["1", "2"], "2": ["2"]}


def test_handled_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"inter.txt, line 2: unknown item id '7'"):
        read_dataset("handled", _handled(tmp_path / "a", inter="1 1\n1 7\n"))
    with pytest.raises(DataFormatError, match=r"inter.txt, line 1: expected 'user item'"):
        read_dataset("handled", _handled(tmp_path / "b", inter="1 1 5\n"))
    with pytest.raises(DataFormatError, match=r"item_info.jsonline, line 3: broken JSON"):
        read_dataset("handled", _handled(tmp_path / "c", extra='{"input": \n'))
    with pytest.raises(DataFormatError, match=r"item_info.jsonline, line 3: item '3' has no text"):
        read_dataset("handled", _handled(tmp_path / "d", extra='{"input": "instr\\n", "item_id": 3}\n'))
    # lenient mode drops the interaction with the unknown item instead
    ds = read_dataset("handled", _handled(tmp_path / "e", inter="1 1\n1 7\n"), strict=False)
    assert ds.sequences == {"1": ["1"]}


# ---------- lcrec ----------

def test_lcrec(tmp_path):
    _w(tmp_path / "Games.item.json", json.dumps({
        "1": {"title": "Zelda", "description": "", "brand": "Nintendo", "categories": "Games,Switch"},
        "0": {"title": "Mario", "description": ["Jump", "Run"], "brand": "", "categories": ""}}, indent=1))
    _w(tmp_path / "Games.inter.json", json.dumps({"0": [0, 1], "1": [1]}, indent=1))
    ds = read_dataset("lcrec", tmp_path)
    assert ds.item_ids == ["0", "1"]  # numeric ids sorted
    assert _attrs(ds, "0") == {"title": "Mario", "description": "Jump, Run"}
    assert ds.sequences == {"0": ["0", "1"], "1": ["1"]}
    _w(tmp_path / "Games.inter.json", json.dumps({"0": [0, 1], "1": [5]}, indent=1))
    with pytest.raises(DataFormatError, match=r"Games.inter.json, line 6: unknown item id '5'"):
        read_dataset("lcrec", tmp_path)
    _w(tmp_path / "Games.inter.json", '{"0": [0, 1],\n "1": [1}')
    with pytest.raises(DataFormatError, match=r"Games.inter.json, line 2: broken JSON"):
        read_dataset("lcrec", tmp_path)


# ---------- recbole ----------

ML_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
           "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction Adventure Thriller\n")


def test_recbole(tmp_path):
    _w(tmp_path / "ml-100k.item", ML_ITEM)
    _w(tmp_path / "ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
       "196\t2\t3\t900\n196\t1\t3\t800\n22\t1\t1\t700\n")
    ds = read_dataset("recbole", tmp_path)
    assert _attrs(ds, "1") == {"title": "Toy Story", "year": "1995", "genres": "Animation Children's Comedy"}
    assert ds.sequences == {"196": ["1", "2"], "22": ["1"]}  # sorted by timestamp
    assert ds.timestamps["196"] == [800.0, 900.0]
    _w(tmp_path / "ml-100k.inter", "user_id:token\titem_id:token\ttimestamp:float\n196\t1\t1\n196\t3\n")
    with pytest.raises(DataFormatError, match=r"ml-100k.inter, line 3: 2 tab-separated fields"):
        read_dataset("recbole", tmp_path)
    _w(tmp_path / "ml-100k.inter", "user_id:token\titem_id:token\ttimestamp:float\n196\t1\tsoon\n")
    with pytest.raises(DataFormatError, match=r"line 2: timestamp 'soon' is not a number"):
        read_dataset("recbole", tmp_path)


# ---------- movielens ----------

def test_movielens_100k_and_1m(tmp_path):
    flags = "|".join(["0"] * 19)
    toy = flags.split("|")
    toy[3] = toy[5] = "1"
    _w(tmp_path / "k" / "u.item", f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(toy)}\n"
       f"2|Caf\xe9 (1996)|01-Jan-1996||http://y|{flags}\n", encoding="latin-1")
    _w(tmp_path / "k" / "u.data", "5\t2\t3\t20\n5\t1\t4\t10\n")
    ds = read_dataset("movielens", tmp_path / "k")
    assert _attrs(ds, "1") == {"title": "Toy Story (1995)", "year": "1995", "genres": "Animation, Comedy"}
    assert _attrs(ds, "2")["title"] == "Caf\xe9 (1996)"
    assert ds.sequences == {"5": ["1", "2"]}
    _w(tmp_path / "m" / "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n",
       encoding="latin-1")
    _w(tmp_path / "m" / "ratings.dat", "1::2::5::978300760\n1::1::3::978300000\n")
    ds = read_dataset("movielens", tmp_path / "m")
    assert _attrs(ds, "1") == {"title": "Toy Story (1995)", "year": "1995", "genres": "Animation, Comedy"}
    assert ds.sequences == {"1": ["1", "2"]}
    _w(tmp_path / "m" / "ratings.dat", "1::2::5::978300760\n1::1::3\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat, line 2"):
        read_dataset("movielens", tmp_path / "m")


# ---------- amazon ----------

def test_amazon2014_gz_and_literal_meta(tmp_path):
    meta = ("{'asin': 'A1', 'title': 'Headphones', 'categories': [['Electronics', 'Audio']], 'price': 9.5}\n"
            "{'asin': 'A2', 'categories': [['Electronics']], 'brand': 'Sony'}\n"
            "{'asin': 'A3', 'title': ''}\n"
            "{'asin': 'UNUSED', 'title': ''}\n")
    with gzip.open(tmp_path / "meta_Electronics.json.gz", "wt") as f:
        f.write(meta)
    reviews = [{"reviewerID": "U1", "asin": "A2", "unixReviewTime": 20}, {"reviewerID": "U1", "asin": "A1", "unixReviewTime": 10},
               {"reviewerID": "U1", "asin": "A1", "unixReviewTime": 10}, {"reviewerID": "U2", "asin": "A1", "unixReviewTime": 5}]
    _w(tmp_path / "reviews_Electronics_5.json", "".join(json.dumps(r) + "\n" for r in reviews))
    ds = read_dataset("amazon2014", tmp_path)
    assert ds.item_ids == ["A1", "A2"]  # only interacted items; the text-less unused one is fine
    assert _attrs(ds, "A1") == {"title": "Headphones", "categories": "Electronics, Audio", "price": "9.5"}
    assert ds.sequences == {"U1": ["A1", "A2"], "U2": ["A1"]}  # chronological, exact duplicate dropped
    with open(tmp_path / "reviews_Electronics_5.json", "a") as f:
        f.write(json.dumps({"reviewerID": "U3", "asin": "A3", "unixReviewTime": 1}) + "\n")
    with pytest.raises(DataFormatError, match=r"meta_Electronics.json.gz, line 3: item 'A3' has no text"):
        read_dataset("amazon2014", tmp_path)


def test_amazon2018(tmp_path):
    _w(tmp_path / "meta_Games.json", json.dumps({"asin": "G1", "title": "Doom", "category": ["Games", "PC"],
                                                  "feature": ["FPS"], "description": ["Demons"]}) + "\n")
    _w(tmp_path / "Games_5.json", json.dumps({"reviewerID": "U", "asin": "G1", "unixReviewTime": 3}) + "\n"
       + '{"reviewerID": "U", "asin": \n')
    with pytest.raises(DataFormatError, match=r"Games_5.json, line 2"):
        read_dataset("amazon2018", tmp_path)
    _w(tmp_path / "Games_5.json", json.dumps({"reviewerID": "U", "asin": "G9", "unixReviewTime": 3}) + "\n")
    with pytest.raises(DataFormatError, match=r"Games_5.json, line 1: unknown item id 'G9'"):
        read_dataset("amazon2018", tmp_path)
    _w(tmp_path / "Games_5.json", json.dumps({"reviewerID": "U", "asin": "G1", "unixReviewTime": 3}) + "\n")
    ds = read_dataset("amazon2018", tmp_path)
    assert _attrs(ds, "G1") == {"title": "Doom", "categories": "Games, PC", "features": "FPS", "description": "Demons"}


def test_amazon2023(tmp_path):
    _w(tmp_path / "meta_Books.jsonl", json.dumps({"parent_asin": "P1", "title": "Dune", "main_category": "Books",
                                                   "categories": [], "store": "Ace", "price": None}) + "\n")
    _w(tmp_path / "Books.jsonl", json.dumps({"user_id": "U", "parent_asin": "P1", "timestamp": 1600000000000}) + "\n"
       + json.dumps({"user_id": "U", "timestamp": 1}) + "\n")
    with pytest.raises(DataFormatError, match=r"Books.jsonl, line 2: missing field 'parent_asin'"):
        read_dataset("amazon2023", tmp_path)
    _w(tmp_path / "Books.jsonl", json.dumps({"user_id": "U", "parent_asin": "P1", "timestamp": 1600000000000}) + "\n")
    ds = read_dataset("amazon2023", tmp_path)
    assert _attrs(ds, "P1") == {"title": "Dune", "categories": "Books", "brand": "Ace"}


def test_yelp(tmp_path):
    _w(tmp_path / "yelp_academic_dataset_business.json",
       json.dumps({"business_id": "b1", "name": "Cafe", "categories": "Coffee, Tea", "city": "Reno", "stars": 4.5}) + "\n")
    _w(tmp_path / "yelp_academic_dataset_review.json",
       json.dumps({"user_id": "u", "business_id": "b1", "date": "2019-01-02 10:00:00"}) + "\n"
       + json.dumps({"user_id": "u", "business_id": "b1", "date": "yesterday"}) + "\n")
    with pytest.raises(DataFormatError, match=r"review.json, line 2: date 'yesterday'"):
        read_dataset("yelp", tmp_path)


def test_encoding_error_names_line(tmp_path):
    _w(tmp_path / "ml.item", ML_ITEM.encode() + b"3\tCaf\xe9\t1990\tDrama\n")
    _w(tmp_path / "ml.inter", "user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(DataFormatError, match=r"ml.item, line 4: not valid utf-8"):
        read_dataset("recbole", tmp_path)


# ---------- convert + CLI ----------

def test_convert_with_kcore_and_remap_and_cli(tmp_path):
    from typer.testing import CliRunner

    from reaemb_trl.cli.data import data_app

    _w(tmp_path / "in" / "x.item", ML_ITEM + "3\tHeat\t1995\tAction\n")
    _w(tmp_path / "in" / "x.inter", "user_id:token\titem_id:token\n" + "a\t1\na\t2\nb\t1\nb\t2\nc\t3\nc\t1\n")
    ds = convert("recbole", tmp_path / "in", tmp_path / "out", kcore=2, remap_ids=True)
    assert ds.sequences == {"0": ["0", "1"], "1": ["0", "1"]}
    back = RecDataset.load(tmp_path / "out")
    assert back.sequences == ds.sequences and back.item_ids == ["0", "1"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["id_map"]["items"] == {"0": "1", "1": "2"} and meta["kcore"] == 2

    runner = CliRunner()
    res = runner.invoke(data_app, ["convert", "--format", "recbole", "--input", str(tmp_path / "in"),
                                   "--output", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "interactions" in res.output and "| " in res.output
    res = runner.invoke(data_app, ["stats", str(tmp_path / "cli")])
    assert res.exit_code == 0 and "users" in res.output
    _w(tmp_path / "bad" / "x.item", ML_ITEM)
    _w(tmp_path / "bad" / "x.inter", "user_id:token\titem_id:token\na\t9\n")
    res = runner.invoke(data_app, ["convert", "--format", "recbole", "--input", str(tmp_path / "bad"),
                                   "--output", str(tmp_path / "bad_out")])
    assert res.exit_code == 1 and "line 2" in res.output and not (tmp_path / "bad_out").exists()
