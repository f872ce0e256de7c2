"""The library's error types, importable by every layer (data, models, plans, training,
inference, serving).

Each error's message names where the problem is (a file and line, a config key, an
artifact member) and says how to fix it.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ArtifactError", "DataError", "PlanError"]


class DataError(ValueError):
    """Bad input data.

    Args:
        message (str): what is wrong and how to fix it.
        path (Optional[str]): the file the problem is in.
        line (Optional[int]): 1-based line number in ``path``, where one applies.

    Example::

        raise DataError("expected 4 fields, found 3", path="ratings.dat", line=17)
        # DataError: ratings.dat:17: expected 4 fields, found 3
    """

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None) -> None:
        self.path = path
        self.line = line
        self.reason = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class ArtifactError(DataError):
    """An artifact that is missing, truncated, corrupted, unsafe or built for another stack."""


class PlanError(ValueError):
    """A table declaration, pin or topology the planner cannot work with; the message says why."""
