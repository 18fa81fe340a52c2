"""Write stage, output formats and shard commits.

After the model, ``write_part`` (CPU tasks) encodes each image as PNG and hands a finished block's rows to
its output format's ``ImageWriter``: ``files`` stores a PNG object per image at once, the shard formats
keep the PNG bytes; either way the block's rows are stored whole as a part (``_parts/<shard>/<block>``).
``commit_shard`` (a task the driver starts when a shard's parts are in, and now and then before) merges
the parts with what earlier runs committed for the shard and writes the shard whole, in order: its data
(a WebDataset tar, or Parquet with image bytes), ``metadata/<shard>.parquet``, ``errors/<shard>.parquet``
and, once every row of the shard is recorded, ``<shard>_stats.json`` (img2dataset's convention; beside
the tars, else in ``stats/``): the mark a resume skips the shard by. ``_SUCCESS`` is written last of all.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tarfile
import time
import zlib
from collections import Counter
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from unclip_batch import sampling, storage
from unclip_batch.batches import image_of, mark_error
from unclip_batch.storage import Location, Stores

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
        ("candidate", pa.int32()),  # which of best_of candidates was kept (0 with best_of 1)
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
# Hugging Face's image feature: `datasets` decodes this column to PIL images (the other columns' features
# follow from their Arrow types).
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_FEATURES = json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()
ERROR_FIELDS = ("id", "task", "stage", "code", "message", "row", "input_hash")
# What each output column and stats field means: docs/outputs.md is generated from these and the schemas
# (docs/generate.py), and a test fails when a column has no line here.
COLUMN_DOCS = {
    "id": "the manifest row's id",
    "k": "which of the row's images, 0 .. num_images - 1 (an interpolation's frame)",
    "task": "generate, variation, inpaint, interpolate or text_diff",
    "image_key": "where the image is: images/<id>/<k>.png (files), shards/<shard>.tar#<key>.png (webdataset), "
    "data/<shard>.parquet#<key>.png (parquet)",
    "prompt": "the row's prompt (empty for a variation without one)",
    "negative_prompt": "the row's negative prompt",
    "image": "the source image's URL as resolved (variation, inpaint, text_diff, an interpolation's first end); "
    "source_image in the parquet format",
    "mask": "the mask's URL as resolved (inpaint)",
    "seed": "the image's own seed: seed + k (with best_of N, the kept candidate's: seed + k * N + c); every "
    "frame of an interpolation has the row's seed",
    "candidate": "which of best_of candidates was kept, from 0 (0 with best_of 1)",
    "width": "the image's width in pixels",
    "height": "the image's height in pixels",
    "sha256": "SHA-256 of the PNG's bytes",
    "clip_score": "cosine similarity of the image's CLIP image embedding and its prompt's text embedding in the "
    "model's own CLIP, in [-1, 1]; null without a prompt, or for a model without CLIP",
    "embedding": "the image's CLIP image embedding, float32, with --embeddings; else null (webdataset: <key>.npy "
    "instead of a JSON field)",
    "model": "the model spec the job ran",
    "parameters": "struct of the sampling settings used: steps, guidance, variation_strength, best_of",
    "timings": "struct of seconds per image: load_s, model_s, write_s (left out of the webdataset and parquet "
    "data files, so their bytes repeat)",
    "input_hash": "a fingerprint of the manifest row as written: a resume spots a row changed under its id",
    "stage": "where the row failed: validate, load, predict or write",
    "code": "a stable error code (docs/errors.md)",
    "message": "what went wrong and what to fix, in words",
    "manifest": "the manifest URL the row came from",
    "manifest_row": "the row's position in its manifest (a folder's files count on from each other)",
}
STATS_DOCS = {
    "shard": "the shard's name (00000 ...)",
    "manifest": "its manifest",
    "path": "its manifest file",
    "start": "its first row in the file",
    "stop": "the row after its last",
    "version": "the manifest file's size and ETag or mtime, when the shard was planned",
    "rows": "rows recorded",
    "succeeded": "rows with images",
    "failed": "rows recorded as errors",
    "images": "images",
    "failures_by_code": "error records by code",
    "complete": "every row recorded (always true in a stats file: it is written only then)",
}
# Every column some output format writes: the records' own, their place in the manifest (``_merge``), and the
# parquet format's image with the source URL renamed (ParquetWriter). manifest.RESERVED_COLUMNS derives from it.
OUTPUT_COLUMNS = frozenset(
    METADATA_SCHEMA.names + ERROR_SCHEMA.names + ["manifest", "manifest_row", "row", "source_image", "image"]
)


def image_key(row_id: str, k: int) -> str:
    """Output key of image k of a row in the files format. Ids are validated ([A-Za-z0-9._-], no leading
    '.'), so a key can never leave the output folder."""
    return f"images/{row_id}/{k}.png"


def sample_key(shard: str, position: int, k: int) -> str:
    """A WebDataset sample's key: unique across the dataset, and dot-free (WebDataset splits member names
    at the first dot, so ids, which may hold dots, cannot be keys)."""
    return f"{shard}_{position:06d}_{k:02d}"


def encode_png(pixels: np.ndarray) -> bytes:
    """zlib level 1 with its run-length strategy, OpenCV's PNG default, rather than Pillow's level 6: the
    same size within 0.1% on the embedded model's pictures and a 512 px photo, 2.4x and 3x faster
    (benchmarks/README.md, "PNG encoding")."""
    buffer = io.BytesIO()
    # Not mutated: zlib's run-length strategy ignores the level (any above 0), and Pillow reads format names in
    # any case.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)  # pragma: no mutate
    return buffer.getvalue()


class ImageWriter(Protocol):
    """One output format: how the write stage stores a block's images, and how a commit writes a shard.

    ``store`` (write stage, CPU workers beside the model) takes each row's PNG bytes: it stores them now
    (files) or leaves them in the row for the shard (``png``). ``write_shard`` (commit) writes the shard's
    data file from its metadata table, in order, with each image's PNG bytes. A storage failure is not the
    row's fault: it is retried, then fails the job (which resumes later)."""

    stats_folder: str  # where each shard's stats file goes

    def __init__(self, *, output: Location, retry_for_s: float): ...

    def store(self, rows: list[dict]) -> None: ...

    def image_key(self, shard: str, row: dict) -> str: ...

    def write_shard(self, shard: str, metadata: pa.Table, pngs: list[bytes]) -> None: ...

    def read_pngs(self, shard: str) -> dict[str, bytes]: ...


