"""What the recipes check before loading anything: an expected failure (a missing config file, a bad field, a dataset
folder or LRCL checkpoint that is not there) ends the process with one line on stderr naming the path and what to run
or fix, exit code 1, and no traceback. The config loader also resolves `bf16: auto` (bf16 only where the hardware runs
it fast; `resolve_bf16`, which the quickstart uses too) and prints the precision it chose.

    data_args, config = parse_recipe_args(DataArguments, LRCLConfig)
    check_dataset(data_args.dataset)
    with expected_failures():
        trainer = build_lrcl_trainer(data_args, config)
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from reaemb_trl.cli.errors import fail

CONVERT_HINT = "make one with `reaemb data convert --format FORMAT --input RAW --output DIR`"
EXAMPLE_CONFIG = "recipes/configs/lrcl_tiny.yaml"
# sizes that a value below 1 would only reveal after the model loaded (or never: an empty batch)
BATCH_FIELDS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def parse_recipe_args(*dataclass_types, args: list[str] | None = None):
    """The recipe's command line (default `sys.argv[1:]`: `--config FILE` and field overrides) parsed into
    `dataclass_types` by `TrlParser`, without argparse's prefix matching (`--max_step` is not `--max_steps`), with
    `bf16: auto` resolved for the device the run will use. A missing or broken config, an unknown or invalid field
    and a batch size below 1 end in one line. Also makes SIGTERM (schedulers) clean up as Ctrl-C does."""
    from trl import TrlParser

    from reaemb_trl.distributed import launched_rank
    from reaemb_trl.signals import sigterm_as_interrupt

    sigterm_as_interrupt()
    args = sys.argv[1:] if args is None else args
    args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    parser = TrlParser(dataclass_types, allow_abbrev=False, usage="%(prog)s --config YAML [--FIELD VALUE ...]",
                       description=f"--config YAML: a recipe config (e.g. {EXAMPLE_CONFIG}) whose keys set any of "
                       "the fields below; a --FIELD VALUE given here overrides it.")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML",
                        help="A recipe config (recipes/configs/*.yaml); see above.")
    precision = None
    if not {"-h", "--help"} & set(args):
        args, precision = _resolve_bf16(dataclass_types, args, _read_config(args))
    try:
        parsed = parser.parse_args_and_config(args)
    except ValueError as exc:
        renamed = " (`max_prompt_length` is now `max_item_tokens`)" if "max_prompt_length" in str(exc) else ""
        fail(" ".join(str(exc).split()) + renamed)
    for config in parsed:
        for name in BATCH_FIELDS:
            if getattr(config, name, 1) < 1:
                fail(f"{name} must be >= 1, got {getattr(config, name)}")
    if precision is not None and launched_rank() == 0:
        print(precision, file=sys.stderr, flush=True)
    return parsed


def _read_config(args: list[str]) -> dict:
    """The mapping of the `--config` YAML ({} without one); a missing file or broken YAML ends in one line."""
    import yaml

    if "--config" not in args:
        return {}
    if args.index("--config") + 1 == len(args):
        fail(f"--config needs a file, e.g. --config {EXAMPLE_CONFIG}")
    path = Path(args[args.index("--config") + 1])
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        fail(f"{path} does not exist: pass a recipe config, e.g. --config {EXAMPLE_CONFIG}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # 0-based
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        fail(f"{where}: broken YAML ({problem}); fix it, or start from {EXAMPLE_CONFIG}")
    if not isinstance(config, dict):
        fail(f"{path} must hold a YAML mapping of `field: value` lines, e.g. {EXAMPLE_CONFIG}")
    return config


def _resolve_bf16(dataclass_types, args: list[str], config: dict) -> tuple[list[str], str | None]:
    """`args` with the effective `bf16` (the last `--bf16` flag, else the config's; `auto` resolved by
    `resolve_bf16` for this run's device) as `--bf16 true|false` at the end, and the line saying which precision and
    why (None when no dataclass has a `bf16` field)."""
    from dataclasses import fields

    import torch

    if not any(f.name == "bf16" for cls in dataclass_types for f in fields(cls)):
        return args, None
    args, given = _pop_flag(args, "bf16")
    _, use_cpu = _pop_flag(args, "use_cpu")
    try:
        cpu = _as_bool(use_cpu[-1] if use_cpu else config.get("use_cpu", False), "use_cpu")
        cpu = cpu or _as_bool(os.environ.get("ACCELERATE_USE_CPU", False), "ACCELERATE_USE_CPU")  # accelerate --cpu
        device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
        bf16, line = resolve_bf16(given[-1] if given else config.get("bf16", False), device)
    except ValueError as exc:
        fail(str(exc))
    return [*args, "--bf16", str(bf16).lower()], line


def resolve_bf16(setting: bool | str, device) -> tuple[bool, str]:
    """`bf16` as the recipes and the quickstart take it (true, false or auto) -> (bf16, one line saying which
    precision and why). auto: bf16 only where `device` runs it fast (`reaemb_trl.hardware.fast_bf16_available`: a
    GPU with bf16, a CPU with AMX or AVX512-BF16); elsewhere bf16 is emulated, ~12x slower than fp32 on an AVX2 CPU."""
    import torch

    from reaemb_trl.hardware import fast_bf16_available

    device = torch.device(device)
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        bf16 = fast_bf16_available(device)
        speed = "runs bf16 fast" if bf16 else "has no fast bf16 (a bf16 GPU has, or a CPU with amx_bf16/avx512_bf16)"
        why = f"bf16: auto, and this {device.type} {speed}"
    else:
        bf16 = _as_bool(setting, "bf16", "true, false or auto")
        why = f"bf16: {str(bf16).lower()}"
    return bf16, f"precision: {'bf16' if bf16 else 'fp32'} ({why})"


def _as_bool(value: bool | str, name: str, expected: str = "true or false") -> bool:
    from argparse import ArgumentTypeError

    from transformers.hf_argparser import string_to_bool

    try:
        return string_to_bool(value)
    except ArgumentTypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None


def _pop_flag(args: list[str], name: str) -> tuple[list[str], list]:
    """`args` without `--name VALUE` / `--name=VALUE` / a bare `--name`, and the values given (True when bare)."""
    flag, rest, values, i = f"--{name}", [], [], 0
    while i < len(args):
        if args[i] == flag:
            bare = i + 1 == len(args) or args[i + 1].startswith("--")
            values.append(True if bare else args[i + 1])
            i += 1 if bare else 2
        elif args[i].startswith(flag + "="):
            values.append(args[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return rest, values


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
    from reaemb_trl.checkpointing import CONFIG_FILE

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
