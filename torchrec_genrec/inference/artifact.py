"""The inference artifact on disk: its files, its manifest, and the checks made before
anything in it is loaded.

An artifact is a directory::

    manifest.json          format, versions, model settings, per-file sha256 and size
    encoder.pt2            the dense graph (``torch.export``): padded token embeddings ->
                           L2-normalised user vectors
    embeddings.safetensors the token table as TorchRec's inference TBE stores it (fp32,
                           fp16 or int8 rows with their scale/bias, row-aligned)
    vocab.json             raw item ids in dense-id order, raw action values

Nothing here is unpickled: the manifest and vocabulary are JSON, the table is
safetensors, and ``encoder.pt2`` is checked to hold only raw tensor payloads (no pickled
weights, constants or custom objects, sample inputs readable with ``weights_only=True``)
before ``torch.export.load`` opens it. The checksums catch a truncated or corrupted copy.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, Dict, Iterable

import torch

from torchrec_genrec.data.datasets import sha256_file
from torchrec_genrec.data.errors import DataError

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "ArtifactError",
    "check_exported_program_is_safe",
    "file_entry",
    "read_manifest",
    "stack_versions",
    "verify_artifact",
]

ARTIFACT_FORMAT = "torchrec-genrec/retrieval"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.pt2"
EMBEDDINGS = "embeddings.safetensors"
VOCAB = "vocab.json"


class ArtifactError(DataError):
    """An artifact that is missing, truncated, corrupted or built for another stack."""


def stack_versions() -> Dict[str, str]:
    """The versions an artifact depends on: the exported graph's format follows torch,
    the table layout follows fbgemm and TorchRec."""
    from importlib import metadata

    import torchrec_genrec

    versions = {"torchrec_genrec": torchrec_genrec.__version__, "torch": torch.__version__.split("+")[0]}
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


def file_entry(path: str) -> Dict[str, Any]:
    """The manifest's record of one file: its size and sha256."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def read_manifest(directory: str, expected_format: str = ARTIFACT_FORMAT) -> Dict[str, Any]:
    """Reads and checks ``manifest.json`` (format and version), nothing else.

    Raises:
        ArtifactError: no manifest, malformed JSON (with its line), another format, or a
            newer artifact version than this library reads.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"no {MANIFEST}: not an artifact written by `genrec export`", path=directory)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"malformed JSON ({e.msg}); the artifact is corrupt, export it again",
                            path=path, line=e.lineno) from e
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise ArtifactError(f"format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {expected_format!r}", path=path)
    version = manifest.get("format_version")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact format version {version}; this torchrec-genrec reads version "
                            f"{ARTIFACT_VERSION}: export it again with this install", path=path)
    return manifest


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def verify_artifact(directory: str, check_versions: bool = True,
                    expected_format: str = ARTIFACT_FORMAT) -> Dict[str, Any]:
    """Checks an artifact before it is loaded: manifest, every file's size and sha256, and
    (unless ``check_versions=False``) that torch, TorchRec and fbgemm match the exporting
    install to the minor version.

    Args:
        directory (str): the artifact directory.
        check_versions (bool): refuse a different torch / TorchRec / fbgemm minor version.
        expected_format (str): the artifact kind (retrieval or ranking).

    Returns:
        Dict[str, Any]: the manifest.

    Raises:
        ArtifactError: naming the file and what is wrong with it.
    """
    manifest = read_manifest(directory, expected_format)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError("the manifest lists no files", path=os.path.join(directory, MANIFEST))
    for name, entry in files.items():
        path = os.path.join(directory, name)
        if os.path.basename(name) != name:
            raise ArtifactError(f"manifest names a file outside the artifact: {name!r}", path=directory)
        if not os.path.isfile(path):
            raise ArtifactError("missing (the manifest lists it): copy the whole artifact directory", path=path)
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise ArtifactError(f"{size} bytes, the manifest says {entry['bytes']}: truncated or replaced; "
                                "copy the artifact again", path=path)
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError("sha256 differs from the manifest's: the file is corrupt; copy the artifact again",
                                path=path)
    if check_versions:
        here = stack_versions()
        for name, version in manifest.get("versions", {}).items():
            if name == "torchrec_genrec" or name not in here:
                continue
            if _major_minor(here[name]) != _major_minor(version):
                raise ArtifactError(
                    f"exported with {name} {version}, this install has {here[name]}: install "
                    f"{name}=={version} (requirements/) or export the run again with this install",
                    path=os.path.join(directory, MANIFEST))
    return manifest


def _configs(archive: zipfile.ZipFile, suffix: str) -> Iterable[Dict[str, Any]]:
    for name in archive.namelist():
        if name.endswith(suffix):
            yield name, json.loads(archive.read(name))


def check_exported_program_is_safe(path: str) -> None:
    """Refuses a ``torch.export`` archive whose loading would unpickle anything: pickled
    weights or constants, TorchScript / opaque objects, or sample inputs that
    ``torch.load(weights_only=True)`` rejects (``torch.export.load`` would then retry them
    with full unpickling).

    Raises:
        ArtifactError: naming the archive and the offending entry.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"not a torch.export archive ({e})", path=path) from e
    with archive:
        names = archive.namelist()
        if not any(n.endswith("_weights_config.json") for n in names):
            raise ArtifactError("no weights config: not a torch.export archive of this torch version", path=path)
        for config_name, config in _configs(archive, "_weights_config.json"):
            for fqn, meta in config.get("config", {}).items():
                if meta.get("use_pickle"):
                    raise ArtifactError(f"weight {fqn!r} is pickled ({config_name}); refusing to load it", path=path)
        for config_name, config in _configs(archive, "_constants_config.json"):
            for fqn, meta in config.get("config", {}).items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith("tensor_"):
                    raise ArtifactError(f"constant {fqn!r} is a pickled or custom object ({config_name}); "
                                        "refusing to load it", path=path)
        for name in names:
            if "/sample_inputs/" in name:
                payload = archive.read(name)
                if payload:
                    try:
                        torch.load(io.BytesIO(payload), weights_only=True)
                    except Exception as e:  # noqa: BLE001 - any failure means "not weights-only"
                        raise ArtifactError(f"sample inputs {name} need full unpickling ({type(e).__name__}); "
                                            "refusing to load them", path=path) from e

