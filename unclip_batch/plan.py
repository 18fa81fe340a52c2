"""Plan stage: the job's input shards, what is already done under the output, whether this job may continue
it, and each shard's rows left to do, cut into model-sized blocks.

A shard is a range of rows of one manifest file, planned from Parquet footers alone; it becomes one output
shard, written whole (writer.commit_shard). The driver holds shards, never rows: reading, validating and
sorting out what is done happen in ``read_shard``, a Ray task per shard. A row is done when its shard's
metadata or errors hold a record at its position (``manifest_row``) under the same id and fingerprint; a
shard whose every row is done has a stats file, and a resume skips it without reading anything of it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from unclip_batch import storage
from unclip_batch.errors import SetupError
from unclip_batch.manifest import (
    FIRST,
    FOLDER,
    KNOWN_COLUMNS,
    MANIFEST,
    MANIFEST_ROW,
    ROW,
    ROW_FIELDS,
    ManifestFile,
    SizeRule,
    UnknownWords,
    id_digests,
    input_hash,
    parse_records,
    read_rows,
)
from unclip_batch.sampling import call_key
from unclip_batch.sources import MAX_SOURCE_BYTES
from unclip_batch.storage import PARTIAL, Location, Stores
from unclip_batch.writer import read_records

logger = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
SUCCESS = "_SUCCESS"
PARTS = "_parts"  # each finished model block's results, until its shard is committed
# Every name a job writes at the top of its output (the report page's too): --overwrite removes these, and
# only these, and only from an output holding a job record.
OURS = ("images", "metadata", "errors", "shards", "data", "stats", "report", "curation", PARTS, JOB_RECORD, SUCCESS)
# The job record's settings besides its defaults: each changes what the output holds or how it is laid out.
RECORDED = ("model", "batch_size", "scheduler", "embeddings", "format", "rows_per_shard")
# Model calls per Ray block (one block is one batch of the model actor): enough that a block's calls are
# full, few enough that its images are written soon (an actor hands a block's outputs on together).
CALLS_PER_BLOCK = 4


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one manifest file: one output shard. ``limit`` < stop when --limit ends the
    job inside it (the shard stays unfinished until a run without the limit)."""

    name: str  # "00042": the output shard's files are named after it
    manifest: str
    path: str
    folder: str
    version: str
    start: int
    stop: int
    limit: int
    first: int  # manifest_row of row `start`
    offset: int  # the job-wide position of row `start` (duplicates: the first occurrence wins)

    def matches(self, stats: dict) -> bool:
        """Whether a stats file describes this shard of this very file (not another, not an older copy)."""
        return [stats.get(k) for k in ("manifest", "path", "start", "stop", "version")] == [
            self.manifest,
            self.path,
            self.start,
            self.stop,
            self.version,
        ]


def plan_shards(files: list[ManifestFile], rows_per_shard: int, limit: int | None = None) -> list[Shard]:
    """Every shard of the job, in manifest order: ``rows_per_shard`` rows of a file each (a file's last
    shard may be shorter). Shards past ``limit`` rows are planned too, for the check of what the output
    holds, with limit == start (nothing to do this run)."""
    cuts, offset = [], 0
    for file in files:
        for start in range(0, file.rows, rows_per_shard):
            cuts.append((file, start, min(start + rows_per_shard, file.rows), offset + start))
        offset += file.rows
    width = max(5, len(str(len(cuts) - 1)))  # img2dataset's 00000 ... grows past 99999 shards
    left = float("inf") if limit is None else limit
    shards = []
    for i, (file, start, stop, at) in enumerate(cuts):
        end = int(min(stop, max(start, start + left - at)))
        name = f"{i:0{width}d}"
        shards.append(
            Shard(name, file.manifest, file.path, file.folder, file.version, start, stop, end, file.first + start, at)
        )
    return shards


@dataclass(frozen=True)
class OutputState:
    """What an output holds, from listings and stats files only."""

    stats: dict  # shard name -> its stats (shards whose every row is recorded)
    recorded: frozenset  # names of shards with a metadata or errors file (done in part, or whole)


