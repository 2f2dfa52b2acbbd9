"""One error type for bad data, so users learn *where* to fix a file, not just that it is bad."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem in a data or spec file, located by path, 1-based line and field where known."""

    def __init__(
        self,
        message: str,
        path: str | Path,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = Path(path)
        self.line = line
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = [str(self.path)]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}"

    def __reduce__(self):  # keep the extra attributes across pickling (e.g. to worker processes)
        return (type(self), (self.message, self.path, self.line, self.field))
