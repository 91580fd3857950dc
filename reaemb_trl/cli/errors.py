"""How a `reaemb` command ends on an expected failure: one `error:` line on stderr, exit code 1, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors of export and encode that a user can fix from their message alone (no traceback needed)."""
    from reaemb_trl.assets import AssetFetchError
    from reaemb_trl.checkpointing import CheckpointError
    from reaemb_trl.data.errors import DataFormatError
    from reaemb_trl.export_inputs import ExportError
    from reaemb_trl.item_table import TableError

    return ExportError, TableError, DataFormatError, AssetFetchError, CheckpointError


def fail(message: object, code: int = 1) -> NoReturn:
    """One `error: <message>` line on stderr (from process 0 only when several run the same command), then exit with
    `code`; no traceback. The one way every command and recipe reports an expected failure."""
    from reaemb_trl.distributed import launched_rank

    if launched_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
