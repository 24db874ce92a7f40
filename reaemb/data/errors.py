"""The one exception type of the data layer: it names the file and the field at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data.

    The message always says which file (and, where it applies, which field or line) is at
    fault and what was expected, so that a user can fix the input without reading code.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)
        self.path = None if path is None else str(path)
        self.field = field
