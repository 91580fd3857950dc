"""One error type for every bad input file, so callers can catch it and users see where to look."""

from __future__ import annotations

import gzip
from pathlib import Path


class DataFormatError(ValueError):
    """A data file is malformed. The message names the file, the line (1-based) and what to do."""

    def __init__(self, file: str | Path, line: int | None, problem: str, fix: str = ""):
        self.file = str(file)
        self.line = line
        self.problem = problem
        where = f"{self.file}, line {line}" if line is not None else self.file
        message = f"{where}: {problem}"
        if fix:
            message += f". {fix}"
        super().__init__(message)


def iter_text_lines(path: str | Path, encoding: str = "utf-8"):
    """Yield (line_number, text) for each line, decoding line by line.

    Decoding per line (instead of the whole file) lets an encoding error report its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "file not found", "Check the path and the input format")
    opener = gzip.open if path.suffix == ".gz" else open  # raw Amazon dumps ship gzipped
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    path, number, f"not valid {encoding} text ({exc.reason} at byte {exc.start})",
                    f"Re-encode the file as {encoding}",
                ) from None
            yield number, text.rstrip("\r\n")
