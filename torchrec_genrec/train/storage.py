"""Checkpoint storage through iopath: local paths or any URI a registered handler serves.

``torch.distributed.checkpoint`` writes through a ``FileSystemBase``; :class:`IOPathFileSystem`
implements it on iopath's ``PathManager``, so checkpoints go wherever the project's
:data:`path_manager` can write (local disk out of the box; object stores or distributed
file systems once their iopath handler is registered). The small helpers below do the rest
of the checkpointer's file work (listing, renaming, removing, side files) the same way.

Example::

    from torchrec_genrec.train.storage import path_manager
    path_manager.register_handler(MyObjectStoreHandler())      # serves "mystore://"
    # then: genrec train ... --set train.checkpoint_dir=mystore://bucket/run1
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
from contextlib import contextmanager
from typing import Generator, List, Union

from iopath.common.file_io import PathManager
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

__all__ = ["IOPathFileSystem", "IOPathReader", "IOPathWriter", "path_manager", "is_local"]

#: The project's iopath PathManager: register handlers here for non-local checkpoint URIs.
path_manager = PathManager()

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: PathLike) -> str:
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else text


def join(path: PathLike, *parts: str) -> str:
    return os.path.join(_local(path), *parts) if is_local(path) else posixpath.join(str(path), *parts)


def exists(path: PathLike) -> bool:
    return os.path.exists(_local(path)) if is_local(path) else path_manager.exists(str(path))


def makedirs(path: PathLike) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    else:
        path_manager.mkdirs(str(path))


def listdir(path: PathLike) -> List[str]:
    if is_local(path):
        return os.listdir(_local(path)) if os.path.isdir(_local(path)) else []
    return path_manager.ls(str(path)) if path_manager.exists(str(path)) else []


def rename(path: PathLike, new_path: PathLike) -> None:
    if is_local(path):
        os.rename(_local(path), _local(new_path))
    else:
        path_manager.mv(str(path), str(new_path))


def rmtree(path: PathLike) -> None:
    if is_local(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    if not path_manager.exists(str(path)):
        return
    if path_manager.isdir(str(path)):
        for child in path_manager.ls(str(path)):
            rmtree(join(path, child))
        if path_manager.exists(str(path)):
            path_manager.rm(str(path))
    else:
        path_manager.rm(str(path))


def write_bytes(path: PathLike, data: bytes) -> None:
    with path_manager.open(str(path) if not is_local(path) else _local(path), "wb") as f:
        f.write(data)


def read_bytes(path: PathLike) -> bytes:
    with path_manager.open(str(path) if not is_local(path) else _local(path), "rb") as f:
        return f.read()


class IOPathFileSystem(FileSystemBase):
    """``torch.distributed.checkpoint`` file operations on :data:`path_manager`."""

    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with path_manager.open(str(path), mode) as stream:
            yield stream

    def concat_path(self, path: PathLike, suffix: str) -> str:
        return join(path, suffix)

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        rename(path, new_path)

    def init_path(self, path: PathLike) -> str:
        return str(path)

    def mkdir(self, path: PathLike) -> None:
        makedirs(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return True

    def exists(self, path: PathLike) -> bool:
        return exists(path)

    def rm_file(self, path: PathLike) -> None:
        path_manager.rm(str(path))


class IOPathWriter(FileSystemWriter):
    """A dcp ``StorageWriter`` that writes through :data:`path_manager`."""

    def __init__(self, path: PathLike) -> None:
        # fsync needs a real file descriptor: only local files have one.
        super().__init__(path, sync_files=is_local(path))
        self.fs = IOPathFileSystem()
        self.path = str(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return True


class IOPathReader(FileSystemReader):
    """A dcp ``StorageReader`` that reads through :data:`path_manager`."""

    def __init__(self, path: PathLike) -> None:
        super().__init__(path)
        self.fs = IOPathFileSystem()
        self.path = str(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return True
