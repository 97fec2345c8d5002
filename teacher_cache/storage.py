"""Filesystem access for caches: local paths and any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Writes go to a temporary name and are moved into place when complete, so a reader never sees a partial
file under its final name (on object stores the move is copy+delete, still never a partial final object).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """Return (filesystem, root path inside it, is_local) for a path or URI."""
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), os.path.abspath(uri), True


def join(root: str, rel: str) -> str:
    return f"{root}/{rel}" if root else rel


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(fs: pafs.FileSystem, path: str) -> int:
    return fs.get_file_info(path).size


def list_names(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Base names of the files directly inside ``directory`` (empty if it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.File]


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def sha256_file(fs: pafs.FileSystem, path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a move."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fs.move(tmp, path)


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    atomic_write(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    return json.loads(read_bytes(fs, path).decode())


def remove_temporaries(fs: pafs.FileSystem, directory: str) -> int:
    """Delete leftovers of interrupted writes (``*.tmp-*``) in ``directory``; returns how many."""
    if not exists(fs, directory):
        return 0
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
        if ".tmp-" in info.base_name:
            fs.delete_file(info.path)
            n += 1
    return n
