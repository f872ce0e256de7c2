"""Small file writes every recipe needs: a JSON file replaced atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json_atomic"]


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes ``payload`` as JSON to a temporary file beside ``path`` and renames it into
    place: a reader sees the old file or the new one, never a partial one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