def output_state(output: Location, stats_folder: str) -> OutputState:
    output.fs.invalidate_cache()  # what is there now, not what this process listed before
    names = {}
    for folder, suffix in (("metadata", ".parquet"), ("errors", ".parquet"), (stats_folder, "_stats.json")):
        names[folder, suffix] = [f for f in output.files(folder) if f.endswith(suffix)]
    stats_files = names[stats_folder, "_stats.json"]
    # Side by side: object storage round trips add up. (Not mutated: any pool size reads the same files.)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # pragma: no mutate
        blobs = dict(zip(stats_files, pool.map(output.read, stats_files)))
    stats = {posixpath.basename(path).removesuffix("_stats.json"): json.loads(blob) for path, blob in blobs.items()}
    recorded = {
        posixpath.basename(p).removesuffix(".parquet")
        for key in (("metadata", ".parquet"), ("errors", ".parquet"))
        for p in names[key]
    }
    return OutputState(stats=stats, recorded=frozenset(recorded))


def check_layout(shards: list[Shard], state: OutputState, output: Location) -> None:
    """Refuse an output holding shards this job's manifests do not plan: files were added, removed or
    reordered, so a shard's name now means other rows, and rows would be lost or recorded twice."""
    planned = {s.name for s in shards}
    strange = sorted((set(state.stats) | state.recorded) - planned)
    if strange:
        shown = ", ".join(strange[:5]) + (" ..." if len(strange) > 5 else "")
        raise SetupError(
            f"{storage.redact(output.url)} holds shards that these manifests do not plan ({shown}): the manifests "
            "gained or lost rows or files since that output was written, or it comes from an older unclip-batch. "
            "Use a new --output, or --overwrite to discard the old results (nothing was computed)"
        )


def to_visit(shards: list[Shard], state: OutputState, retry_errors: bool) -> tuple[list[Shard], list[dict]]:
    """(shards this run reads, stats of the finished shards it skips). A finished shard is read again only
    when its manifest file changed since (its rows are checked) or its errors are to be retried. Shards
    past --limit are neither: this run does not cover them."""
    visit, skipped = [], []
    for shard in shards:
        stats = state.stats.get(shard.name)
        if stats and shard.matches(stats) and not (retry_errors and stats.get("failed")):
            skipped.append(stats)
        elif shard.limit > shard.start:  # (past --limit a shard is left as it is)
            visit.append(shard)
    return visit, skipped


def previous_records(output: Location, name: str) -> dict[int, dict]:
    """The records an earlier run committed for a shard, by manifest_row: id, input_hash, manifest and code
    (None for output)."""
    output.fs.invalidate_cache()  # a worker's filesystem may have listed the output before this shard's commit
    found = {}
    for folder in ("metadata", "errors"):
        table = read_records(output, folder, name, ["id", "input_hash", "manifest", "manifest_row", "code"])
        for record in table.to_pylist() if table is not None else []:
            found[record["manifest_row"]] = {**record, "code": record.get("code")}
    return found


@dataclass
class Sorted:
    """A shard's rows sorted out against what an earlier run recorded for it."""

    todo: list[dict]
    kept: int = 0  # rows whose record stands
    kept_failed: int = 0  # of them, error records (skipped; --retry-errors redoes them)
    retried: int = 0  # error records redone (--retry-errors)
    changed: list = dataclasses.field(default_factory=list)  # ids (or positions) of rows changed under their record


def sort_out(records: list[dict], previous: dict[int, dict], manifest: str, retry_errors: bool) -> Sorted:
    """Split a shard's raw manifest records into kept and to do. A record is kept when it sits at the row's
    position under the same id and fingerprint (records from before fingerprints have none: kept)."""
    out = Sorted(todo=[])
    for record in records:
        position = record[MANIFEST_ROW]
        old = previous.get(position)
        if old is None:
            out.todo.append(record)
            continue
        now = input_hash(record)
        same = old.get("manifest") in (None, manifest) and old.get("id") == record.get("id")
        if not same or old.get("input_hash") not in (None, now):
            out.changed.append(record.get("id") or f"{manifest}#{position}")
            out.todo.append(record)
        elif old["code"] and retry_errors:
            out.retried += 1
            out.todo.append(record)
        else:
            out.kept += 1
            out.kept_failed += bool(old["code"])
    return out


def shard_records(shard: Shard, duplicates: dict, stores: Stores) -> list[dict]:
    """The shard's rows this run covers, as raw manifest records with their bookkeeping columns."""
    table = read_rows(stores.location(shard.manifest), shard.path, shard.start, shard.limit, KNOWN_COLUMNS)
    records = table.to_pylist()
    for i, (record, digest) in enumerate(zip(records, id_digests(table["id"].combine_chunks()))):
        row = shard.offset + i  # the job-wide row: the first of an id's rows is the one a duplicate is not
        record |= {ROW: row, MANIFEST: shard.manifest, MANIFEST_ROW: shard.first + i, FOLDER: shard.folder}
        record[FIRST] = duplicates.get(digest.tobytes(), row) == row
    return records


