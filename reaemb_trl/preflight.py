"""What the recipes check before loading anything: an expected failure (a missing config file, a bad field, a dataset
folder or LRCL checkpoint that is not there) ends the process with one line on stderr naming the path and what to run
or fix, exit code 1, and no traceback.

    data_args, config = parse_recipe_args(DataArguments, LRCLConfig)
    check_dataset(data_args.dataset)
    with expected_failures():
        trainer = build_lrcl_trainer(data_args, config)
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

CONVERT_HINT = "make one with `reaemb data convert --format FORMAT --input RAW --output DIR`"


def fail(message: str) -> NoReturn:
    """Exit with `error: <message>` on stderr and exit code 1."""
    raise SystemExit(f"error: {message}")


def parse_recipe_args(*dataclass_types):
    """`TrlParser(dataclass_types).parse_args_and_config()`, with a missing `--config` file, a renamed key (e.g.
    `max_prompt_length`, now `max_item_tokens`) or a field that the dataclasses reject (unknown key, invalid value)
    reported in one line."""
    from trl import TrlParser

    try:
        check_renamed_arguments(dataclass_types, sys.argv[1:])
        return TrlParser(dataclass_types).parse_args_and_config()
    except FileNotFoundError as exc:
        fail(f"{exc.filename} does not exist: pass a recipe config, e.g. --config recipes/configs/lrcl_tiny.yaml")
    except ValueError as exc:
        fail(" ".join(str(exc).split()))


def check_renamed_arguments(dataclass_types, args: list[str]) -> None:
    """ValueError naming the new key when the command line or its `--config` YAML sets a key that was renamed
    (`reaemb_trl.model_args.RENAMED_KEYS`) and that none of `dataclass_types` has."""
    from dataclasses import fields

    import yaml

    from reaemb_trl.model_args import check_renamed_keys

    known = {f.name for cls in dataclass_types for f in fields(cls)}
    flags = [a for a in args if a.startswith("--")]
    check_renamed_keys([f for f in flags if f.removeprefix("--").split("=", 1)[0] not in known], "command line")
    if "--config" in args and args.index("--config") + 1 < len(args):
        path = Path(args[args.index("--config") + 1])
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return  # TrlParser reports a missing or unreadable config itself
        if isinstance(config, dict):
            check_renamed_keys([k for k in config if k not in known], str(path))


def check_dataset(dataset: str, interactions: bool = False) -> None:
    """`dataset` is `ml-100k` or a canonical dataset folder (items.jsonl, and interactions.csv when `interactions`)."""
    from reaemb_trl.assets import DATASET_ALIASES
    from reaemb_trl.data.canonical import INTERACTIONS_FILE, ITEMS_FILE

    if dataset in DATASET_ALIASES:
        return
    folder = Path(dataset)
    if not folder.exists():
        fail(f"dataset {folder} does not exist: set `dataset` to a canonical dataset folder or "
             f"{' / '.join(DATASET_ALIASES)} ({CONVERT_HINT})")
    needed = (ITEMS_FILE, INTERACTIONS_FILE) if interactions else (ITEMS_FILE,)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        fail(f"dataset {folder} is not a canonical dataset folder (no {' or '.join(missing)}): {CONVERT_HINT}")


def lrcl_config_for(checkpoint: str | os.PathLike, configs_dir: str | os.PathLike) -> Path | None:
    """The LRCL recipe config in `configs_dir` whose `output_dir` is `checkpoint`, else None."""
    import yaml

    target = Path(checkpoint).resolve()
    for path in sorted(Path(configs_dir).glob("lrcl*.yaml")):
        try:
            output_dir = (yaml.safe_load(path.read_text()) or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if output_dir and Path(output_dir).resolve() == target:
            return path
    return None


def check_lrcl_checkpoint(config, configs_dir: str | os.PathLike) -> None:
    """CRRL starts from an LRCL checkpoint: `config.lrcl_checkpoint` must be one (or `model_name_or_path` set)."""
    from reaemb_trl.embedder import CONFIG_FILE

    folder = config.lrcl_checkpoint
    if folder is None:
        if config.model_name_or_path is None:
            fail("set lrcl_checkpoint (the output_dir of the LRCL recipe) or model_name_or_path in the CRRL config")
        return
    if (Path(folder) / CONFIG_FILE).is_file():
        return
    recipe = _shown(Path(configs_dir).parent / "lrcl.py")
    lrcl_config = lrcl_config_for(folder, configs_dir)
    if lrcl_config is not None:
        todo = f"run `accelerate launch {recipe} --config {_shown(lrcl_config)}` first"
    else:
        todo = (f"run the LRCL recipe with output_dir {folder} first (`accelerate launch {recipe} --config "
                f"LRCL_CONFIG --output_dir {folder}`), or point lrcl_checkpoint at an LRCL output folder")
    fail(f"{folder} is not a reaemb-trl checkpoint (no {CONFIG_FILE}): {todo}")


@contextmanager
def expected_failures():
    """Bad dataset contents and failed asset downloads, raised while building a trainer, become one line."""
    from reaemb_trl.assets import AssetFetchError
    from reaemb_trl.data.errors import DataFormatError

    try:
        yield
    except DataFormatError as exc:
        fail(str(exc))
    except AssetFetchError as exc:
        fail(" ".join(str(exc).split()))


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (as the recipes' docstrings write it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
