"""Every path is an fsspec URL: local folders, s3://, gs://, memory:// ... all go through here."""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a URL; storage options apply to remote protocols only."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = {} if protocol in ("file", "local") else dict(storage_options or {})
    return fsspec.core.url_to_fs(url, **options)


def join(base: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the protocol of ``base``."""
    return posixpath.join(base.rstrip("/"), *parts)


def resolve(value: str, folder: str) -> str:
    """A source reference as written in a manifest -> a URL; relative paths are relative to ``folder``."""
    if "://" in value or value.startswith("/"):
        return value
    return join(folder, value)


def write_whole(fs, path: str, data: bytes) -> None:
    """Write one object whole, so a crash never leaves a partial one under its final name.

    Object stores make a PUT atomic already; on a local disk we write a temporary file and rename it.
    """
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