def _records_and_previous(shard: Shard, output: Location, duplicates: dict, stores: Stores, retry_for_s: float):
    """A shard's manifest rows as records and what earlier runs recorded for it. Storage may be away for a
    moment: read again, as every write does, before failing the job."""
    return storage.retrying(
        lambda: (
            shard_records(shard, duplicates, stores),
            previous_records(output, shard.name),
        ),
        f"reading shard {shard.name}",
        retry_for_s,
    )


def changed_rows(
    shard: Shard,
    *,
    output: Location,
    duplicates: dict,
    stores: Stores,
    retry_for_s: float = storage.RETRY_FOR_S,
) -> list:
    """Rows of a shard changed since an earlier run recorded them (a task: for the check before compute)."""
    records, previous = _records_and_previous(shard, output, duplicates, stores, retry_for_s)
    found = sort_out(records, previous, shard.manifest, retry_errors=False).changed
    gone = [p for p in previous if not shard.first <= p < shard.first + (shard.stop - shard.start)]
    return found + [f"{shard.manifest}#{p}" for p in gone]


@dataclass(frozen=True)
class Work:
    """What ``read_shard`` needs besides the shard: the same for every shard of a job. No field holds a
    credential as such: ``output`` and ``stores`` keep theirs out of reprs and Ray Data's exports."""

    output: Location
    stores: Stores
    defaults: dict
    size: SizeRule
    batch_size: int
    retry_errors: bool = False
    vocabulary: frozenset | None = None
    duplicates: dict = dataclasses.field(default_factory=dict)  # id digest -> job-wide row of its first occurrence
    max_source_bytes: int = MAX_SOURCE_BYTES
    retry_for_s: float = storage.RETRY_FOR_S


def read_shard(shard: Shard, work: Work) -> tuple[list[pa.Table], list[dict], dict]:
    """The read stage of one shard: its rows left to do, validated, cut into model blocks; the error
    records of rows that failed validation; and a report (counts and unknown words) for the driver."""
    records, previous = _records_and_previous(shard, work.output, work.duplicates, work.stores, work.retry_for_s)
    sorted_out = sort_out(records, previous, shard.manifest, work.retry_errors)
    rows, errors = parse_records(sorted_out.todo, work.defaults, work.size)
    words = UnknownWords(work.vocabulary)
    words.check(rows)
    blocks = [rows_table(block) for block in model_blocks(rows, work.batch_size)]
    report = {
        "rows": len(records),
        "kept": sorted_out.kept,
        "kept_failed": sorted_out.kept_failed,
        "retried": sorted_out.retried,
        "changed": len(sorted_out.changed),
        "invalid": len(errors),
        "words": words.to_dict(),
    }
    return blocks, errors, report


def rows_table(rows) -> pa.Table:
    """Valid rows as the pipeline's block: every Row field, and no error yet."""
    no_error = [""] * len(rows)
    return pa.table(
        {
            **{f: [getattr(r, f) for r in rows] for f in ROW_FIELDS},
            "code": no_error,
            "message": no_error,
            "stage": no_error,
        }
    )


def job_record(
    model: str,
    defaults: dict,
    batch_size: int,
    scheduler: str = "default",
    embeddings: bool = False,
    format: str = "files",
    rows_per_shard: int = 1000,
    weights: str | None = None,
) -> dict:
    """What makes two runs one job: the model, the sampling defaults, the batch size (model calls have
    exactly batch_size images, and the call shape decides the last bits of every pixel, see predict.py),
    the sampler, whether embeddings are stored (a dataset has them for every image or for none), and the
    output's layout (format, rows per shard). Its fingerprint is compared on resume (check_job_record)."""
    from unclip_batch import __version__

    record = {
        "model": model,
        "defaults": defaults,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "embeddings": embeddings,
        "format": format,
        "rows_per_shard": rows_per_shard,
        "unclip_batch": __version__,
        # The model's files (models.weights_fingerprint): a resume on other weights is refused. Apart from the
        # fingerprint, which outputs written before it was recorded keep.
        "weights": weights,
    }
    settings = json.dumps([model, defaults, batch_size, scheduler, embeddings, format, rows_per_shard], sort_keys=True)
    record["fingerprint"] = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return record


