"""Source stage: fetch and decode source images and masks, so the model never waits on storage.

Works on a plain dict batch (the row columns); adds ``pixels`` (uint8 height x width x 3 bytes, resized
to the row's size), ``repaint`` (uint8 height x width bytes, 1 = repaint), ``pixels2`` (an interpolation's
second image) and ``load_s``.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from unclip_batch import storage
from unclip_batch.batches import empty_pixels, mark_error, rows_of, to_batch
from unclip_batch.errors import RowError, StorageUnavailable

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller sources carry no usable content after resizing
MAX_PIXELS = 64_000_000  # ~8k x 8k; PIL warns at 89M and raises at twice that: a bomb guard well below either
MASK_THRESHOLD = 128  # grey values >= this repaint (anti-aliased mask edges count as their nearer side)
# A source's bytes are read up to this many: a 64 Mpx (MAX_PIXELS) 16-bit RGBA image stored raw is 512 MB.
# An endless HTTP body, /dev/zero or a 10 GB object stops here, as the row's error.
MAX_SOURCE_BYTES = 512 << 20
# What a row may name: the local disk (from a local manifest), the object stores, and the web.
SOURCE_STORES = ("file", "s3", "gs", "az", "http")
# Pillow decodes these and nothing else (its other plugins include EPS, which runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# A source given as bytes in a row's column (the Python processor), not by URL: its URL is this, and the bytes
# ride in the row as ``<name>_bytes``. A manifest naming such a URL gets source_not_allowed at load.
BYTES_URL = "column://"
HTTP_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
# Cloud metadata services: a row's http:// source must not reach them (they hand out the node's credentials).
METADATA_HOSTS = ("metadata", "metadata.google.internal", "metadata.goog")
METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}


@dataclass(frozen=True)
class SourcePolicy:
    """How a row's sources are read: which credentials go where (``stores``: the job's stores alone get
    the job's options), how many bytes at most, and how long object storage is retried."""

    stores: storage.Stores = field(default_factory=lambda: storage.Stores(None))  # default: no credentials
    max_bytes: int = MAX_SOURCE_BYTES
    retry_for_s: float = storage.RETRY_FOR_S


def check_source(url: str, manifest_folder: str) -> None:
    """Refuse a source a row may not name (``source_not_allowed``): a protocol other than the local disk,
    s3/gs/az and http(s); a local file named by a manifest that is not itself local. (``column://``: bytes
    the processor holds in the row; anywhere else it fails at load.)"""
    where = storage.family(url)
    if url.startswith(BYTES_URL):
        return
    if where not in SOURCE_STORES:
        raise RowError(
            "source_not_allowed",
            f"{storage.redact(url)}: a row's image or mask may be a local path, an s3://, gs:// or az:// "
            "object or an http(s):// URL, not a {where}:// URL",
        )
    if where == "file" and storage.family(manifest_folder) != "file":
        raise RowError(
            "source_not_allowed",
            f"{storage.redact(url)} is a local path, and this row's manifest is not on the local disk: name "
            "the source by URL, or by a path relative to the manifest",
        )


def load_sources(batch: dict, policy: SourcePolicy | None = None) -> dict:
    """Add decoded source pixels and repaint masks to every row that needs them."""
    rows, policy = rows_of(batch), policy or SourcePolicy()
    for row in rows:
        start = time.perf_counter()
        row["pixels"], row["repaint"] = empty_pixels()
        row["pixels2"] = b""
        if not row["code"] and row["task"] != "generate":
            try:
                row["pixels"], row["repaint"], row["pixels2"] = _load_row(row, policy)
            except RowError as err:
                mark_error(row, "load", err.code, err.message)
            except StorageUnavailable:
                raise
            except Exception as exc:  # a conversion of a decoded image: still this row's source's fault
                mark_error(row, "load", "image_invalid", f"a source could not be converted: {type(exc).__name__}")
        row["load_s"] = time.perf_counter() - start
    return to_batch(rows)


def _load_row(row: dict, policy: SourcePolicy) -> tuple[bytes, bytes, bytes]:
    """(pixels, repaint, pixels2) of a row: its image, inpaint mask, interpolation's second image."""
    size = (int(row["width"]), int(row["height"]))
    if row["task"] == "interpolate":  # each end an image or a prompt
        ends = [_rgb(_open(row, name, policy), size).tobytes() if row[name] else b"" for name in ("image", "image2")]
        return ends[0], b"", ends[1]
    image = _open(row, "image", policy)
    if row["task"] in ("variation", "text_diff"):
        return _rgb(image, size).tobytes(), b"", b""
    if row["mask"]:
        mask = _open(row, "mask", policy)
        if mask.size != image.size:
            raise RowError(
                "mask_size_mismatch",
                f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]}; they must match",
            )
        repaint = np.asarray(_grey(mask).resize(size, Image.NEAREST)) >= MASK_THRESHOLD
        if not repaint.any():
            raise RowError("mask_empty", "the mask is all black: paint white where the image should change")
    else:
        alpha = _alpha(image)
        if alpha is None:
            raise RowError(
                "missing_mask",
                "inpaint needs a mask, or an RGBA image whose transparent pixels mark the area to repaint",
            )
        # OpenAI's edit convention: transparent pixels are repainted.
        repaint = np.asarray(alpha.resize(size, Image.NEAREST)) < MASK_THRESHOLD
        if not repaint.any():
            raise RowError(
                "mask_empty",
                "the image has no transparent pixel, so nothing would be repainted; "
                "make the area to change transparent or give a mask",
            )
    return _rgb(image, size).tobytes(), repaint.astype(np.uint8).tobytes(), b""


