"""The RecBole half of `benchmarks/recbole_crosscheck.py`: runs inside RecBole's own venv, never in ours.

Not meant to be called by hand: `recbole_crosscheck.py` writes the benchmark atomic files and a config
JSON, then calls this file with RecBole's interpreter, once with ``--inspect`` (dump what RecBole parsed,
so the caller can assert it equals our split) and once per seed with ``--seed`` (train, early-stop,
test). Results go to ``--out`` as JSON. Imports only RecBole, torch and the standard library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def build(config_dict: dict, seed: int):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    config = Config(model="SASRec", dataset="ml-100k", config_dict={**config_dict, "seed": seed})
    # RecBole points dataset "ml-100k" at its bundled example folder whatever data_path says: use ours.
    config["data_path"] = config_dict["data_path"]
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return config, dataset, train_data, valid_data, test_data


def dump_part(dataset, part) -> list[list]:
    """[user token, target token, item_length, history tokens] per row of one evaluation part, as RecBole
    holds them after remapping (history = the first item_length entries of item_id_list)."""
    feat = part._dataset.inter_feat
    users = dataset.id2token("user_id", feat["user_id"].numpy())
    targets = dataset.id2token("item_id", feat["item_id"].numpy())
    lengths = feat["item_length"].numpy().tolist()
    hist = feat["item_id_list"].numpy()
    rows = []
    for u, t, n, h in zip(users, targets, lengths, hist):
        rows.append([str(u), str(t), int(n), [str(x) for x in dataset.id2token("item_id", h[:n])]])
    return rows


def inspect(config_dict: dict) -> dict:
    config, dataset, train_data, valid_data, test_data = build(config_dict, seed=0)
    return {
        "num_items": int(dataset.item_num) - 1,  # RecBole's item 0 is [PAD]
        "num_users": int(dataset.user_num) - 1,
        "train_rows": len(train_data._dataset),
        "valid": dump_part(dataset, valid_data),
        "test": dump_part(dataset, test_data),
    }


def train(config_dict: dict, seed: int, trace: str | None = None) -> dict:
    import torch
    from recbole.utils import get_model, get_trainer, init_seed

    t0 = time.perf_counter()
    config, dataset, train_data, valid_data, test_data = build(config_dict, seed)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as run_recbole does
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    history: list[float] = []
    valid_epoch = trainer._valid_epoch

    def recording_valid_epoch(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        history.append(float(score))
        if trace:  # diagnostics: test metrics of every epoch, one JSON line per epoch, written as it goes
            test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            with open(trace, "a") as f:
                f.write(json.dumps({"epoch": len(history), "valid_ndcg10": float(score),
                                    "test": {k: float(v) for k, v in test.items()},
                                    "elapsed_s": time.perf_counter() - t1}) + "\n")
        return score, result

    trainer._valid_epoch = recording_valid_epoch
    t1 = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    t2 = time.perf_counter()
    best_epoch = 1 + max(range(len(history)), key=lambda i: (history[i], i))  # RecBole keeps the last of ties
    return {
        "seed": seed,
        "test": {k: float(v) for k, v in test.items()},
        "best_valid_ndcg10": float(best_valid),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "train_rows": len(train_data._dataset),
        "threads": torch.get_num_threads(),
        "wall_s": t2 - t1,
        "wall_with_data_s": t2 - t0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of RecBole config entries")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--inspect", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trace", help="also test every epoch and append one JSON line per epoch to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole 1.2.1 reloads its own pickles
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # RecBole logs every epoch; the caller reports what matters
    with open(args.config) as f:
        config_dict = json.load(f)
    if args.inspect:
        result = inspect(config_dict)
    elif args.seed is not None:
        result = train(config_dict, args.seed, args.trace)
    else:
        parser.error("give --inspect or --seed")
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
