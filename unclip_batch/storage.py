"""Every path is an fsspec URL: local folders, s3://, gs://, memory:// ... all go through here."""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from unclip_batch.errors import StorageUnavailable

logger = logging.getLogger(__name__)

# An S3 endpoint restart or failover takes seconds; past this it is an outage: stop, resume later.
RETRY_FOR_S = 60.0
# Failures that retrying cannot fix: the object is not there, or we may not touch it.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
PARTIAL = "_partial"  # local staging folder under the output: whole files are renamed out of it


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


def is_web(url: str) -> bool:
    """Web URLs are data (a dead link is the row's problem); every other remote store is infrastructure."""
    return url.startswith(("http://", "https://"))


def retrying(action, what: str, retry_for_s: float = RETRY_FOR_S):
    """Run a storage call, retrying transient failures with backoff for up to ``retry_for_s`` seconds."""
    delay, deadline = 0.5, time.monotonic() + retry_for_s
    while True:
        try:
            return action()
        except PERMANENT:
            raise
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(f"{what} kept failing for {retry_for_s:.0f}s "
                                         f"({type(exc).__name__}: {exc}); rerun the same command to resume") from exc
            logger.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def write_whole(fs, path: str, data: bytes, root: str, retry_for_s: float = RETRY_FOR_S) -> None:
    """Write one object whole, so a crash never leaves a partial one under its final name.

    Object stores make a PUT atomic already. On a local disk the bytes go to ``<root>/_partial/`` first
    and are renamed into place; a resumed job empties that folder (see ``clear_partial``).
    """
    if isinstance(fs, LocalFileSystem):
        staging = os.path.join(root, PARTIAL)  # always the output's: clear_partial empties only that one
        os.makedirs(staging, exist_ok=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(staging, uuid.uuid4().hex)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        retrying(lambda: fs.pipe_file(path, data), f"writing {path}", retry_for_s)


def write_many(fs, objects: dict[str, bytes], root: str, retry_for_s: float = RETRY_FOR_S) -> None:
    """Write several whole objects; object stores get them concurrently (fsspec's async pipe)."""
    if not objects:
        return
    if isinstance(fs, LocalFileSystem):
        for path, data in objects.items():
            write_whole(fs, path, data, root)
    else:  # one round of concurrent PUTs instead of one round trip per object
        retrying(lambda: fs.pipe(objects), f"writing {len(objects)} objects under {root}", retry_for_s)


def clear_partial(fs, root: str) -> None:
    """Remove what a killed run left half-written (local outputs only; object stores have none)."""
    staging = join(root, PARTIAL)
    if isinstance(fs, LocalFileSystem) and fs.exists(staging):
        fs.rm(staging, recursive=True)
