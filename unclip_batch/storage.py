"""Every path is an fsspec URL: local folders, s3://, gs://, memory:// ... all go through here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import json
import logging
import mimetypes
import os
import posixpath
import shutil
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


# Protocols by the store they name: options given for one of a family apply to all of it, and to no other.
FAMILIES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az", "adl": "az"}
FAMILIES.update({"http": "http", "https": "http", "file": "file", "local": "file"})


def family(url: str) -> str:
    """The store a URL names: file, s3, gs, az, http, or its own protocol (``memory``, ``webhdfs`` ...)."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return FAMILIES.get(protocol, protocol)


def redact(url: str) -> str:
    """A URL fit for a log line, a message or a page: no user:password@, no query (pre-signed URLs carry
    their signature there)."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    path, question, _ = path.partition("?")
    return f"{scheme}://{authority}{slash}{path}" + ("?..." if question else "")


def resolve(value: str, folder: str) -> str:
    """A source reference as written in a manifest -> a URL; relative paths are relative to ``folder``."""
    return value if "://" in value else posixpath.join(folder, value)  # an absolute path replaces the folder


def local_path(url: str) -> str | None:
    """The local path a URL names (a plain path or file://), or None for a remote URL."""
    if "://" not in url:
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


class Location:
    """A storage location: a root URL and the options (credentials) bound to it, built once and passed down.

    Every path is joined below the root, literally: a part that is absolute, empty, ``.`` or ``..`` is
    refused, and nothing is ever glob-expanded (fsspec's ``rm``, ``cat`` and ``expand_path`` read ``[``,
    ``*`` and ``?`` as patterns: a job into ``run[1]`` would read or delete ``run1``). A root that names
    no place of its own (empty, ``/``, a bare ``s3://``) is refused. The options are the credentials of
    this store: they are no field of any dataclass (Ray Data exports its operators' arguments, dataclasses
    as dicts), never in a repr, and a Location of another store never gets them (see ``Stores``)."""

    def __init__(self, url: str, options: dict | None = None):
        url = str(url)
        protocol = fsspec.core.split_protocol(url)[0]
        bare = url.split("://", 1)[1] if "://" in url else url
        if not bare.strip("/") or "::" in url or any(part in (".", "..") for part in bare.split("/")):
            raise ValueError(
                f"{url!r} names no folder of its own (an empty path, '/', or a store with no bucket: an unset "
                "variable?); give a folder such as s3://bucket/run1 or /data/run1"
            )
        self.url = url.rstrip("/")
        self.family = family(url)
        self._options = {} if self.family == "file" else dict(options or {})
        self._fs = None
        if protocol is None and not os.path.isabs(url):
            self.url = os.path.abspath(url)

    def __repr__(self) -> str:
        return f"Location({redact(self.url)!r})"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.url, self._options) == (other.url, other._options)

    def __hash__(self) -> int:
        return hash(self.url)  # pragma: no mutate (any hash that equal Locations share is correct; this one spreads)

    def __deepcopy__(self, memo):  # immutable; and a copy would have to copy the options
        return self

    def __getstate__(self):
        return {"url": self.url, "family": self.family, "_options": self._options, "_fs": None}

    def __setstate__(self, state):
        for key, value in state.items():
            setattr(self, key, value)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = fsspec.core.url_to_fs(self.url, **self._options)
        return self._fs

    @property
    def root(self) -> str:
        """The root as its filesystem names it."""
        self.fs  # noqa: B018 (sets _root)
        return self._root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of a file or folder below the root (parts joined with '/', each checked)."""
        return posixpath.join(self.root, *_checked(parts))

    def url_of(self, *parts: str) -> str:
        return "/".join((self.url, *_checked(parts)))

    def relative(self, path: str) -> str:
        """A filesystem path below the root, relative to it (a path outside is a ValueError)."""
        rel = posixpath.relpath(path, self.root)
        if rel == "." or rel.startswith("../") or rel == "..":
            raise ValueError(f"{path} is not below {redact(self.url)}")
        return rel

    def files(self, *parts: str) -> list[str]:
        """Every file below a folder (relative to the root, sorted), asked of the store (no cached listing)."""
        path = self.path(*parts)
        self.fs.invalidate_cache(path)  # pragma: no mutate (forgetting every listing lists the same)
        if not self.fs.exists(path):
            return []
        # A store with real folders (SeaweedFS) may list an emptied folder as an object of the folder's own name.
        return sorted(self.relative(p) for p in self.fs.find(path) if p.rstrip("/") != path)

    def top(self) -> list[str]:
        """The names directly under the root (files and folders); [] where there is no root yet."""
        self.fs.invalidate_cache(self.root)  # pragma: no mutate (forgetting every listing lists the same)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def read(self, *parts: str) -> bytes:
        """One object whole (FileNotFoundError where there is none)."""
        return read_whole(self.fs, self.path(*parts))

    def write(self, relative: str, data: bytes, retry_for_s: float = RETRY_FOR_S) -> None:
        write_whole(self.fs, self.path(relative), data, self.root, retry_for_s)

    def write_many(self, objects: dict[str, bytes], retry_for_s: float = RETRY_FOR_S) -> None:
        """Several whole objects by path relative to the root."""
        paths = {self.path(key): data for key, data in objects.items()}
        write_many(self.fs, paths, self.root, retry_for_s)

    def remove(self, *parts: str, retry_for_s: float = RETRY_FOR_S) -> None:
        """Remove a file, or a folder and everything below it, if it is there: each file by its literal
        name (listed first), never a pattern."""
        path = self.path(*parts)

        def listed() -> list[str]:
            self.fs.invalidate_cache(path)  # pragma: no mutate (forgetting every listing lists the same)
            if self.fs.isfile(path):
                return [path]
            return self.fs.find(path) if self.fs.exists(path) else []

        remove_files(self.fs, retrying(listed, f"listing {redact(path)}", retry_for_s), retry_for_s)
        if self.is_local and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # the folders left empty

    def remove_files(self, relatives: list[str], retry_for_s: float = RETRY_FOR_S) -> None:
        """Remove files that may or may not be there (paths relative to the root), without listing."""
        remove_files(self.fs, [self.path(r) for r in relatives], retry_for_s)


def _checked(parts) -> list[str]:
    """Path parts as written, each split at '/', refusing any that would leave the folder it is joined to."""
    out = []
    for part in parts:
        for piece in str(part).split("/"):
            if piece in ("", ".", "..") or "\\" in piece or "\x00" in piece:
                raise ValueError(f"path part {part!r} would not stay below its folder")
            out.append(piece)
    return out


class Stores:
    """The job's storage options and the stores they were given for: the output's, the manifests' and the
    model's, when those are remote. A Location of one of those stores gets the options; any other (a
    manifest row's http:// source, another cloud) gets none. Never printed."""

    def __init__(self, options: dict | None, urls=()):
        self._options = dict(options or {})
        self.families = frozenset(family(u) for u in urls)  # a local Location takes no options anyway

    def __repr__(self) -> str:
        return f"Stores({sorted(self.families)})"

    def __deepcopy__(self, memo):
        return self

    def location(self, url: str) -> Location:
        return Location(url, self._options if family(url) in self.families else None)


