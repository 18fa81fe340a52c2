"""``unclip-batch curate OUTPUT --export DEST --format F``: the kept samples of a curated output, with their
metadata, written to DEST as shards in any output format.

DEST is laid out as a job's output in that format (``images/`` or ``shards/`` or ``data/``, and
``metadata/<shard>.parquet``), a shard for each of the output's shards, holding its kept images only, so every
reader of our outputs reads it as it is. Each shard is written data first and its metadata last (the
metadata is the shard's done-marker): a killed export resumes after the shards it finished, and its bytes
are an uninterrupted one's. ``DEST/_export.json`` says what DEST is an export of; ``DEST/_SUCCESS`` is
written last. DEST must be new, or an export of the same output in the same format.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc

from unclip_batch import storage
from unclip_batch.curation import FOLDER, CurationError, Plan, _iso, image_bytes, read_table, record_file
from unclip_batch.storage import Location, Stores

logger = logging.getLogger(__name__)

RECORD = "_export.json"


def _record(output: Location, format: str, settings: dict) -> dict:
    return {"source": storage.redact(output.url), "format": format, "curation": settings}


def check_destination(output: Location, dest: Location, format: str, settings: dict) -> None:
    """Refuse, before any work, a DEST that is the output, lies inside it, or holds anything but an export of
    the same output in the same format by a curation with the same settings (an export resumed under other
    settings would mix two curations' samples)."""
    same_store = storage.family(output.url) == storage.family(dest.url)
    inside = lambda a, b: a.root.rstrip("/") == b.root.rstrip("/") or a.root.startswith(b.root.rstrip("/") + "/")  # noqa: E731
    if same_store and (inside(dest, output) or inside(output, dest)):
        raise CurationError(
            f"--export {storage.redact(dest.url)}: the export goes to a folder of its own, not the output "
            f"{storage.redact(output.url)} or a folder inside or around it"
        )
    names = dest.top()
    if not names:
        return
    try:
        earlier = json.loads(dest.read(RECORD))
    except FileNotFoundError:
        raise CurationError(
            f"--export {storage.redact(dest.url)} holds other files ({', '.join(names[:5])}): give a new folder"
        ) from None
    if earlier != _record(output, format, settings):
        other = " by a curation with other settings" if earlier.get("source") == storage.redact(output.url) else ""
        raise CurationError(
            f"--export {storage.redact(dest.url)} holds an export of {earlier.get('source')} in "
            f"{earlier.get('format')}{other}: give a new folder"
        )


def export(plan: Plan, dest: Location, format: str, stores: Stores) -> dict:
    """Write the kept samples (resuming an interrupted export); DEST's summary."""
    from unclip_batch import pipeline

    try:
        return json.loads(dest.read("_SUCCESS"))
    except FileNotFoundError:
        pass
    started = time.time()
    curation = json.loads(plan.output.read(FOLDER, "_SUCCESS"))
    source = json.loads(plan.output.read("_SUCCESS"))
    record = _record(plan.output, format, plan.settings())
    dest.write(RECORD, (json.dumps(record, indent=2) + "\n").encode(), plan.retry_for_s)
    done = set(dest.files("metadata"))
    pending = [p for p, files in enumerate(plan.parts) if any(f not in done for f in files)]
    pipeline.each(export_part, pending, plan=plan, dest=dest, format=format)
    wall = time.time() - started
    summary = {
        "status": "complete",
        "source": storage.redact(plan.output.url),
        "model": source.get("model"),
        "manifests": source.get("manifests", []),
        "format": format,
        "images": curation["kept"],
        "images_total": curation["kept"],
        "curation": curation["settings"],
        "started": _iso(started),
        "finished": _iso(time.time()),
        "wall_s": round(wall, 3),
        "images_per_s": None,
    }
    dest.write("_SUCCESS", (json.dumps(summary, indent=2) + "\n").encode(), plan.retry_for_s)
    storage.clear_partial(dest)
    logger.info("export: %d images to %s", summary["images"], storage.redact(dest.url))
    return summary


def export_part(plan: Plan, part: int, dest: Location, format: str) -> dict:
    """A part's shards, kept images only: the images (or the shard file), then the shard's metadata."""
    from unclip_batch.writer import FORMATS, write_parquet

    kept = read_table(plan.output, record_file(part), ["image_key", "keep"])
    kept = kept.filter(kept["keep"])["image_key"]
    writer = FORMATS[format](output=dest, retry_for_s=plan.retry_for_s)
    images = 0
    for file in plan.parts[part]:
        if dest.fs.exists(dest.path(file)):
            continue  # finished by an earlier run
        shard = posixpath.basename(file).removesuffix(".parquet")
        metadata = read_table(plan.output, file)
        metadata = metadata.filter(pc.is_in(metadata["image_key"], kept))
        pngs = image_bytes(plan.output, metadata["image_key"].to_pylist())
        metadata = metadata.set_column(
            metadata.schema.get_field_index("image_key"),
            "image_key",
            pa.array(_keys(writer, shard, metadata), pa.string()),
        )
        if format == "files":
            dest.write_many(dict(zip(metadata["image_key"].to_pylist(), pngs)), plan.retry_for_s)
        elif metadata.num_rows:
            writer.write_shard(shard, metadata, pngs)
        write_parquet(dest, file, metadata, plan.retry_for_s)
        images += metadata.num_rows
    return {"images": images}


def _keys(writer, shard: str, metadata: pa.Table) -> list[str]:
    """The kept images' keys in the export's format: a row's position is its place among the shard's kept rows."""
    from unclip_batch.manifest import ID_PATTERN

    positions: dict[str, int] = {}
    keys = []
    for row_id, k in zip(metadata["id"].to_pylist(), metadata["k"].to_pylist()):
        if not ID_PATTERN.fullmatch(str(row_id)) or not 0 <= int(k) < 100:  # the output's earlier contents
            raise CurationError(f"shard {shard}'s metadata holds an image no job writes: id {row_id!r}, k {k!r}")
        position = positions.setdefault(row_id, len(positions))
        keys.append(writer.image_key(shard, {"id": row_id, "k": k, "position": position}))
    return keys
