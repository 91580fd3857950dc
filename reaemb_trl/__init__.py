"""reaemb-trl: ReaEmb (LRCL + CRRL) on the Hugging Face stack.

    from reaemb_trl import ThoughtEmbedder
    embedder = ThoughtEmbedder.from_pretrained("outputs/lrcl")
    vectors = embedder.encode([[("title", "Toy Story"), ("year", "1995")]])
"""

from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.lrcl_config import LRCLConfig
from reaemb_trl.lrcl_trainer import LRCLTrainer
from reaemb_trl.prompt import THOUGHT_TOKEN, ItemPromptFormatter
from reaemb_trl.thought import LatentThoughtModule

__version__ = "0.1.0"

__all__ = [
    "THOUGHT_TOKEN",
    "ItemPromptFormatter",
    "LRCLConfig",
    "LRCLTrainer",
    "LatentThoughtModule",
    "ThoughtEmbedder",
]
