"""Plan stage: what is already done under the output, what is left, whether this job may continue it, and
how the rest is cut into model-sized blocks.

A row is done when its id has metadata or an error record. Rows whose id is itself the problem
(invalid or duplicate) are recorded by their position in their manifest instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip_batch import storage
from unclip_batch.errors import SetupError
from unclip_batch.manifest import FIRST, KNOWN_COLUMNS, MANIFEST, MANIFEST_ROW, input_hash
from unclip_batch.sampling import call_key

logger = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
SUCCESS = "_SUCCESS"
POSITION_CODES = ("invalid_id", "duplicate_id")  # errors whose id cannot key them
RECORDED = ("model", "batch_size", "scheduler", "embeddings")  # the job record's settings besides its defaults
# Model calls per Ray block (one block is one batch of the model actor): enough that a block's calls are
# full, few enough that its images are written soon (an actor hands a block's outputs on together).
CALLS_PER_BLOCK = 4


@dataclass(frozen=True)
class Done:
    ids: pa.Array  # ids with metadata
    error_ids: pa.Array  # ids with a keyed error record
    positions: pa.Array  # "manifest#row" of errors keyed by position
    succeeded: int
    failed: int
    # (key, input_hash): the fingerprint each done row had when recorded; key is the id, or the position
    # for errors keyed by position. Outputs from before fingerprints have none (null).
    hashes: pa.Table = field(
        default_factory=lambda: pa.table({"key": pa.array([], pa.string()), "input_hash": pa.array([], pa.string())})
    )

    @classmethod
    def nothing(cls) -> Done:
        empty = pa.array([], pa.string())
        return cls(empty, empty, empty, 0, 0)


def position_keys(manifests, manifest_rows) -> pa.Array:
    return pc.binary_join_element_wise(pc.cast(manifests, pa.string()), pc.cast(manifest_rows, pa.string()), "#")


def load_done(output: str, storage_options: dict | None = None) -> Done:
    metadata = _read_column_sets(output, "metadata", ["id", "input_hash"], storage_options)
    errors = _read_column_sets(
        output, "errors", ["id", "code", "manifest", "manifest_row", "input_hash"], storage_options
    )
    by_position = pc.fill_null(pc.is_in(errors["code"], value_set=pa.array(POSITION_CODES)), False)
    keyed, positioned = errors.filter(pc.invert(by_position)), errors.filter(by_position)
    positions = position_keys(positioned["manifest"], positioned["manifest_row"])
    hashes = pa.concat_tables(
        [
            pa.table({"key": metadata["id"], "input_hash": metadata["input_hash"]}),
            pa.table({"key": keyed["id"], "input_hash": keyed["input_hash"]}),
            pa.table({"key": positions, "input_hash": positioned["input_hash"]}),
        ]
    )
    ids = pc.unique(metadata["id"])
    return Done(
        ids=_flat(ids),
        error_ids=_flat(pc.unique(keyed["id"])),
        positions=_flat(positions),
        succeeded=len(ids),
        failed=errors.num_rows,
        hashes=hashes,
    )


def changed_rows(table: pa.Table, done: Done) -> pa.Table:
    """Done rows whose manifest row is not what was recorded (same id, other prompt, seed ...): the
    manifest table's rows, with a ``key`` column naming their records (see ``Done.hashes``)."""
    succeeded, failed = _done_masks(table, done)
    done_rows = table.filter(pc.or_(succeeded, failed))
    if done_rows.num_rows == 0:
        return done_rows.append_column("key", pa.array([], pa.string()))
    by_id = pc.and_(done_rows[FIRST], pc.is_in(done_rows["id"], value_set=pa.concat_arrays([done.ids, done.error_ids])))
    keys = pc.if_else(
        pc.fill_null(by_id, False), done_rows["id"], position_keys(done_rows[MANIFEST], done_rows[MANIFEST_ROW])
    )
    known = [c for c in KNOWN_COLUMNS if c in done_rows.column_names]
    now = pa.array([input_hash(r) for r in done_rows.select(known).to_pylist()], pa.string())
    # The join sees only keys, hashes and positions: carried columns may be of types joins cannot carry.
    probe = pa.table({"key": keys, "now": now, "at": pa.array(range(done_rows.num_rows), pa.int64())})
    recorded = (
        done.hashes.filter(pc.is_valid(done.hashes["input_hash"])).group_by("key").aggregate([("input_hash", "min")])
    )  # one hash per key (a row's images share it)
    joined = probe.join(recorded, "key", join_type="inner", use_threads=False)
    changed = joined.filter(pc.not_equal(joined["now"], joined["input_hash_min"]))
    changed = changed.take(pc.sort_indices(changed["at"]))  # manifest order
    return done_rows.take(changed["at"]).append_column("key", changed["key"])


def forget(output: str, changed: pa.Table, storage_options: dict | None = None) -> None:
    """Remove the records and images of changed rows, so that they run again.

    Each shard that holds one of them is rewritten whole under its own name (an atomic replace), so a
    crash part-way leaves every row either still recorded (and still changed: the next run finds it
    again) or pending, never half of each."""
    fs, root = storage.filesystem(output, storage_options)
    keys = pc.unique(changed["key"])
    for folder in ("metadata", "errors"):
        for file in _shard_files(fs, storage.join(root, folder)):
            shard = pq.read_table(file, filesystem=fs)
            gone = pc.is_in(_record_keys(shard), value_set=keys)
            if pc.any(gone).as_py():
                kept = shard.filter(pc.invert(gone))
                buffer = io.BytesIO()
                pq.write_table(kept, buffer)
                storage.write_whole(fs, file, buffer.getvalue(), root)
    for row_id in set(changed.filter(pc.equal(changed["key"], changed["id"]))["id"].to_pylist()):
        folder = storage.join(root, "images", row_id)  # ids are validated: never outside the output
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
    logger.info("%d changed rows forgotten: they run again", changed.num_rows)