class _Writer:
    # Stats beside the shards (img2dataset's convention) where readers pick files by name (*.tar), else in a
    # folder of their own: pyarrow, pandas and duckdb read a Parquet folder whole and would choke on JSON.
    stats_folder = "stats"

    def __init__(self, *, output: Location, retry_for_s: float = storage.RETRY_FOR_S):
        self.output, self.retry_for_s = output, retry_for_s

    def store(self, rows: list[dict]) -> None:
        pass  # the PNG bytes stay in the rows, for the shard

    def _write(self, relative: str, data: bytes) -> None:
        self.output.write(relative, data, self.retry_for_s)


class FilesWriter(_Writer):
    """``images/<id>/<k>.png``: one PNG object per image, written whole under a deterministic key as soon
    as it is made; the shard is its metadata and errors alone."""

    def store(self, rows: list[dict]) -> None:
        objects = {r["image_key"]: r.pop("png") for r in rows if r["image_key"]}
        self.output.write_many(objects, self.retry_for_s)
        for row in rows:
            row["png"] = b""

    def image_key(self, shard: str, row: dict) -> str:
        return image_key(row["id"], int(row["k"]))

    def write_shard(self, shard: str, metadata: pa.Table, pngs: list[bytes]) -> None:
        pass

    def read_pngs(self, shard: str) -> dict[str, bytes]:
        return {}