def retrying(action, what: str, retry_for_s: float = RETRY_FOR_S):
    """Run a storage call, retrying transient failures with backoff for up to ``retry_for_s`` seconds."""
    delay, deadline = 0.5, time.monotonic() + retry_for_s
    while True:
        try:
            return action()
        except Exception as exc:
            if permanent(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"{what} kept failing for {retry_for_s:.0f}s "
                    f"({type(exc).__name__}: {exc}); rerun the same command to resume"
                ) from exc
            logger.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def permanent(exc: BaseException) -> bool:
    """Whether retrying cannot fix a failure: the object is not there, we may not touch it, or the request
    itself is malformed (botocore refuses an invalid bucket name before sending anything)."""
    if isinstance(exc, PERMANENT):
        return True
    names = {kind.__name__ for kind in type(exc).__mro__}
    return bool(names & {"ParamValidationError", "InvalidURL", "NoCredentialsError"})


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
        write_many(fs, {path: data}, root, retry_for_s)  # through obstore where it can


def read_whole(fs, path: str) -> bytes:
    """One object's bytes, in one GET: through obstore on S3 where the options allow (s3fs signs and
    sends in Python, and its ``open`` asks for the object's details first), else the filesystem's own.
    A missing object is FileNotFoundError either way. No retries here: callers say what to retry."""
    store = _store_for(fs, path)
    if store is None:
        return fs.cat_file(path)
    import obstore

    try:
        return bytes(obstore.get(store, fs.split_path(path)[1]).bytes())
    except Exception as exc:
        raise _builtin(exc) from exc