def _record_keys(shard: pa.Table) -> pa.Array:
    """The key of each record of a metadata or errors shard (see ``Done.hashes``)."""
    if "code" not in shard.column_names:
        return shard["id"]
    by_position = pc.fill_null(pc.is_in(shard["code"], value_set=pa.array(POSITION_CODES)), False)
    return pc.if_else(by_position, position_keys(shard["manifest"], shard["manifest_row"]), shard["id"])


def _done_masks(table: pa.Table, done: Done) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(rows with output, rows with an error record) of the manifest table."""
    first = table[FIRST]
    succeeded = pc.fill_null(pc.and_(first, pc.is_in(table["id"], value_set=done.ids)), False)
    failed = pc.fill_null(pc.and_(first, pc.is_in(table["id"], value_set=done.error_ids)), False)
    if len(done.positions):
        failed = pc.or_(failed, pc.is_in(position_keys(table[MANIFEST], table[MANIFEST_ROW]), value_set=done.positions))
    return succeeded, failed


def pending(table: pa.Table, done: Done) -> pa.Table:
    """Rows of the manifest table not yet done. Vectorised: stays fast at millions of rows."""
    if len(done.ids) == 0 and len(done.error_ids) == 0 and len(done.positions) == 0:
        return table
    succeeded, failed = _done_masks(table, done)
    return table.filter(pc.invert(pc.or_(succeeded, failed)))


def skipped_errors(table: pa.Table, done: Done) -> int:
    """Manifest rows a resumed run skips because an earlier run recorded them as errors."""
    if len(done.error_ids) == 0 and len(done.positions) == 0:
        return 0
    return pc.sum(_done_masks(table, done)[1]).as_py() or 0


def discard_errors(output: str, storage_options: dict | None = None) -> None:
    """--retry-errors: forget the error records, so their rows are pending again. Safe at any point: a row
    whose record is gone is simply redone, and recorded anew if it fails again."""
    fs, root = storage.filesystem(output, storage_options)
    path = storage.join(root, "errors")
    if fs.exists(path):
        fs.rm(path, recursive=True)
    logger.info("--retry-errors: rows recorded as errors earlier will be redone")


def _shard_files(fs, path: str) -> list[str]:
    return sorted(fs.glob(storage.join(path, "*.parquet")) if fs.exists(path) else [])


def _read_column_sets(output: str, folder: str, columns: list[str], storage_options) -> pa.Table:
    """The given columns of every shard in a folder as strings; a column a shard lacks is null."""
    fs, root = storage.filesystem(output, storage_options)
    tables = []
    for file in _shard_files(fs, storage.join(root, folder)):
        try:
            with fs.open(file, "rb") as f:
                shard = pq.ParquetFile(f)
                present = [c for c in columns if c in shard.schema_arrow.names]
                table = shard.read(columns=present)
        except Exception as exc:  # shards are written whole, so this is damage from outside: say so, go on
            logger.warning("ignoring unreadable shard %s: %s", file, exc)
            continue
        tables.append(
            pa.table(
                {
                    c: pc.cast(table[c], pa.string()) if c in present else pa.nulls(table.num_rows, pa.string())
                    for c in columns
                }
            )
        )
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def _flat(array) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def job_record(model: str, defaults: dict, batch_size: int, scheduler: str, embeddings: bool = False) -> dict:
    """What makes two runs one job: the model, the sampling defaults, the batch size (model calls have
    exactly batch_size images, and the call shape decides the last bits of every pixel, see predict.py),
    the sampler and whether embeddings are stored (a dataset has them for every image or for none). Its
    fingerprint is compared on resume (check_job_record)."""
    from unclip_batch import __version__

    record = {
        "model": model,
        "defaults": defaults,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "embeddings": embeddings,
        "unclip_batch": __version__,
    }
    settings = [model, defaults, batch_size]
    if scheduler != "default":  # jobs from before the option keep their fingerprint
        settings.append(scheduler)
    if embeddings:  # the same for jobs from before this option
        settings.append("embeddings")
    settings = json.dumps(settings, sort_keys=True)
    record["fingerprint"] = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return record


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
        differs = [
            f"{key} {there.get(key)!r} there, {here.get(key)!r} here"
            for key in sorted(set(there) | set(here))
            if there.get(key) != here.get(key)
        ]
        raise SetupError(
            f"{output} holds results of another job ({'; '.join(differs) or 'other settings'}). To resume it, "
            "run with its settings; else use a new --output, or --overwrite to discard the old results."
        )
    return True


def _settings(record: dict) -> dict:
    """A job record's settings, the defaults (steps, guidance) each named on their own."""
    return {**{key: record.get(key) for key in RECORDED}, **record.get("defaults", {})}


def clear_output(output: str, storage_options: dict | None = None) -> None:
    """--overwrite: remove what an earlier job wrote (only our own names, never the whole folder)."""
    fs, root = storage.filesystem(output, storage_options)
    for name in ("images", "metadata", "errors", "report", JOB_RECORD, SUCCESS):
        path = storage.join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    logger.info("--overwrite: cleared earlier results under %s", output)


def model_blocks(rows: list, batch_size: int) -> Iterator[list]:
    """Cut rows into blocks of about CALLS_PER_BLOCK full model calls each.

    Rows that can share a call travel together (stable: manifest order within a kind; image bytes do not
    depend on the company they keep), and a block ends only where a call ends: the actor pads each
    group's last call of a block, so a group cut mid-call would be padded twice (one call in nine
    wasted on the mixed benchmark when blocks were cut by rows: benchmarks/README.md).
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
