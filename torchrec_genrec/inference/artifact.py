"""The inference artifact on disk: its files, its manifest, and the checks made before
anything in it is loaded.

An artifact is a directory::

    manifest.json          format, versions, model settings, per-file sha256 and size
    encoder.pt2            the dense graph (``torch.export``): padded token embeddings ->
                           L2-normalised user vectors
    embeddings.safetensors the token table as TorchRec's inference TBE stores it (fp32,
                           fp16 or int8 rows with their scale/bias, row-aligned)
    vocab.json             raw item ids in dense-id order, raw action values

An artifact is data, never code. Every file a loader opens is listed in the manifest with
its size and sha256 and is read through :class:`ArtifactReader`: a plain file directly in
the artifact directory (a symlink is refused, so nothing outside the directory is opened),
within a size limit, hashed on the bytes that are then parsed. JSON is parsed with depth
and size limits and checked field by field; tables are safetensors; ``encoder.pt2`` is
loaded by :func:`~torchrec_genrec.inference.exported_program.load_exported_program`, which
unpickles and executes nothing.

Example::

    reader = ArtifactReader("artifacts/hstu_int8", ARTIFACT_FORMAT, required=(ENCODER, EMBEDDINGS, VOCAB))
    vocab = reader.json(VOCAB)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from importlib import metadata
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

from torchrec_genrec import __version__
from torchrec_genrec.errors import ArtifactError

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "ArtifactError",
    "ArtifactReader",
    "MAX_JSON_BYTES",
    "MAX_MANIFEST_BYTES",
    "file_entry",
    "read_manifest",
    "require",
    "stack_versions",
    "verify_artifact",
]

ARTIFACT_FORMAT = "torchrec-genrec/retrieval"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.pt2"
EMBEDDINGS = "embeddings.safetensors"
VOCAB = "vocab.json"
#: The largest manifest read (a manifest holds settings and checksums: kilobytes).
MAX_MANIFEST_BYTES = 4 << 20
#: The largest other JSON file read (vocab.json: ~10 bytes per id, 1e7 ids ~ 100 MiB).
MAX_JSON_BYTES = 512 << 20
#: The largest exported program read into memory (the dense graph and its weights).
MAX_PROGRAM_BYTES = 4 << 30


def stack_versions() -> Dict[str, str]:
    """The versions an artifact depends on: the exported graph's format follows torch,
    the table layout follows fbgemm and TorchRec."""
    versions = {"torchrec_genrec": __version__, "torch": torch.__version__.split("+")[0]}
    for dist in ("torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "fbgemm-gpu-cpu" in versions:  # one name for the table layout, whichever build
        versions["fbgemm_gpu"] = versions.pop("fbgemm-gpu-cpu")
    elif "fbgemm-gpu" in versions:
        versions["fbgemm_gpu"] = versions.pop("fbgemm-gpu")
    return versions


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    for block in iter(lambda: os.read(fd, 1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> Dict[str, Any]:
    """The manifest's record of one file: its size and sha256."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"bytes": os.fstat(fd).st_size, "sha256": _sha256_fd(fd)}
    finally:
        os.close(fd)