def check_job_record(output: Location, record: dict) -> bool:
    """Refuse to mix results of different models, weights or settings in one output; True when resuming."""
    earlier = read_job_record(output)
    if earlier is None:
        _check_unclaimed(output)
        return False
    weights = earlier.get("weights"), record.get("weights")
    if None not in weights and weights[0] != weights[1]:
        raise SetupError(
            f"{storage.redact(output.url)} holds results of model {earlier.get('model')!r} with other weights "
            f"(fingerprint {weights[0]} there, {weights[1]} here): the files of the model changed since. To "
            "resume it, use the weights it started with; else use a new --output, or --overwrite to discard "
            "the old results."
        )
    if earlier.get("fingerprint") != record["fingerprint"]:
        there, here = _settings(earlier), _settings(record)
        differs = [
            f"{key} {there.get(key)!r} there, {here.get(key)!r} here"
            for key in sorted(set(there) | set(here))
            if there.get(key) != here.get(key)
        ]
        raise SetupError(
            f"{storage.redact(output.url)} holds results of another job ({'; '.join(differs) or 'other settings'}). "
            "To resume it, run with its settings; else use a new --output, or --overwrite to discard the old results."
        )
    return True


def _settings(record: dict) -> dict:
    """A job record's settings, the defaults (steps, guidance) each named on their own."""
    return {**{key: record.get(key) for key in RECORDED}, **record.get("defaults", {})}


def read_job_record(output: Location) -> dict | None:
    try:
        return json.loads(output.read(JOB_RECORD))
    except FileNotFoundError:
        return None


def _check_unclaimed(output: Location) -> None:
    """An output without our job record may hold nothing of ours: the names a job writes, found there,
    belong to someone else (or to a job whose record was removed), and a job must not mix in or delete them."""
    # A folder of ours counts only where it holds a file: stores with real folders (SeaweedFS, a local disk)
    # keep a folder whose objects were all deleted.
    ours = sorted(
        name for name in set(output.top()) & set(OURS) if output.fs.isfile(output.path(name)) or output.files(name)
    )
    if ours:
        raise SetupError(
            f"{storage.redact(output.url)} holds {', '.join(ours)} but no {JOB_RECORD}: no unclip-batch job "
            "wrote them, and this one will neither write beside them nor remove them (--overwrite included). "
            "Use a new --output (nothing was computed)"
        )


def clear_output(output: Location, retry_for_s: float = storage.RETRY_FOR_S) -> None:
    """--overwrite: remove what an earlier job wrote, only from an output that holds our job record and
    nothing at its top that a job does not write; never the whole folder."""
    if read_job_record(output) is None:
        _check_unclaimed(output)
        return  # nothing of a job's here: nothing to discard
    foreign = sorted(set(output.top()) - set(OURS) - {PARTIAL})
    if foreign:
        raise SetupError(
            f"--overwrite: {storage.redact(output.url)} holds {', '.join(foreign[:5])} beside a job's results; "
            "a job writes none of these, so the folder is not only a job's output. Nothing was removed: move "
            "them, or use a new --output"
        )
    for name in OURS:
        output.remove(name, retry_for_s=retry_for_s)
    logger.info("--overwrite: cleared earlier results under %s", storage.redact(output.url))


def model_blocks(rows: list, batch_size: int) -> Iterator[list]:
    """Cut rows into blocks of about CALLS_PER_BLOCK full model calls each.

    Rows that can share a call travel together (stable: manifest order within a kind; image bytes do not
    depend on the company they keep), and a block ends only where a call ends: the actor pads each
    group's last call of a block, so a group cut mid-call would be padded twice (one call in nine
    wasted on the mixed benchmark when blocks were cut by rows: benchmarks/README.md).
    """
    target, block, images, group = batch_size * CALLS_PER_BLOCK, [], 0, None
    keyed = sorted(((call_key(vars(row)), row) for row in rows), key=lambda pair: pair[0])
    for key, row in keyed:
        if key != group:
            group, group_images = key, 0
        # A row with several images can carry a group past a call's end: past twice the target, cut anyway.
        if block and (images >= target and group_images % batch_size == 0 or images >= 2 * target):
            yield block
            block, images = [], 0
        block.append(row)
        images += row.num_images * row.best_of  # what the model makes: every candidate of every image
        group_images += row.num_images * row.best_of
    if block:
        yield block