def _open(row: dict, name: str, policy: SourcePolicy) -> Image.Image:
    data = row.get(f"{name}_bytes")
    if data and row[name] == BYTES_URL + name:
        _cap(data, f"{name} (bytes)", policy.max_bytes)
        return decode_image(data, f"{name} (bytes)")
    return open_image(row[name], name, policy)


def open_image(url: str, what: str, policy: SourcePolicy) -> Image.Image:
    """A source, fetched under the policy and decoded; every failure of it is a RowError with a stable code
    (an object store that stays away is StorageUnavailable: the job stops, and resumes later)."""
    shown = f"{what} {storage.redact(url)}"
    return decode_image(fetch(url, shown, policy), shown)


def decode_image(data: bytes, shown: str) -> Image.Image:
    """A source's bytes as an image, by the allowed formats only; a RowError saying what is wrong."""
    if not data:
        raise RowError("image_invalid", f"{shown} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_PIXELS:
            raise RowError(
                "image_too_large", f"{shown} is {image.width}x{image.height}; the limit is {MAX_PIXELS:,} pixels"
            )
        image.load()
        if min(image.size) < MIN_SIDE:
            raise RowError(
                "image_too_small",
                f"{shown} is {image.width}x{image.height}; each side must be at least {MIN_SIDE} px",
            )
        return ImageOps.exif_transpose(image)
    except RowError:
        raise
    except Image.DecompressionBombError:
        raise RowError("image_too_large", f"{shown} has more pixels than the limit") from None
    except Exception as exc:
        raise RowError(
            "image_invalid", f"{shown} is not a readable image ({', '.join(IMAGE_FORMATS)}): {exc}"
        ) from None


def fetch(url: str, shown: str, policy: SourcePolicy) -> bytes:
    """A source's bytes, at most ``policy.max_bytes``: the web without credentials and without retries (a
    dead link is the row's problem), object storage with the job's credentials where they were given for
    its store, retried through an outage."""
    where = storage.family(url)
    if where not in SOURCE_STORES:
        raise RowError("source_not_allowed", f"{shown}: rows may not read {where}:// URLs")
    try:
        if where == "http":
            return _http_get(url, shown, policy.max_bytes)
        if where == "file":
            return _read_local(storage.local_path(url), shown, policy.max_bytes)
        location = policy.stores.location(url)
        data = storage.retrying(
            lambda: location.fs.cat_file(location.root, start=0, end=policy.max_bytes + 1),
            f"reading {storage.redact(url)}",
            policy.retry_for_s,
        )
    except (RowError, StorageUnavailable):
        raise
    except FileNotFoundError:
        raise RowError("image_unreadable", f"{shown} does not exist") from None
    except PermissionError:
        raise RowError("image_unreadable", f"{shown}: access denied") from None
    except Exception as exc:  # a bad URL, a bucket name the store refuses: say what happened
        reason = storage.redact(str(exc).splitlines()[0] if str(exc) else "")[:300]
        raise RowError("image_unreadable", f"{shown} could not be read: {type(exc).__name__}: {reason}") from None
    _cap(data, shown, policy.max_bytes)
    return data


def _cap(data: bytes, shown: str, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise RowError("image_too_large", f"{shown} is larger than {max_bytes:,} bytes (--max-source-bytes)")


def _read_local(path: str, shown: str, max_bytes: int) -> bytes:
    """A local file, only if it is a regular file (not /dev/zero, a FIFO, a folder), up to the cap."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise RowError("image_unreadable", f"{shown} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    _cap(data, shown, max_bytes)
    return data


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # each hop is checked and followed by _http_get


def _http_get(url: str, shown: str, max_bytes: int) -> bytes:
    """GET a web source with no credentials, each redirect's host checked like the first, the body read up
    to the cap."""
    opener = urllib.request.build_opener(_NoRedirects)
    for _ in range(MAX_REDIRECTS + 1):
        _check_host(url, shown)
        request = urllib.request.Request(url, headers={"User-Agent": "unclip-batch"})
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                data = response.read(max_bytes + 1)
                _cap(data, shown, max_bytes)
                return data
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                url = urllib.parse.urljoin(url, exc.headers["Location"])
                if storage.family(url) != "http":
                    raise RowError(
                        "source_not_allowed", f"{shown} redirects to a {storage.family(url)}:// URL"
                    ) from None
                continue
            if exc.code == 404:
                raise FileNotFoundError(url) from None
            raise RowError("image_unreadable", f"{shown} could not be read: HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise RowError("image_unreadable", f"{shown} could not be read: {exc.reason}") from None
    raise RowError("image_unreadable", f"{shown}: more than {MAX_REDIRECTS} redirects")


def _check_host(url: str, shown: str) -> None:
    """Refuse a web source on a link-local or cloud-metadata address, by name and by every address the name
    resolves to."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
    if not host or host in METADATA_HOSTS:
        raise RowError("source_not_allowed", f"{shown}: host {host!r} may not be read")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise RowError("image_unreadable", f"{shown}: host {host} not found ({exc})") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if ip.is_link_local or ip in METADATA_ADDRESSES:
            raise RowError(
                "source_not_allowed", f"{shown}: host {host} is a link-local or cloud metadata address ({ip})"
            )


def _alpha(image: Image.Image) -> Image.Image | None:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        return image.getchannel("A")
    return None


def _grey(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit masks: scale to 8 bits, not clip
        scale = 65535 if image.mode.startswith("I;16") else max(1, int(np.asarray(image).max()))
        return Image.fromarray((np.asarray(image, dtype=np.float64) / scale * 255).astype(np.uint8))
    return image.convert("L")


def _rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if image.mode.startswith("I"):  # 16-bit greyscale: PIL's convert("RGB") would clip, not scale
        image = _grey(image)
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)
