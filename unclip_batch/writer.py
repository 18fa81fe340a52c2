"""Write stage and output files.

``write_images`` is the CPU stage after the model: it stores each image through the output format's
writer (``FORMATS``; ``files``: a PNG object per image, whole, under a deterministic key).
``ShardWriter`` runs in the driver and turns finished rows into ``metadata/*.parquet`` and
``errors/*.parquet`` shards; ``_SUCCESS`` is written last of all.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import uuid
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unclip_batch import sampling, storage
from unclip_batch.batches import image_of, mark_error, rows_of, to_batch

logger = logging.getLogger(__name__)

ARROW = {int: pa.int32(), float: pa.float64()}
PARAMETERS = pa.struct([(name, ARROW[sampling.KINDS[name]]) for name in sampling.PARAMETERS])
TIMINGS = pa.struct([("load_s", pa.float64()), ("model_s", pa.float64()), ("write_s", pa.float64())])
METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("k", pa.int32()),
        ("task", pa.string()),
        ("image_key", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("image", pa.string()),
        ("mask", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("clip_score", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("parameters", PARAMETERS),
        ("timings", TIMINGS),
        ("input_hash", pa.string()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("stage", pa.string()),
        ("code", pa.string()),
        ("message", pa.string()),
        ("input_hash", pa.string()),
    ]
)


def image_key(row_id: str, k: int) -> str:
    """Output key of image k of a row. Ids are validated ([A-Za-z0-9._-], no leading '.'), so a key
    can never leave the output folder."""
    return f"images/{row_id}/{k}.png"


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageWriter(Protocol):
    """One output format's way of storing images: the write stage, on CPU workers beside the model.
    ``write`` stores each row's pixels and sets its ``image_key`` and ``sha256`` (or marks it failed);
    a storage failure is not the row's fault: it is retried, then fails the job (which resumes later)."""

    def __init__(self, *, output: str, storage_options: dict | None, retry_for_s: float): ...

    def write(self, rows: list[dict]) -> None: ...


class FilesWriter:
    """``images/<id>/<k>.png``: one PNG object per image, written whole under a deterministic key."""

    def __init__(self, *, output: str, storage_options: dict | None = None, retry_for_s: float = storage.RETRY_FOR_S):
        self.fs, self.root = storage.filesystem(output, storage_options)
        self.retry_for_s = retry_for_s

    def write(self, rows: list[dict]) -> None:
        objects = {}
        for row in rows:
            row["image_key"], row["sha256"] = "", ""
            if row["code"]:
                continue
            try:
                data = encode_png(image_of(row))
            except Exception as exc:
                mark_error(row, "write", "write_failed", f"{type(exc).__name__}: {exc}")
            else:
                row["image_key"] = image_key(row["id"], int(row["k"]))
                row["sha256"] = hashlib.sha256(data).hexdigest()
                objects[storage.join(self.root, row["image_key"])] = data
        storage.write_many(self.fs, objects, self.root, self.retry_for_s)


# Output formats by name: the pipeline asks for one and knows nothing of how it stores images.
FORMATS: dict[str, type[ImageWriter]] = {"files": FilesWriter}


def write_images(
    batch: dict,
    output: str,
    format: str = "files",
    storage_options: dict | None = None,
    retry_for_s: float = storage.RETRY_FOR_S,
) -> dict:
    """The write stage: store every generated image in the output's format; pixels are replaced by the
    image's key and checksum."""
    rows = rows_of(batch)
    start = time.perf_counter()
    FORMATS[format](output=output, storage_options=storage_options, retry_for_s=retry_for_s).write(rows)
    per_row = (time.perf_counter() - start) / max(len(rows), 1)
    for row in rows:
        del row["pixels"]
        row["write_s"] = per_row
    return to_batch(rows)


class ShardWriter:
    """Buffers finished records and writes them as Parquet shards (whole objects, unique names).

    ``lookup`` is the manifest table (all rows, indexed by position): the bookkeeping and
    carried-through columns are taken from it, so they keep their exact Arrow types.
    """

    def __init__(
        self,
        *,
        output: str,
        folder: str,
        schema: pa.Schema,
        lookup: pa.Table,
        storage_options: dict | None = None,
        rows_per_shard: int = 10_000,
        flush_every_s: float = 30.0,
        retry_for_s: float = storage.RETRY_FOR_S,
    ):
        self.fs, self.root = storage.filesystem(output, storage_options)
        self.folder = storage.join(self.root, folder)
        self.retry_for_s = retry_for_s
        self.schema, self.lookup = schema, lookup
        # Rows are "done" for a resume only once their shard is stored: flush by size and by time, so a
        # crash costs at most flush_every_s of work however slow the job.
        self.rows_per_shard, self.flush_every_s = rows_per_shard, flush_every_s
        self.last_flush = time.monotonic()
        self.run = uuid.uuid4().hex[:12]  # shards of different runs never collide
        self.records: list[dict] = []
        self.shards = 0
        self.written = 0

    def add(self, records: list[dict]) -> None:
        self.records.extend(records)
        if len(self.records) >= self.rows_per_shard or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.records:
            return
        table = pa.Table.from_pylist(
            [{f: r.get(f) for f in self.schema.names} for r in self.records], schema=self.schema
        )
        carried = self.lookup.take(pa.array([r["row"] for r in self.records], pa.int64()))
        for name in carried.column_names:
            table = table.append_column(name.lstrip("_"), carried[name])
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = storage.join(self.folder, f"part-{self.run}-{self.shards:05d}.parquet")
        storage.write_whole(self.fs, path, buffer.getvalue(), self.root, self.retry_for_s)
        self.shards += 1
        self.written += len(self.records)
        self.records = []


def metadata_record(row: dict, model: str) -> dict:
    return {
        **{
            k: row[k]
            for k in (
                "id",
                "k",
                "task",
                "image_key",
                "prompt",
                "negative_prompt",
                "image",
                "mask",
                "seed",
                "width",
                "height",
                "sha256",
                "row",
                "input_hash",
            )
        },
        "clip_score": None if math.isnan(row["clip_score"]) else row["clip_score"],  # NaN between stages
        # float32 bytes between stages; values through numpy, so each is the model's float32 exactly
        "embedding": np.frombuffer(row["embedding"], np.float32).tolist() if row.get("embedding") else None,
        "model": model,
        "parameters": {k: row[k] for k in PARAMETERS.names},
        "timings": {k: row[k] for k in TIMINGS.names},
    }


def write_json(output: str, name: str, payload: dict, storage_options: dict | None = None) -> None:
    fs, root = storage.filesystem(output, storage_options)
    data = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    storage.write_whole(fs, storage.join(root, name), data, root)
