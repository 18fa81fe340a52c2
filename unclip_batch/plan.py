"""Plan stage: what is already done under the output, what is left, whether this job may continue it, and
how the rest is cut into model-sized blocks.

A row is done when its id has metadata or an error record. Rows whose id is itself the problem
(invalid or duplicate) are recorded by their position in their manifest instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip_batch import storage
from unclip_batch.errors import SetupError
from unclip_batch.manifest import FIRST, MANIFEST, MANIFEST_ROW
from unclip_batch.predict import call_key

logger = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
SUCCESS = "_SUCCESS"
POSITION_CODES = ("invalid_id", "duplicate_id")  # errors whose id cannot key them
RECORDED = ("model", "batch_size", "scheduler")  # the job record's settings besides its defaults
# Model calls per Ray block (one block is one batch of the model actor): enough that a block's calls are
# full, few enough that its images are written soon (an actor hands a block's outputs on together).
CALLS_PER_BLOCK = 4


@dataclass(frozen=True)
class Done:
    ids: pa.Array  # ids with metadata or a keyed error record
    positions: pa.Array  # "manifest#row" of errors keyed by position
    succeeded: int
    failed: int

    @classmethod
    def nothing(cls) -> "Done":
        return cls(pa.array([], pa.string()), pa.array([], pa.string()), 0, 0)


def position_keys(manifests, manifest_rows) -> pa.Array:
    return pc.binary_join_element_wise(pc.cast(manifests, pa.string()), pc.cast(manifest_rows, pa.string()), "#")


def load_done(output: str, storage_options: dict | None = None) -> Done:
    metadata = _read_column_sets(output, "metadata", ["id"], storage_options)
    errors = _read_column_sets(output, "errors", ["id", "code", "manifest", "manifest_row"], storage_options)
    ids = pc.unique(metadata["id"]) if metadata.num_rows else pa.array([], pa.string())
    by_position = pc.is_in(errors["code"], value_set=pa.array(POSITION_CODES)) if errors.num_rows else None
    error_ids = errors.filter(pc.invert(by_position))["id"] if errors.num_rows else pa.array([], pa.string())
    positioned = errors.filter(by_position) if errors.num_rows else None
    positions = (position_keys(positioned["manifest"], positioned["manifest_row"]) if positioned is not None
                 else pa.array([], pa.string()))
    return Done(ids=pc.unique(pa.concat_arrays([_flat(ids), _flat(error_ids)])), positions=_flat(positions),
                succeeded=len(ids), failed=errors.num_rows)


def pending(table: pa.Table, done: Done) -> pa.Table:
    """Rows of the manifest table not yet done. Vectorised: stays fast at millions of rows."""
    if len(done.ids) == 0 and len(done.positions) == 0:
        return table
    by_id = pc.and_(table[FIRST], pc.is_in(table["id"], value_set=done.ids))
    by_position = pc.is_in(position_keys(table[MANIFEST], table[MANIFEST_ROW]), value_set=done.positions)
    return table.filter(pc.invert(pc.or_(pc.fill_null(by_id, False), by_position)))


def _read_column_sets(output: str, folder: str, columns: list[str], storage_options) -> pa.Table:
    fs, root = storage.filesystem(output, storage_options)
    path = storage.join(root, folder)
    files = sorted(p for p in (fs.glob(storage.join(path, "*.parquet")) if fs.exists(path) else []))
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file, columns=columns, filesystem=fs))
        except Exception as exc:  # shards are written whole, so this is damage from outside: say so, go on
            logger.warning("ignoring unreadable shard %s: %s", file, exc)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")


def _flat(array) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def check_job_record(output: str, record: dict, storage_options: dict | None = None) -> bool:
    """Refuse to mix results of different models or settings in one output; True when resuming."""
    fs, root = storage.filesystem(output, storage_options)
    path = storage.join(root, JOB_RECORD)
    try:
        earlier = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return False
    if earlier.get("fingerprint") != record["fingerprint"]:
        there, here = _settings(earlier), _settings(record)
        differs = [f"{key} {there.get(key)!r} there, {here.get(key)!r} here" for key in sorted(set(there) | set(here))
                   if there.get(key) != here.get(key)]
        raise SetupError(
            f"{output} holds results of another job ({'; '.join(differs) or 'other settings'}). To resume it, "
            "run with its settings; else use a new --output, or --overwrite to discard the old results.")
    return True


def _settings(record: dict) -> dict:
    """A job record's settings, the defaults (steps, guidance) each named on their own."""
    return {**{key: record.get(key) for key in RECORDED}, **record.get("defaults", {})}


def clear_output(output: str, storage_options: dict | None = None) -> None:
    """--overwrite: remove what an earlier job wrote (only our own names, never the whole folder)."""
    fs, root = storage.filesystem(output, storage_options)
    for name in ("images", "metadata", "errors", JOB_RECORD, SUCCESS):
        path = storage.join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    logger.info("--overwrite: cleared earlier results under %s", output)


def model_blocks(rows: list, batch_size: int) -> Iterator[list]:
    """Cut rows into blocks of about CALLS_PER_BLOCK full model calls each.

    Rows that can share a call travel together (stable: manifest order within a kind; image bytes do not
    depend on the company they keep), and a block ends only where a call ends: the actor pads each
    group's last call of a block, so a group cut mid-call would be padded twice. Cut by rows (64 rows per
    block) the 96-row mixed benchmark ran 9 calls of 16 for 128 images; cut here, 8.
    """
    target, block, images, group, group_images = batch_size * CALLS_PER_BLOCK, [], 0, None, 0
    keyed = sorted(((call_key(vars(row)), row) for row in rows), key=lambda pair: pair[0])
    for key, row in keyed:
        if key != group:
            group, group_images = key, 0
        # A row with several images can carry a group past a call's end: past twice the target, cut anyway.
        if block and (images >= target and group_images % batch_size == 0 or images >= 2 * target):
            yield block
            block, images = [], 0
        block.append(row)
        images += row.num_images
        group_images += row.num_images
    if block:
        yield block