class WebDatasetWriter(_Writer):
    """``shards/<shard>.tar``: each image a sample ``<key>.png`` + ``<key>.json`` (its metadata record,
    timings left out so the bytes repeat) + ``<key>.txt`` (the prompt), and with ``--embeddings``
    ``<key>.npy`` (the CLIP image embedding, float32, which WebDataset decodes to an array; then not in
    the JSON as well), in manifest order; the tar's headers are fixed (mtime 0, no owner), so a resumed
    job's tar is byte for byte an uninterrupted one's."""

    stats_folder = "shards"

    def image_key(self, shard: str, row: dict) -> str:
        return f"shards/{shard}.tar#{sample_key(shard, row['position'], int(row['k']))}.png"

    def write_shard(self, shard: str, metadata: pa.Table, pngs: list[bytes]) -> None:
        members = []
        for record, png in zip(metadata.drop_columns(["timings"]).to_pylist(), pngs):
            key = record["image_key"].partition("#")[2].removesuffix(".png")
            embedding = record.pop("embedding")
            text = json.dumps(record, ensure_ascii=False, default=str).encode()
            members += [(f"{key}.png", png), (f"{key}.json", text), (f"{key}.txt", (record["prompt"] or "").encode())]
            if embedding is not None:
                members.append((f"{key}.npy", npy_bytes(np.asarray(embedding, np.float32))))
        self._write(f"shards/{shard}.tar", tar_bytes(members))

    def read_pngs(self, shard: str) -> dict[str, bytes]:
        return shard_pngs(self.output, f"shards/{shard}.tar")


