"""Where an export may write: never over what the user did not name as its output.

An artifact directory is replaced (written next to it, then renamed into place) only when
the user asked to (``overwrite``) and it is an artifact of this library; never the run
being exported or anything holding it, never another kind of directory.
"""

from __future__ import annotations

import json
import os

from torchrec_genrec.errors import ArtifactError

__all__ = ["check_output_dir", "check_output_file", "make_readable"]

_ARTIFACT_FORMATS = ("torchrec-genrec/retrieval", "torchrec-genrec/ranking")


def _is_artifact(path: str) -> bool:
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest) as f:
            return json.load(f).get("format") in _ARTIFACT_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str, run_dir: str, overwrite: bool) -> None:
    """Refuses an artifact destination that would replace the run, a directory holding
    it, or anything that is not an earlier artifact; an existing artifact only with
    ``overwrite``.

    Raises:
        ArtifactError: saying why and what to do.
    """
    if _inside(run_dir, out_dir) or _inside(out_dir, run_dir):
        raise ArtifactError(f"the artifact would replace or sit inside the run {run_dir} it is exported from; choose "
                            "an --out outside the run directory", path=out_dir)
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ArtifactError("exists and is not a directory; choose another --out", path=out_dir)
    if not os.listdir(out_dir):
        return
    if not _is_artifact(out_dir):
        raise ArtifactError("exists and is not an artifact of `genrec export` (it would be deleted); choose another "
                            "--out or empty it first", path=out_dir)
    if not overwrite:
        raise ArtifactError("exists already: choose another --out or pass --overwrite", path=out_dir)


def check_output_file(out_path: str, run_dir: str, overwrite: bool) -> None:
    """The same for a single output file (a torch.package)."""
    if _inside(out_path, run_dir):
        raise ArtifactError(f"the package would be written inside the run {run_dir}; choose an --out outside it",
                            path=out_path)
    if os.path.isdir(out_path):
        raise ArtifactError("is a directory; give a file name for the package", path=out_path)
    if os.path.lexists(out_path) and not overwrite:
        raise ArtifactError("exists already: choose another --out or pass --overwrite", path=out_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(directory: str) -> None:
    """Gives a finished artifact directory the usual permissions (``0777`` / ``0666`` less
    the umask) instead of the private ones its temporary directory was created with, so a
    server running as another user can read it."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~mask)