def _open_plain(path: str) -> int:
    """Opens a regular file for reading, refusing a symlink (``O_NOFOLLOW``) or anything
    that is not a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise ArtifactError("is a symlink: an artifact's files must be plain files inside its directory "
                                "(copy the file in instead of linking it)", path=path) from e
        if e.errno == errno.ENOENT:
            raise ArtifactError("missing: copy the whole artifact directory", path=path) from e
        raise ArtifactError(f"cannot be read ({e.strerror})", path=path) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError("is not a regular file", path=path)
    return fd


def _parse_json(data: bytes, path: str) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"malformed JSON ({e.msg}); the artifact is corrupt, export it again",
                            path=path, line=e.lineno) from e
    except UnicodeDecodeError as e:
        raise ArtifactError(f"not UTF-8 text ({e.reason} at byte {e.start}); the artifact is corrupt",
                            path=path) from e
    except RecursionError as e:
        raise ArtifactError("JSON nested too deeply to be an artifact file; the artifact is corrupt or crafted",
                            path=path) from e


def _read_limited(path: str, limit: int) -> bytes:
    fd = _open_plain(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ArtifactError(f"{size} bytes, more than the {limit} this loader reads for it: not an artifact "
                                "file of this library", path=path)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def require(mapping: Any, key: str, kind: Any, path: str, check: Optional[Callable[[Any], bool]] = None,
            expect: str = "") -> Any:
    """``mapping[key]`` if it is a ``kind`` (and passes ``check``), else an ArtifactError
    naming the file, the key and what is expected. ``key`` may be dotted (``table.rows``).

    Example::

        rows = require(manifest, "table.rows", int, path, lambda n: n > 0, "a positive row count")
    """
    value = mapping
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ArtifactError(f"key {key!r} is missing; the artifact is incomplete or from another tool: "
                                "export it again", path=path)
        value = value[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_bool = isinstance(value, bool)
    if not isinstance(value, kinds) or (is_bool and bool not in kinds) or (check is not None and not check(value)):
        names = "/".join(k.__name__ for k in kinds)
        raise ArtifactError(f"key {key!r} is {json.dumps(value)[:80]}, expected {expect or names}", path=path)
    return value


def read_manifest(directory: str, expected_format: str = ARTIFACT_FORMAT) -> Dict[str, Any]:
    """Reads and checks ``manifest.json`` (a plain file, its format and version), nothing else.

    Raises:
        ArtifactError: no manifest, malformed JSON (with its line), another format, or a
            newer artifact version than this library reads.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ArtifactError("no such artifact directory", path=directory)
    if not os.path.lexists(path):
        raise ArtifactError(f"no {MANIFEST}: not an artifact written by `genrec export`", path=directory)
    manifest = _parse_json(_read_limited(path, MAX_MANIFEST_BYTES), path)  # read at call time: tests lower it
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"format is {found!r}, expected {expected_format!r}", path=path)
    version = manifest.get("format_version")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact format version {version}; this torchrec-genrec reads version "
                            f"{ARTIFACT_VERSION}: export it again with this install", path=path)
    return manifest


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _check_files_field(manifest: Dict[str, Any], path: str) -> Dict[str, Dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError("the manifest lists no files", path=path)
    for name, entry in files.items():
        if (not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", "..")
                or "\\" in name or "\x00" in name):
            raise ArtifactError(f"manifest names a file outside the artifact: {name!r}", path=path)
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise ArtifactError(f"manifest entry of {name!r} needs 'bytes' (int) and 'sha256' (64 hex digits)",
                                path=path)
    return files


class ArtifactReader:
    """An artifact directory opened for loading: the manifest read and checked, the files
    the loader will open required to be listed in it, and each file read only through
    :meth:`bytes`, :meth:`json` or :meth:`verified_path`, which check that it is a plain file
    (no symlink), its size and its sha256 against the manifest.

    Args:
        directory (str): the artifact directory.
        expected_format (str): the artifact kind (retrieval or ranking).
        required (Sequence[str]): the files the loader opens; each must be in the manifest.
        check_versions (bool): refuse another torch / TorchRec / fbgemm minor version.

    Raises:
        ArtifactError: naming the file and what is wrong with it.

    Example::

        reader = ArtifactReader(directory, ARTIFACT_FORMAT, required=(ENCODER, EMBEDDINGS, VOCAB))
        program = reader.bytes(ENCODER, MAX_PROGRAM_BYTES)
    """

    def __init__(self, directory: str, expected_format: str, required: Sequence[str],
                 check_versions: bool = True) -> None:
        self.directory = directory
        self.manifest_path = os.path.join(directory, MANIFEST)
        self.manifest = read_manifest(directory, expected_format)
        self.files = _check_files_field(self.manifest, self.manifest_path)
        for name in required:
            if name not in self.files:
                raise ArtifactError(f"the manifest does not list {name}, which the loader opens: the manifest was "
                                    "edited or the artifact is incomplete; export it again", path=self.manifest_path)
        if check_versions:
            self._check_versions()

    def _check_versions(self) -> None:
        here = stack_versions()
        versions = self.manifest.get("versions", {})
        if not isinstance(versions, dict):
            raise ArtifactError("key 'versions' is not an object", path=self.manifest_path)
        for name, version in versions.items():
            if name == "torchrec_genrec" or name not in here:
                continue
            if not isinstance(version, str) or _major_minor(here[name]) != _major_minor(version):
                raise ArtifactError(
                    f"exported with {name} {version}, this install has {here[name]}: install "
                    f"{name}=={version} (requirements/) or export the run again with this install",
                    path=self.manifest_path)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _entry(self, name: str) -> Dict[str, Any]:
        if name not in self.files:
            raise ArtifactError(f"the manifest does not list {name}", path=self.manifest_path)
        return self.files[name]

    def _check(self, name: str, size: int, digest: str) -> None:
        entry = self._entry(name)
        if size != entry["bytes"]:
            raise ArtifactError(f"{size} bytes, the manifest says {entry['bytes']}: truncated or replaced; "
                                "copy the artifact again", path=self.path(name))
        if digest != entry["sha256"]:
            raise ArtifactError("sha256 differs from the manifest's: the file is corrupt; copy the artifact again",
                                path=self.path(name))

    def bytes(self, name: str, limit: int) -> bytes:
        """The file's bytes, checked against the manifest (the bytes hashed are the bytes returned)."""
        self._entry(name)
        data = _read_limited(self.path(name), limit)
        self._check(name, len(data), hashlib.sha256(data).hexdigest())
        return data

    def json(self, name: str, limit: Optional[int] = None) -> Any:
        """The file parsed as JSON (at most ``limit`` bytes, default :data:`MAX_JSON_BYTES`),
        checked against the manifest first."""
        return _parse_json(self.bytes(name, MAX_JSON_BYTES if limit is None else limit), self.path(name))

    def verified_path(self, name: str) -> str:
        """The path of a large data file (safetensors) after checking it is a plain file with
        the manifest's size and sha256. The caller opens it by path: safetensors holds only
        tensors, so a file swapped in between can make the load fail, never run code."""
        fd = _open_plain(self.path(name))
        try:
            self._check(name, os.fstat(fd).st_size, _sha256_fd(fd))
        finally:
            os.close(fd)
        return self.path(name)

    def verify_all(self) -> None:
        """Checks every file the manifest lists (size, sha256, plain file)."""
        for name in self.files:
            self.verified_path(name)


def verify_artifact(directory: str, check_versions: bool = True, expected_format: str = ARTIFACT_FORMAT,
                    required: Iterable[str] = ()) -> Dict[str, Any]:
    """Checks an artifact before it is loaded: manifest, every listed file's size and sha256
    (plain files only), the files a loader opens listed, and (unless
    ``check_versions=False``) that torch, TorchRec and fbgemm match the exporting install to
    the minor version.

    Args:
        directory (str): the artifact directory.
        check_versions (bool): refuse a different torch / TorchRec / fbgemm minor version.
        expected_format (str): the artifact kind (retrieval or ranking).
        required (Iterable[str]): files that must be listed.

    Returns:
        Dict[str, Any]: the manifest.

    Raises:
        ArtifactError: naming the file and what is wrong with it.
    """
    reader = ArtifactReader(directory, expected_format, tuple(required), check_versions)
    reader.verify_all()
    return reader.manifest