class ParquetWriter(_Writer):
    """``data/<shard>.parquet``: the metadata columns (timings left out, so the bytes repeat; the source
    URL ``image`` named ``source_image``) and an ``image`` column in Hugging Face's image layout, which
    ``datasets`` reads as PIL images."""

    def image_key(self, shard: str, row: dict) -> str:
        return f"data/{shard}.parquet#{sample_key(shard, row['position'], int(row['k']))}.png"

    def write_shard(self, shard: str, metadata: pa.Table, pngs: list[bytes]) -> None:
        keys = metadata["image_key"].combine_chunks()
        paths = pc.utf8_slice_codeunits(keys, len(f"data/{shard}.parquet#"))  # to the key's end
        image = pa.StructArray.from_arrays(
            [pa.array(pngs, pa.binary()), pc.cast(paths, pa.string())], fields=list(HF_IMAGE)
        )
        table = metadata.drop_columns(["timings"])
        # `image` is the picture here, as Hugging Face names it; the metadata's `image` (a variation's or
        # inpaint's source URL) is `source_image`.
        table = table.rename_columns(["source_image" if c == "image" else c for c in table.column_names])
        table = table.append_column("image", image)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"huggingface": HF_FEATURES})
        write_parquet(self.output, f"data/{shard}.parquet", table, self.retry_for_s)

    def read_pngs(self, shard: str) -> dict[str, bytes]:
        return shard_pngs(self.output, f"data/{shard}.parquet")


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as a ``.npy`` file (numpy's format: a fixed header, then the values)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A POSIX (ustar) tar of regular files with fixed headers (mode 644, mtime 0, no owner): the same
    members give the same bytes. Headers packed here: tarfile's own take ~0.5 ms each in Python, a third
    of a WebDataset shard's commit (py-spy, ceiling benchmark)."""
    out = []
    for name, data in members:
        header = bytearray(512)
        # Not mutated: names are sample keys (~20 bytes), so any pad and cut from 20 to 100 bytes agree.
        header[0:100] = name.encode().ljust(100, b"\0")[:100]  # pragma: no mutate
        header[100:108] = b"0000644\0"
        header[108:116] = header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % len(data)
        header[136:148] = b"00000000000\0"
        header[148:156] = b" " * 8  # the checksum counts its own field as spaces
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[148:156] = b"%06o\0 " % sum(header)
        out += [bytes(header), data, b"\0" * (-len(data) % 512)]
    out.append(b"\0" * 1024)  # end of archive
    return b"".join(out)


def shard_pngs(output: Location, file: str) -> dict[str, bytes]:
    """The PNGs in a shard file (``shards/<shard>.tar``, ``data/<shard>.parquet``) by image_key; none if
    there is no such file yet."""
    try:
        data = output.read(file)
    except FileNotFoundError:
        return {}
    if file.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {f"{file}#{m.name}": tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
    table = pq.read_table(io.BytesIO(data), columns=["image_key", "image"])
    return dict(zip(table["image_key"].to_pylist(), pc.struct_field(table["image"], "bytes").to_pylist()))


# Output formats by name: the pipeline asks for one and knows nothing of how it stores images.
FORMATS: dict[str, type[ImageWriter]] = {"files": FilesWriter, "webdataset": WebDatasetWriter, "parquet": ParquetWriter}


def part_path(shard: str, block: int | str) -> str:
    """A block's part, relative to the output."""
    return f"_parts/{shard}/{block}.parquet"


def write_part(
    rows: list[dict],
    *,
    shard: str,
    first: int,
    offset: int,
    block: int | str,
    output: Location,
    format: str = "files",
    retry_for_s: float = storage.RETRY_FOR_S,
) -> dict:
    """The write stage of one block: encode every generated image, store it in the output's format, and
    store the block's rows (pixels replaced by key, checksum and, for the shard formats, PNG bytes) as a
    part of its shard. Returns the block's counts for the driver."""
    start = time.perf_counter()
    writer = FORMATS[format](output=output, retry_for_s=retry_for_s)
    for row in rows:
        row["position"] = first + int(row["row"]) - offset  # manifest_row
        row["image_key"], row["sha256"], row["png"] = "", "", b""
        if row["code"]:
            continue
        try:
            row["png"] = encode_png(image_of(row))
        except Exception as exc:
            mark_error(row, "write", "write_failed", f"{type(exc).__name__}: {exc}")
        else:
            row["image_key"] = writer.image_key(shard, row)
            row["sha256"] = hashlib.sha256(row["png"]).hexdigest()
    writer.store(rows)
    per_row = (time.perf_counter() - start) / max(len(rows), 1)
    for row in rows:
        row.pop("pixels", None)
        row.pop("repaint", None)
        row["write_s"] = per_row
    if rows:
        write_parquet(output, part_path(shard, block), pa.Table.from_pylist(rows), retry_for_s)
    return block_counts(rows)


def block_counts(rows: list[dict]) -> dict:
    """Rows, images, candidates made and errors by code among a block's (or a part's) rows: a row with
    an error counts once, a row's images once each (and best_of candidates each); and the model's warm-ups
    among them (a compiled model's first call of a shape: predict.py), their count and seconds."""
    failed = {r["row"]: r["code"] for r in rows if r["code"]}
    images = sum(1 for r in rows if not r["code"])
    candidates = sum(int(r["best_of"]) for r in rows if not r["code"])
    succeeded = len({r["row"] for r in rows if not r["code"]} - {r["row"] for r in rows if r["code"]})
    warm_ups = [r["warm_up_s"] for r in rows if r.get("warm_up_s")]  # rows that failed validation have none
    return {
        "succeeded": succeeded,
        "images": images,
        "candidates": candidates,
        "codes": dict(Counter(failed.values())),
        "warm_ups": len(warm_ups),
        "warm_up_s": sum(warm_ups),
    }


def commit_shard(
    shard,
    parts: list[str],
    *,
    output: Location,
    stores: Stores,
    format: str,
    model: str,
    retry_for_s: float = storage.RETRY_FOR_S,
) -> dict:
    """Write a shard whole: what earlier runs committed for it, with every row this run redid replaced by
    its new records (``parts``), in manifest order. Files are written data first, stats last, so that a
    crash at any point leaves records that the next run can trust (a record is only written after its
    image). The stats file is written only once every row of the shard has its record. Returns the
    shard's counts (``complete``: it has its stats file)."""
    from unclip_batch.manifest import BOOKKEEPING, KNOWN_COLUMNS, read_rows

    writer = FORMATS[format](output=output, retry_for_s=retry_for_s)

    def read():  # the parts, the manifest's rows of the shard and what earlier runs committed for it
        output.fs.invalidate_cache()  # listings this worker's filesystem cached may be older than the shard's files
        return (
            [r for part in parts for r in _read_part(output, part)],
            read_rows(stores.location(shard.manifest), shard.path, shard.start, shard.stop, None),
            *(read_records(output, folder, shard.name) for folder in ("metadata", "errors")),
        )

    # Storage may be away for a moment: read again, as every write does, before failing the job.
    rows, manifest, old_meta, old_errors = storage.retrying(read, f"reading shard {shard.name}", retry_for_s)
    new_meta, new_errors = _new_records(rows, model)
    # The manifest's columns carried through to the records.
    carried = manifest.drop_columns([c for c in manifest.column_names if c in KNOWN_COLUMNS or c in BOOKKEEPING])
    redone = {r["position"] for r in new_meta} | {r["position"] for r in new_errors}
    ids = manifest["id"].to_pylist() if "id" in manifest.column_names else []
    kept_meta = _kept(old_meta, shard, ids, redone)
    with_output = set(kept_meta["manifest_row"].to_pylist()) if kept_meta is not None else set()
    kept_errors = _kept(old_errors, shard, ids, redone | with_output)
    metadata = _merge(kept_meta, new_meta, METADATA_SCHEMA, shard, carried, sort=["manifest_row", "k"])
    errors = _merge(kept_errors, new_errors, ERROR_SCHEMA, shard, carried, sort=["manifest_row"])
    # 1. The data, with each image's PNG: new ones from the parts, kept ones from the shard as written.
    if format != "files" and metadata.num_rows:
        pngs = {r["image_key"]: r["png"] for r in rows if r["image_key"]}
        old = {}
        if kept_meta is not None and kept_meta.num_rows:
            old = storage.retrying(lambda: writer.read_pngs(shard.name), f"reading shard {shard.name}", retry_for_s)
        writer.write_shard(shard.name, metadata, [pngs.get(k) or old[k] for k in metadata["image_key"].to_pylist()])
    # 2. The records.
    write_parquet(output, f"metadata/{shard.name}.parquet", metadata, retry_for_s)
    error_file = f"errors/{shard.name}.parquet"
    if errors.num_rows:
        write_parquet(output, error_file, errors, retry_for_s)
    else:  # its rows are all done now (--retry-errors), or it never had errors
        output.remove_files([error_file], retry_for_s)
    if format == "files" and old_meta is not None:  # images of records replaced by fewer images
        gone = set(old_meta["image_key"].to_pylist()) - set(metadata["image_key"].to_pylist())
        output.remove_files(_image_keys(gone), retry_for_s)
    # 3. The stats, once every row has its record.
    recorded = set(metadata["manifest_row"].to_pylist()) | set(errors["manifest_row"].to_pylist())
    codes = Counter(errors["code"].to_pylist())
    stats = {  # STATS_DOCS says what each means
        "shard": shard.name,
        "manifest": shard.manifest,
        "path": shard.path,
        "start": shard.start,
        "stop": shard.stop,
        "version": shard.version,
        "rows": len(recorded),
        "succeeded": len(set(metadata["manifest_row"].to_pylist())),
        "failed": errors.num_rows,
        "images": metadata.num_rows,
        "failures_by_code": dict(sorted(codes.items())),
    }
    stats["complete"] = len(recorded) == shard.stop - shard.start
    if stats["complete"]:
        path = f"{writer.stats_folder}/{shard.name}_stats.json"
        output.write(path, (json.dumps(stats, indent=2) + "\n").encode(), retry_for_s)
    return stats


# The key of an image the files format writes: images/<a valid id>/<k>.png (manifest.ID_PATTERN).
IMAGE_KEY = re.compile(r"images/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}/[0-9]{1,2}\.png")


def _image_keys(keys) -> list[str]:
    """The keys of images to delete, read back from an earlier commit's metadata: only keys of the form a job
    writes (the metadata is an output folder's earlier contents, not to be trusted to name what to delete)."""
    kept = sorted(k for k in keys if k and IMAGE_KEY.fullmatch(k))
    if len(kept) < len([k for k in keys if k]):
        logger.warning("%d image keys in earlier metadata are not a job's and were left alone", len(keys) - len(kept))
    return kept


def _read_part(output: Location, path: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(output.read(path))).to_pylist()


def read_records(output: Location, folder: str, name: str, columns=None) -> pa.Table | None:
    """A shard's committed metadata or errors (``folder``), the given columns it has; None before its
    first commit."""
    try:
        data = output.read(folder, f"{name}.parquet")
    except FileNotFoundError:
        return None
    parquet = pq.ParquetFile(pa.BufferReader(data))
    names = parquet.schema_arrow.names
    return parquet.read(columns=None if columns is None else [c for c in columns if c in names])


def _kept(old: pa.Table | None, shard, ids: list, redone: set) -> pa.Table | None:
    """An earlier commit's records that stand: rows not redone, still at their position under their id."""
    if old is None or not old.num_rows:
        return None
    positions = old["manifest_row"].to_pylist()
    same = [
        p not in redone
        and shard.first <= p < shard.first + len(ids)
        and ids[p - shard.first] == i
        and m == shard.manifest
        for p, i, m in zip(positions, old["id"].to_pylist(), old["manifest"].to_pylist())
    ]
    return old.filter(pa.array(same, pa.bool_()))


def _new_records(rows: list[dict], model: str) -> tuple[list[dict], list[dict]]:
    """Metadata records (rows whose every image arrived) and error records from a shard's parts."""
    by_row: dict[int, list[dict]] = {}
    for row in rows:
        by_row.setdefault(row["row"], []).append(row)
    meta, errors = [], []
    for images in by_row.values():
        images = list({int(r["k"]): r for r in images}.values())  # a re-delivered block replaces, never adds
        failed = [r for r in images if r["code"]]
        first = images[0]
        if not failed and len(images) != int(first["num_images"]):  # a stage dropped some: a bug, recorded
            failed = [{**first, "stage": "write", "code": "write_failed"}]
            failed[0]["message"] = f"only {len(images)} of {first['num_images']} images arrived"
        if failed:
            errors.append({**{k: failed[0].get(k) for k in ERROR_FIELDS}, "position": first["position"]})
        else:
            meta.extend(
                {**metadata_record(r, model), "position": r["position"]} for r in sorted(images, key=lambda r: r["k"])
            )
    return meta, errors


def _merge(kept: pa.Table | None, new: list[dict], schema: pa.Schema, shard, carried: pa.Table, sort) -> pa.Table:
    """Kept records and new ones as one table in manifest order, each new one with its manifest position
    and the manifest columns carried through."""
    table = pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in new], schema=schema)
    positions = [r["position"] for r in new]
    table = table.append_column("manifest", pa.array([shard.manifest] * len(new), pa.string()))
    table = table.append_column("manifest_row", pa.array(positions, pa.int64()))
    taken = carried.take(pa.array([p - shard.first for p in positions], pa.int64()))
    for name in taken.column_names:
        table = table.append_column(name, taken[name])
    if kept is not None and kept.num_rows:
        if kept.schema.names == table.schema.names:  # read back from Parquet, lists' items are "element"
            kept = kept.cast(table.schema)
        table = pa.concat_tables([kept, table], promote_options="permissive")
    # One chunk: Parquet's pages follow Arrow's chunks, and a shard's bytes must not depend on how many
    # runs it took.
    return table.sort_by([(c, "ascending") for c in sort]).combine_chunks()


def write_parquet(output: Location, relative: str, table: pa.Table, retry_for_s: float = storage.RETRY_FOR_S) -> None:
    """A table as one whole Parquet object (parts, data, metadata and errors shards), relative to the output."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    output.write(relative, buffer.getvalue(), retry_for_s)


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
                "candidate",
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


def write_json(output: Location, name: str, payload: dict, retry_for_s: float = storage.RETRY_FOR_S) -> None:
    data = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    output.write(name, data, retry_for_s)
