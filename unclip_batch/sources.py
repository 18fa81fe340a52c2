"""Source stage: fetch and decode source images and masks, so the model never waits on storage.

Works on a plain dict batch (the row columns); adds ``pixels`` (uint8 height x width x 3 bytes, resized
to the row's size), ``repaint`` (uint8 height x width bytes, 1 = repaint), ``pixels2`` (an interpolation's
second image) and ``load_s``.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image, ImageOps

from unclip_batch import storage
from unclip_batch.batches import empty_pixels, mark_error, rows_of, to_batch
from unclip_batch.errors import RowError, StorageUnavailable

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller sources carry no usable content after resizing
MAX_PIXELS = 64_000_000  # ~8k x 8k; PIL warns at 89M and raises at twice that: a bomb guard well below either
MASK_THRESHOLD = 128  # grey values >= this repaint (anti-aliased mask edges count as their nearer side)


def load_sources(batch: dict, storage_options: dict | None = None, retry_for_s: float = storage.RETRY_FOR_S) -> dict:
    """Add decoded source pixels and repaint masks to every row that needs them."""
    rows = rows_of(batch)
    for row in rows:
        start = time.perf_counter()
        row["pixels"], row["repaint"] = empty_pixels()
        row["pixels2"] = b""
        if not row["code"] and row["task"] != "generate":
            try:
                row["pixels"], row["repaint"], row["pixels2"] = _load_row(row, storage_options, retry_for_s)
            except RowError as err:
                mark_error(row, "load", err.code, err.message)
        row["load_s"] = time.perf_counter() - start
    return to_batch(rows)


def _load_row(row: dict, storage_options: dict | None, retry_for_s: float) -> tuple[bytes, bytes, bytes]:
    """(pixels, repaint, pixels2) of a row: its image, inpaint mask, interpolation's second image."""
    size = (int(row["width"]), int(row["height"]))
    if row["task"] == "interpolate":  # each end an image or a prompt
        ends = [
            _rgb(open_image(row[name], name, storage_options, retry_for_s), size).tobytes() if row[name] else b""
            for name in ("image", "image2")
        ]
        return ends[0], b"", ends[1]
    image = open_image(row["image"], "image", storage_options, retry_for_s)
    if row["task"] in ("variation", "text_diff"):
        return _rgb(image, size).tobytes(), b"", b""
    if row["mask"]:
        mask = open_image(row["mask"], "mask", storage_options, retry_for_s)
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


def open_image(url: str, what: str, storage_options: dict | None, retry_for_s: float) -> Image.Image:
    try:
        fs, path = storage.filesystem(url, storage_options)
        if storage.is_web(url):  # a dead link is the row's problem: no retries
            data = fs.cat_file(path)
        else:  # object storage is infrastructure: retry, then stop the job (StorageUnavailable)
            data = storage.retrying(lambda: fs.cat_file(path), f"reading {url}", retry_for_s)
    except FileNotFoundError:
        raise RowError("image_unreadable", f"{what} {url} does not exist") from None
    except PermissionError as exc:
        raise RowError("image_unreadable", f"{what} {url}: access denied ({exc})") from None
    except StorageUnavailable:
        raise
    except Exception as exc:  # a bad URL, a dead web host: say what happened
        raise RowError("image_unreadable", f"{what} {url} could not be read: {type(exc).__name__}: {exc}") from None
    if not data:
        raise RowError("image_invalid", f"{what} {url} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise RowError(
                "image_too_large", f"{what} {url} is {image.width}x{image.height}; the limit is {MAX_PIXELS:,} pixels"
            )
        image.load()
    except RowError:
        raise
    except Image.DecompressionBombError:
        raise RowError("image_too_large", f"{what} {url} has more pixels than the limit") from None
    except Exception as exc:
        raise RowError("image_invalid", f"{what} {url} is not a readable image: {exc}") from None
    if min(image.size) < MIN_SIDE:
        raise RowError(
            "image_too_small", f"{what} {url} is {image.width}x{image.height}; each side must be at least {MIN_SIDE} px"
        )
    return ImageOps.exif_transpose(image)


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
