"""The text reference table: the bag of input-token embeddings, co-occurrence positives from training prefixes only,
a linear map that never sees an excluded item, and the file `reaemb export --cooccurrence-projection` writes."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import ASSETS, save_tiny_backbone, tiny_causal_lm, tiny_embedder, tiny_tokenizer
from reaemb_trl.cli import app
from reaemb_trl.cooccurrence_projection import (
    bag_of_token_embeddings,
    build_reference_table,
    cooccurrence_positives,
    fit_linear_map,
    item_texts,
    projection_table,
)
from reaemb_trl.data.canonical import RecDataset
from reaemb_trl.data.cold import without_items
from reaemb_trl.export_inputs import ExportError
from reaemb_trl.item_table import read_table
from reaemb_trl.prompt import ItemPromptFormatter

pytestmark = pytest.mark.usefixtures("one_thread")

CLUSTERS, PER_CLUSTER, WIDTH, SIGNAL = 4, 6, 24, 3


def _clustered():
    """24 items in 4 clusters: features = noise + the cluster's direction in SIGNAL of the WIDTH coordinates (a
    random map hardly sees it); each user's sequence stays in one cluster (its last two items, the validation and
    test targets, are from another cluster: they must not count)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.zeros(CLUSTERS, WIDTH)
    directions[:, :SIGNAL] = torch.randn(CLUSTERS, SIGNAL, generator=generator) * 2
    ids = [f"i{n}" for n in range(CLUSTERS * PER_CLUSTER)]
    cluster = [n // PER_CLUSTER for n in range(len(ids))]
    features = directions[cluster] + torch.randn(len(ids), WIDTH, generator=generator)
    sequences = {}
    for user in range(60):
        c = user % CLUSTERS
        members = [ids[c * PER_CLUSTER + (user + k) % PER_CLUSTER] for k in range(4)]
        other = [ids[((c + 1) % CLUSTERS) * PER_CLUSTER + k] for k in (user % 3, 3 + user % 3)]
        sequences[f"u{user}"] = members + other
    return ids, cluster, features, sequences


def _fit(ids, features, sequences, exclude=(), **options):
    pairs = cooccurrence_positives(sequences, ids, exclude=exclude)
    train = [row for row, item in enumerate(ids) if item not in set(exclude)]
    return fit_linear_map(features, pairs, train, dim=8, steps=60, batch_size=32, negatives=7, **options), pairs


def test_bag_is_the_mean_of_input_embedding_rows_of_the_items_own_text():
    model, tokenizer = tiny_causal_lm(), tiny_tokenizer()
    attributes = [[("title", "Toy Story"), ("year", "1995")], [("name", "a;b\nc")]]
    formatter = ItemPromptFormatter(max_value_chars=3)
    texts = item_texts(attributes, formatter)
    assert texts == ["title is Toy; year is 199", "name is a.b"]  # the prompt's cleaning and cut, no template
    bag = bag_of_token_embeddings(model, tokenizer, texts, batch_size=1)
    rows = model.get_input_embeddings().weight
    for text, vector in zip(texts, bag):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 1
        torch.testing.assert_close(vector, sum(rows[i] for i in ids) / len(ids))
    assert torch.equal(bag, bag_of_token_embeddings(model, tokenizer, texts, batch_size=7))


def test_positives_come_from_training_prefixes_and_never_involve_an_excluded_item():
    ids, cluster, _, sequences = _clustered()
    pairs = cooccurrence_positives(sequences, ids)
    assert pairs and all(cluster[a] == cluster[p] for a, p, _ in pairs)  # the cross-cluster tails never count
    weights = {}
    for a, _, w in pairs:
        weights[a] = weights.get(a, 0.0) + w
    assert all(abs(total - 1.0) < 1e-9 for total in weights.values())
    excluded = {"i0", "i7"}
    strict = cooccurrence_positives(sequences, ids, exclude=excluded)
    rows = {ids.index(i) for i in excluded}
    assert strict and not any(a in rows or p in rows for a, p, _ in strict)
    # the other items keep positives among the rest (an excluded item does not take a slot)
    assert {a for a, _, _ in strict} == {a for a, _, _ in pairs} - rows


def test_the_map_never_sees_an_excluded_item():
    ids, _, features, sequences = _clustered()
    excluded = ["i0", "i7"]
    weight, _ = _fit(ids, features, sequences, exclude=excluded)
    # its features (statistics, negatives): a NaN row would poison W if it were ever read
    poisoned = features.clone()
    poisoned[[ids.index(i) for i in excluded]] = float("nan")
    assert torch.equal(_fit(ids, poisoned, sequences, exclude=excluded)[0], weight)
    # its interactions: added to some users' training prefixes, removed from the others' (the last two items, the
    # targets, stay where they are), or removed as a cold item's are
    moved = {user: ["i0", "i7"] + seq if n % 2 else [i for i in seq[:-2] if i not in excluded] + seq[-2:]
             for n, (user, seq) in enumerate(sequences.items())}  # fmt: skip
    assert torch.equal(_fit(ids, features, moved, exclude=excluded)[0], weight)
    cold = without_items(sequences, set(excluded))
    assert torch.equal(_fit(ids, features, cold, exclude=excluded)[0], weight)
    # the same changes do move a map that may see the items
    assert not torch.equal(_fit(ids, features, moved)[0], _fit(ids, features, sequences)[0])
    # and the seed decides the rest
    assert torch.equal(_fit(ids, features, sequences, exclude=excluded)[0], weight)
    assert not torch.equal(_fit(ids, features, sequences, exclude=excluded, seed=1)[0], weight)


def test_fitting_ranks_positives_above_negatives_and_transfers_to_excluded_items():
    ids, cluster, features, sequences = _clustered()
    excluded = [f"i{c * PER_CLUSTER}" for c in range(CLUSTERS)]  # one item per cluster never seen
    train = [row for row, item in enumerate(ids) if item not in excluded]
    pairs = cooccurrence_positives(sequences, ids, exclude=excluded)
    same = torch.tensor([[cluster[a] == cluster[b] for b in range(len(ids))] for a in range(len(ids))])

    def margin(weight):
        table = torch.nn.functional.normalize(projection_table(features, weight, train), dim=-1)
        cosine = table @ table.T
        positive = torch.stack([cosine[a, p] for a, p, _ in pairs]).mean()
        held = [ids.index(i) for i in excluded]  # excluded items vs their cluster mates, then the others
        mates = torch.stack([cosine[h][same[h]].sum() - 1 for h in held]).mean() / (PER_CLUSTER - 1)
        others = torch.stack([cosine[h][~same[h]].mean() for h in held]).mean()
        return float(positive - cosine[train][:, train].mean()), float(mates - others)

    start = margin(fit_linear_map(features, pairs, train, dim=8, steps=1, lr=1e-6, seed=0))
    fitted = margin(fit_linear_map(features, pairs, train, dim=8, steps=200, batch_size=32, negatives=7, seed=0))
    assert fitted[0] > start[0] + 0.3 and fitted[0] > 0.6  # training pairs: 0.81 against 0.24 at the start
    assert fitted[1] > start[1] + 0.2 and fitted[1] > 0.3  # never-seen items find their cluster: 0.47 against 0.11


def test_no_training_pair_is_a_clear_error():
    ids, _, features, sequences = _clustered()
    pairs = cooccurrence_positives(sequences, ids)
    with pytest.raises(ExportError, match="no co-occurrence pair among the 2 training items"):
        fit_linear_map(features, pairs, [0, 23])


def test_reference_table_file_round_trips(tmp_path):
    embedder = tiny_embedder()
    data = RecDataset.load(ASSETS / "tiny_catalog")
    cold = data.item_ids[:5]
    path = build_reference_table(embedder, data, cold, tmp_path / "ref.safetensors", seed=3, dim=6, steps=20,
                                 progress=False)
    table = read_table(path)
    assert table.item_ids == data.item_ids and table.embeddings.shape == (len(data.items), 6)
    features = bag_of_token_embeddings(embedder.model, embedder.tokenizer,
                                       item_texts([i["attributes"] for i in data.items], embedder.formatter))
    pairs = cooccurrence_positives(data.sequences, data.item_ids, exclude=cold)
    train = list(range(5, len(data.items)))
    expected = projection_table(features, fit_linear_map(features, pairs, train, dim=6, steps=20, seed=3), train)
    assert torch.equal(table.embeddings, expected)  # cold items get their row too
    settings = table.metadata["projection"]
    assert settings["training_pairs"] == len(pairs) and settings["excluded_items"] == 5
    assert settings["steps"] == 20 and settings["dim"] == 6 and settings["seed"] == 3
    assert table.metadata["source"] == "cooccurrence_projection" and table.metadata["thought"] is False
    assert table.metadata["prompt_format"] == embedder.formatter.to_dict()


def test_export_cli_writes_the_reference_table_and_fails_in_one_line(tmp_path):
    runner = CliRunner()
    backbone = str(save_tiny_backbone(tmp_path / "backbone"))
    data, out = str(ASSETS / "tiny_catalog"), tmp_path / "ref.safetensors"
    base = ["export", "--data", data, "--output", str(out), "--cooccurrence-projection"]
    result = runner.invoke(app, [*base, "--backbone", backbone, "--projection-dim", "5", "--projection-steps", "10",
                                 "--cold-items", "0.25"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "12 cold items excluded" in result.output
    table = read_table(out)
    assert table.embeddings.shape == (48, 5) and table.metadata["projection"]["excluded_items"] == 12
    assert json.loads(json.dumps(table.metadata["projection"]))["training_items"] == 36

    def last_error(*args):
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        return result.output.strip().splitlines()[-1]

    no_interactions = tmp_path / "items_only"
    no_interactions.mkdir()
    (no_interactions / "items.jsonl").write_text((ASSETS / "tiny_catalog" / "items.jsonl").read_text())
    line = last_error("--backbone", backbone, "--data", str(no_interactions))
    assert line == (f"error: {no_interactions} has no interactions.csv: the co-occurrence projection trains on "
                    "interactions; pass the canonical folder that `reaemb data convert` wrote (items.jsonl and "
                    "interactions.csv)")  # fmt: skip
    tiny_embedder().save_pretrained(tmp_path / "ckpt")
    assert "pass --backbone, not --checkpoint" in last_error("--checkpoint", str(tmp_path / "ckpt"))
    assert "neither --pca" in last_error("--backbone", backbone, "--pca", "4")
    assert last_error("--backbone", backbone, "--cold-items", "1.5").startswith("error: --cold-items is a share")
    assert "no co-occurrence pair" in last_error("--backbone", backbone, "--cold-items", "0.99")
    plain = runner.invoke(app, ["export", "--data", data, "--output", str(out), "--backbone", backbone,
                                "--cold-items", "0.1"])  # fmt: skip
    assert plain.exit_code == 1 and "--cold-items applies to --cooccurrence-projection only" in plain.output