def write_many(fs, objects: dict[str, bytes], root: str, retry_for_s: float = RETRY_FOR_S) -> None:
    """Write several whole objects; object stores get them concurrently.

    S3 PUTs go through obstore (Rust's object_store) where the output's options are ones it understands:
    s3fs builds and signs each request in Python, several times obstore's CPU per small object
    (benchmarks/README.md). Anything else goes through fsspec's async pipe.
    """
    if not objects:
        return
    what = f"writing {len(objects)} objects under {root}"
    if isinstance(fs, LocalFileSystem):
        for path, data in objects.items():
            write_whole(fs, path, data, root)
    elif (store := _store_for(fs, root)) is not None:
        pending = {fs.split_path(path)[1]: data for path, data in objects.items()}
        retrying(lambda: _put_all(store, pending), what, retry_for_s)
    else:  # one round of concurrent PUTs instead of one round trip per object
        retrying(lambda: fs.pipe(objects), what, retry_for_s)


# S3 options obstore is given the same meaning of; an output with any other option (ACLs, encryption,
# addressing style ...) keeps the s3fs path, which honours them all.
S3_OPTIONS = {"key", "secret", "token", "anon", "endpoint_url", "profile", "use_ssl", "client_kwargs"}
S3_CLIENT_OPTIONS = {"endpoint_url", "region_name"}
PUT_CONCURRENCY = 64  # PUTs in flight per write task; s3fs's pipe batches similarly
# obstore's own retries stay short: `retrying` decides when an outage is one (RETRY_FOR_S).
OBSTORE_RETRY = {"max_retries": 2, "retry_timeout": dt.timedelta(seconds=10)}


def s3_store(fs, bucket: str):
    """An obstore S3Store for a bucket of an s3fs filesystem, or None where obstore cannot stand in."""
    if type(fs).__module__.split(".")[0] != "s3fs":
        return None
    options = fs.storage_options
    if set(options) - S3_OPTIONS or set(options.get("client_kwargs") or {}) - S3_CLIENT_OPTIONS:
        return None
    return _s3_store(json.dumps(options, sort_keys=True, default=str), bucket)


def _store_for(fs, path: str):
    """s3_store for the bucket of ``path`` (None for filesystems without buckets: local, memory)."""
    split = getattr(fs, "split_path", None)
    return s3_store(fs, split(path)[0]) if split else None


@functools.lru_cache(maxsize=16)
def _s3_store(options: str, bucket: str):
    from obstore.store import S3Store

    options = json.loads(options)
    client = options.get("client_kwargs") or {}
    endpoint = (
        options.get("endpoint_url")
        or client.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )  # botocore's order
    config = {
        "region": client.get("region_name")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or _bucket_region(options, bucket, endpoint)
    }
    if config["region"] is None:
        return None
    if endpoint:
        config["endpoint"] = endpoint
    provider = None
    if options.get("anon"):
        config["skip_signature"] = True
    else:
        provider = _Credentials(options)
        if provider.credentials is None:
            return None  # no credentials found: s3fs gives the error it always gave
    return S3Store(
        bucket,
        config=config,
        credential_provider=provider,
        retry_config=OBSTORE_RETRY,
        client_options={"allow_http": True},
    )


def _bucket_region(options: dict, bucket: str, endpoint: str | None) -> str | None:
    """The bucket's region, as AWS tells it (a custom endpoint with no region named: us-east-1)."""
    if endpoint:
        return "us-east-1"  # what botocore signs with when no region is named
    import s3fs

    try:
        fs = s3fs.S3FileSystem(**options)
        answer = fs.call_s3("head_bucket", Bucket=bucket)
        return answer["ResponseMetadata"]["HTTPHeaders"].get("x-amz-bucket-region")
    except Exception as exc:  # e.g. no s3:ListBucket permission: s3fs finds its way alone
        logger.info("region of bucket %s not found (%s); writing through s3fs", bucket, exc)
        return None


