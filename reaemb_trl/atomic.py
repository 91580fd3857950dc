"""Files written whole or not at all: a reader sees the old file or the new one, never half of one, and an
interrupted write (an exception, Ctrl-C, or SIGTERM under `reaemb_trl.signals.sigterm_as_interrupt`) leaves no
temporary file behind."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into `.<name>.<random>.tmp` in `path`'s folder (created if missing), then os.replace onto
    `path`; the temporary file is removed on any exception, KeyboardInterrupt included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named here and created by `write` inside the `try`: no interrupt can land between creation and cleanup.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
