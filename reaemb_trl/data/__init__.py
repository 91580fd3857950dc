"""Data: the canonical dataset folder, readers for public formats, k-core and id remapping."""

from reaemb_trl.data.canonical import (
    DatasetStats,
    RecDataset,
    compute_stats,
    item_popularity,
    load_interactions,
    load_items,
    make_item,
    print_stats,
    read_items,
    render_stats_table,
    write_dataset,
)
from reaemb_trl.data.cold import cold_item_ids, without_items
from reaemb_trl.data.errors import DataFormatError
from reaemb_trl.data.filtering import kcore, remap_ids
from reaemb_trl.data.readers import READERS, convert, read_dataset

__all__ = [
    "DataFormatError", "DatasetStats", "RecDataset", "READERS", "cold_item_ids", "compute_stats", "convert",
    "item_popularity", "kcore", "load_interactions", "load_items", "make_item", "print_stats", "read_dataset",
    "read_items", "remap_ids", "render_stats_table", "without_items", "write_dataset",
]
