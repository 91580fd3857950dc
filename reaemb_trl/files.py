"""Names of the files in a reaemb-trl checkpoint folder (no heavy imports, so the CLI can use them)."""

CONFIG_FILE = "reaemb_config.json"  # written last: a folder with it is complete
THOUGHT_FILE = "thought_module.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