class _Credentials:
    """obstore credential provider over botocore's chain, so obstore finds the same credentials s3fs does
    (options, environment, profile, instance role); temporary ones are renewed by botocore."""

    RECHECK = dt.timedelta(minutes=5)

    def __init__(self, options: dict):
        import botocore.credentials
        import botocore.session

        if options.get("key"):
            self.credentials = botocore.credentials.Credentials(
                options["key"], options.get("secret"), options.get("token")
            )
        else:
            self.credentials = botocore.session.Session(profile=options.get("profile")).get_credentials()

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        refreshing = hasattr(self.credentials, "refresh_needed")
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": dt.datetime.now(dt.UTC) + self.RECHECK if refreshing else None,
        }


def _run_async(coroutine_function):
    """asyncio.run, also where this thread already runs an event loop (a notebook, a browser driver): then
    in a thread of its own, as asyncio.run cannot nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_function())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_function())).result()


def _put_all(store, pending: dict[str, bytes]) -> None:
    """PUT every pending object concurrently; the ones stored are taken out of ``pending``, so a retry
    sends only the rest. Raises the first failure as the built-in error ``retrying`` understands."""
    import obstore

    async def put(key: str, data: bytes, slots: asyncio.Semaphore):
        content_type = mimetypes.guess_type(key)[0]
        async with slots:
            await obstore.put_async(
                store, key, data, attributes={"Content-Type": content_type} if content_type else None
            )

    async def put_all():
        slots = asyncio.Semaphore(PUT_CONCURRENCY)
        return await asyncio.gather(*(put(key, data, slots) for key, data in pending.items()), return_exceptions=True)

    keys = list(pending)
    failures = []
    for key, result in zip(keys, _run_async(put_all)):
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            del pending[key]
    if failures:
        raise _builtin(failures[0], f"{len(failures)} of {len(keys)} PUTs failed, first: ") from failures[0]


def _builtin(error: Exception, prefix: str = "") -> OSError:
    """An obstore error as the built-in error ``retrying`` understands: permissions and a missing bucket
    are permanent, anything else may pass."""
    from obstore import exceptions

    reason = str(error).split("\n")[0]  # obstore's next lines are a debug dump
    if isinstance(error, (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError, PermissionError)):
        return PermissionError(reason)
    if isinstance(error, (exceptions.NotFoundError, FileNotFoundError)):  # no such object (GET), or bucket (PUT)
        return FileNotFoundError(reason)
    return OSError(prefix + reason)


def remove_files(fs, paths: list[str], retry_for_s: float = RETRY_FOR_S) -> None:
    """Remove files that may or may not be there, through a short outage as writes are, without listing
    anything (``Location.remove`` lists a folder first): S3 gets one DeleteObjects request per
    1,000 keys, through obstore where the options allow (it raises on a key it could not delete, where
    s3fs's bulk delete says nothing)."""
    if not paths:
        return
    what = f"removing {len(paths)} files under {posixpath.dirname(paths[0])}"
    store = _store_for(fs, paths[0])
    if store is not None:
        retrying(lambda: _delete_all(store, [fs.split_path(p)[1] for p in paths]), what, retry_for_s)
    else:
        retrying(lambda: _rm_files(fs, paths), what, retry_for_s)


def _delete_all(store, keys: list[str]) -> None:
    import obstore

    try:
        obstore.delete(store, keys)
    except Exception as exc:
        raise _builtin(exc) from exc


def _rm_files(fs, paths: list[str]) -> None:
    # fsspec's rm expands `*`, `?` and `[` as patterns: paths holding one are deleted one by one, by name.
    if not any(c in p for p in paths for c in "*?["):  # pragma: no mutate (one by one removes the same files, slower)
        try:
            fs.rm(list(paths))  # not recursive, so nothing is listed; s3fs and gcsfs delete in bulk
            return
        except FileNotFoundError:  # a filesystem that stops at a missing file: the rest one by one
            pass
    for path in paths:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def clear_partial(location: Location) -> None:
    """Remove what a killed run left half-written (local outputs only; object stores have none)."""
    if location.is_local and os.path.isdir(location.path(PARTIAL)):
        shutil.rmtree(location.path(PARTIAL), ignore_errors=True)
