"""reaemb-trl: ReaEmb (LRCL + CRRL) on the Hugging Face stack.

    from reaemb_trl import ThoughtEmbedder
    embedder = ThoughtEmbedder.from_pretrained("outputs/lrcl")
    vectors = embedder.encode([[("title", "Toy Story"), ("year", "1995")]])

Names are imported on first use, so `import reaemb_trl` (and `reaemb --help`) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "THOUGHT_TOKEN": "reaemb_trl.prompt",
    "ItemPromptFormatter": "reaemb_trl.prompt",
    "LatentThoughtModule": "reaemb_trl.thought_module",
    "ThoughtEmbedder": "reaemb_trl.embedder",
    "ModelArguments": "reaemb_trl.model_args",
    "LRCLConfig": "reaemb_trl.lrcl_config",
    "LRCLTrainer": "reaemb_trl.lrcl_trainer",
    "CRRLConfig": "reaemb_trl.crrl_config",
    "CRRLTrainer": "reaemb_trl.crrl_trainer",
    "CooccurrenceCandidates": "reaemb_trl.candidates",
    "export_table": "reaemb_trl.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reaemb_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily imported public names too, so `dir(reaemb_trl)` and tab completion show them."""
    return sorted(set(globals()) | set(__all__))
