"""``unclip-batch curate OUTPUT``: a finished output filtered by CLIP score and cleared of exact and semantic
near-duplicates (SemDeDup, Abbas et al. 2023), and with ``--export DEST`` its kept samples written as shards.

The stages, each a plain function over one part of the dataset that writes one file whole (its presence is
the stage's done-marker, so a killed curate resumes where it stopped), wired as Ray Data tasks in
``pipeline.each``:

    scan (a part: ~50k images)   the small columns, hash-bucketed by sha256; a seeded sample of embeddings
    fit (one task)               spherical k-means (faiss) on the sample
    exact (a sha256 bucket)      low_clip_score, then exact_duplicate: same PNG bytes, across the dataset
    assign (a part)              each remaining image to its nearest centroid
    dedup (a range of clusters)  pairs compared only inside a cluster, in tiles: near_duplicate or kept
    finalize (a part)            one record per image, in the output's order: curation/records/<part>.parquet

No stage's memory grows with the dataset: parts and cluster ranges hold a fixed number of images, and
exchanges go through files sorted by the next stage's key, so each reader reads only its row groups.
Within a group of duplicates the image with the highest clip_score is kept (no score ranks last; ties go
to the smaller image_key): an image is a near-duplicate when its cosine similarity to an image ranked
above it in its cluster reaches the threshold. Every file's bytes follow from the output, the settings and
the seed alone, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip_batch import storage
from unclip_batch.errors import SetupError
from unclip_batch.storage import Location

logger = logging.getLogger(__name__)

FOLDER = "curation"
WORK = f"{FOLDER}/_work"
REASONS = ("kept", "low_clip_score", "exact_duplicate", "near_duplicate")
# Measured on the embedded model's world (benchmarks/README.md, "Curation"): the most similar pair of images
# that the world's judge reads as a different colour, shape, size or position was at 0.9951 (pictures a person
# reads as one: a judge's boundary cases), so at 0.996 no such pair is marked. NeMo Curator's SemDeDup default is
# 0.99 (eps 0.01); the SemDeDup paper went down to 0.8 on LAION.
NEAR_DUPLICATE = 0.996
IMAGES_PER_PART = 50_000  # a scan or assign task's images: 256 MB of Kandinsky 2.2 embeddings (1280 floats)
IMAGES_PER_CLUSTER = 1_000  # the default number of clusters gives this many images each, on average
IMAGES_PER_BUCKET = 50_000  # a dedup task's images (clusters are packed into ranges of about this many)
SAMPLE_PER_CLUSTER = 40  # faiss wants at least 39 points per centroid
MAX_SAMPLE = 64_000  # k-means's sample: 330 MB at 1280 floats; the default clusters stop at MAX_SAMPLE / 40
TILE = 4096  # rows of a cluster compared at once: a 64 MB similarity block
MAX_CLUSTER = 50_000  # a cluster larger than this is split by k-means before its pairs are compared
KMEANS_ITERATIONS = 20
HISTOGRAM_BINS = 100  # clip_score over [-1, 1] in steps of 0.02
SHARD_FILE = re.compile(r"metadata/[0-9]{5,}\.parquet")
ROW_GROUP = 2048  # rows per row group in the exchange files: what a reader's filter skips by

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("k", pa.int32()),
        ("image_key", pa.string()),
        ("clip_score", pa.float64()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float32()),
        ("cluster", pa.int32()),
    ]
)
# docs/outputs.md is generated from these (docs/generate.py); a test fails when a column has no line here.
RECORD_DOCS = {
    "id": "the manifest row's id",
    "k": "which of the row's images",
    "image_key": "the image's key in the output, as in its metadata (the image's identity in curation)",
    "clip_score": "its clip_score, as in the metadata (the rank within duplicates: highest kept)",
    "keep": "true when the image is kept (reason kept)",
    "reason": "kept, low_clip_score (under --min-clip-score), exact_duplicate (the same PNG bytes as a kept "
    "image) or near_duplicate (cosine similarity at or above --near-duplicate with an image ranked above it)",
    "duplicate_of": "the image_key of the image it duplicates (the highest-ranked one it is that similar to); "
    "null when kept or filtered",
    "similarity": "cosine similarity of the CLIP image embeddings with duplicate_of (1 for an exact duplicate); "
    "for a kept image, its highest with any image ranked above it in its cluster (null for the first)",
    "cluster": "its k-means cluster; null for images filtered or exact duplicates before clustering",
}


class CurationError(SetupError):
    """The output cannot be curated as asked: said before any work."""


@dataclass(frozen=True, kw_only=True)
class CurateConfig:
    """What ``unclip-batch curate`` and ``unclip_batch.curate`` take; checked here, before any work."""

    output: str
    min_clip_score: float | None = None  # images scored under this are dropped; none by default
    near_duplicate: float = NEAR_DUPLICATE  # cosine similarity at or above which two images are one
    clusters: int | None = None  # k-means clusters; default: one per IMAGES_PER_CLUSTER images
    seed: int = 0  # the sample and k-means's initialisation
    export: str | None = None  # write the kept samples here as shards
    format: str | None = None  # the export's format; default the output's own
    address: str | None = None
    device: str = "auto"  # for computing embeddings the output lacks
    storage_options: dict | None = field(default=None, repr=False)
    storage_retry_s: float = storage.RETRY_FOR_S
    verbose: bool = False

    def __post_init__(self):
        from unclip_batch.writer import FORMATS

        if self.min_clip_score is not None and not -1 <= self.min_clip_score <= 1:
            raise CurationError(f"--min-clip-score {self.min_clip_score}: a cosine similarity, in [-1, 1]")
        if not 0 < self.near_duplicate <= 1:
            raise CurationError(f"--near-duplicate {self.near_duplicate}: a cosine similarity in (0, 1]")
        if self.clusters is not None and self.clusters < 1:
            raise CurationError(f"--clusters {self.clusters}: at least 1")
        if self.format is not None and self.format not in FORMATS:
            raise CurationError(f"--format {self.format!r}: one of {', '.join(FORMATS)}")
        if self.format is not None and self.export is None:
            raise CurationError("--format names the export's format: give --export DEST too")


@dataclass(frozen=True)
class Plan:
    """What every stage needs to know of the whole curation: small, whatever the dataset's size."""

    output: Location
    parts: tuple[tuple[str, ...], ...]  # metadata files (relative to the output), a part each
    images: int
    clusters: int
    buckets: int  # sha256 buckets of the exact stage
    sample_rate: float
    min_clip_score: float | None
    near_duplicate: float
    seed: int
    embeddings_from: str  # "metadata", or "curation" where they were computed from the images
    retry_for_s: float = storage.RETRY_FOR_S

    def settings(self) -> dict:
        """What makes two curations one: resumed only where these are equal."""
        return {
            "min_clip_score": self.min_clip_score,
            "near_duplicate": self.near_duplicate,
            "clusters": self.clusters,
            "seed": self.seed,
            "images": self.images,
            "parts": len(self.parts),
            "embeddings_from": self.embeddings_from,
        }


# -- the plan: read before any work ------------------------------------------------------------------------


def make_plan(config: CurateConfig, output: Location) -> tuple[Plan, dict]:
    """The plan and the output's job record, or a CurationError saying why this output cannot be curated."""
    from unclip_batch.plan import JOB_RECORD, SUCCESS, read_job_record

    record = read_job_record(output)
    if record is None:
        raise CurationError(f"{storage.redact(output.url)} is not an unclip-batch output: it has no {JOB_RECORD}")
    try:
        summary = json.loads(output.read(SUCCESS))
    except FileNotFoundError:
        raise CurationError(
            f"{storage.redact(output.url)} is an unfinished job (no {SUCCESS}): rerun the job to finish it first"
        ) from None
    # The shards' metadata as a job names it: other files there are not the job's (an output's earlier contents).
    files = tuple(f for f in output.files("metadata") if SHARD_FILE.fullmatch(f))
    images = summary.get("images_total")
    if images is None:  # an output from before the summary counted them: its files' footers do
        images = sum(pq.read_metadata(output.path(f), filesystem=output.fs).num_rows for f in files)
    if not files or images == 0:
        raise CurationError(f"{storage.redact(output.url)} has no images to curate")
    shards_per_part = max(1, IMAGES_PER_PART * len(files) // max(images, 1))
    parts = tuple(files[i : i + shards_per_part] for i in range(0, len(files), shards_per_part))
    clusters = config.clusters or max(1, min(math.ceil(images / IMAGES_PER_CLUSTER), MAX_SAMPLE // SAMPLE_PER_CLUSTER))
    sample = min(MAX_SAMPLE, max(SAMPLE_PER_CLUSTER * clusters, 10_000))
    plan = Plan(
        output=output,
        parts=parts,
        images=images,
        clusters=clusters,
        buckets=len(parts),
        sample_rate=min(1.0, sample / images),
        min_clip_score=config.min_clip_score,
        near_duplicate=config.near_duplicate,
        seed=config.seed,
        embeddings_from="metadata" if record.get("embeddings") else "curation",
        retry_for_s=config.storage_retry_s,
    )
    return plan, record


def work_file(stage: str, index: int) -> str:
    return f"{WORK}/{stage}/{index:05d}.parquet"


def record_file(part: int) -> str:
    return f"{FOLDER}/records/{part:05d}.parquet"


def embedding_file(part: int) -> str:
    return f"{FOLDER}/embeddings/{part:05d}.parquet"


# -- reading and writing ----------------------------------------------------------------------------------


def write_table(output: Location, relative: str, table: pa.Table, meta: dict | None = None, retry_for_s=60.0):
    if meta is not None:
        table = table.replace_schema_metadata({b"unclip_batch": json.dumps(meta, sort_keys=True).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP)
    output.write(relative, buffer.getvalue(), retry_for_s)


def read_table(output: Location, relative: str, columns=None, filters=None) -> pa.Table:
    return pq.read_table(output.path(*relative.split("/")), filesystem=output.fs, columns=columns, filters=filters)


def table_meta(output: Location, relative: str) -> dict:
    schema = pq.read_schema(output.path(*relative.split("/")), filesystem=output.fs)
    return json.loads(schema.metadata[b"unclip_batch"])


def _gather(output: Location, stage: str, count: int, column: str, value, columns=None) -> pa.Table:
    """The rows with ``column == value`` from each of a stage's files (row groups skipped by their statistics)."""
    tables = [read_table(output, work_file(stage, i), columns, [(column, "=", value)]) for i in range(count)]
    return pa.concat_tables(tables)


def part_rows(plan: Plan, part: int, columns: list[str]):
    """A part's metadata rows, a table per shard file."""
    for file in plan.parts[part]:
        yield read_table(plan.output, file, columns)


def part_embeddings(plan: Plan, part: int) -> tuple[pa.Table, np.ndarray]:
    """A part's image_key, id, k, sha256 and clip_score, and its embeddings (float32, one row each)."""
    small = ["id", "k", "image_key", "sha256", "clip_score"]
    tables, vectors = [], []
    for table in part_rows(plan, part, small + (["embedding"] if plan.embeddings_from == "metadata" else [])):
        tables.append(table.select(small))
        if plan.embeddings_from == "metadata":
            vectors.append(embedding_matrix(table["embedding"]))
    rows = pa.concat_tables(tables)
    if plan.embeddings_from == "curation":
        computed = read_table(plan.output, embedding_file(part))
        if computed["image_key"].to_pylist() != rows["image_key"].to_pylist():
            raise CurationError(f"{embedding_file(part)} does not match the metadata; remove {WORK} and rerun")
        vectors = [embedding_matrix(computed["embedding"])]
    return rows, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column as an N x d array; a CurationError where rows lack one or differ in length."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise CurationError(
            f"{column.null_count} images have no embedding: the output mixes runs with and without --embeddings"
        )
    lengths = pc.list_value_length(column)
    if len(column) and pc.min(lengths).as_py() != pc.max(lengths).as_py():
        raise CurationError(
            f"embeddings of mixed dimensions ({pc.min(lengths).as_py()} to {pc.max(lengths).as_py()}): not one model's"
        )
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), -1) if len(column) else np.zeros((0, 0), np.float32)


def normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def ranked(table: pa.Table) -> pa.Table:
    """Best first: highest clip_score (none last), then the smaller image_key."""
    score = pc.fill_null(table["clip_score"], -math.inf)
    return (
        table.append_column("_score", score)
        .sort_by([("_score", "descending"), ("image_key", "ascending")])
        .drop_columns(["_score"])
    )


# -- the stages ---------------------------------------------------------------------------------------------


def scan(plan: Plan, part: int) -> dict:
    """A part's small columns, bucketed by sha256 for the exact stage, a seeded sample of its embeddings for
    k-means, and its diversity numbers (images of one row compared with each other)."""
    rows, vectors = part_embeddings(plan, part)
    n = rows.num_rows
    keys = rows.append_column("part", pa.array(np.full(n, part, np.int32)))
    keys = keys.append_column("row", pa.array(np.arange(n, dtype=np.int64)))
    keys = keys.append_column("bucket", pa.array(_hash_of(rows["sha256"], "", plan.buckets), pa.int32()))
    unit = _unit_hash(rows["image_key"], plan.seed)
    sample = normalised(vectors[unit < plan.sample_rate])
    plan.output.write(f"{WORK}/sample/{part:05d}.npy", _npy(sample), plan.retry_for_s)
    meta = {"images": n, "dims": int(vectors.shape[1]) if n else 0, **diversity(rows, vectors, plan)}
    write_table(
        plan.output,
        work_file("scan", part),
        keys.sort_by([("bucket", "ascending"), ("row", "ascending")]),
        meta,
        plan.retry_for_s,
    )
    return {"images": len(unit)}


def _hash_of(values: pa.ChunkedArray, salt: str, buckets: int) -> np.ndarray:
    return np.array(
        [int(hashlib.sha256(f"{salt}{v}".encode()).hexdigest()[:15], 16) % buckets for v in values.to_pylist()],
        np.int64,
    )


def _unit_hash(values: pa.ChunkedArray, seed: int) -> np.ndarray:
    """A number in [0, 1) per value, fixed by the value and the seed: the sample is the same in any order."""
    return _hash_of(values, f"{seed}:", 1 << 60) / float(1 << 60)


def diversity(rows: pa.Table, vectors: np.ndarray, plan: Plan) -> dict:
    """Per row id with several images: the mean cosine similarity of its images' pairs, summed, and whether
    all its pairs are near-duplicates (the prompt gave one picture, whatever the seed)."""
    ids = rows["id"].to_pylist()
    total, prompts, collapsed = 0.0, 0, 0
    start = 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and ids[end] == ids[start]:
            continue
        if end - start >= 2:
            unit = normalised(vectors[start:end].astype(np.float64))
            similar = unit @ unit.T
            pairs = similar[np.triu_indices(end - start, 1)]
            total, prompts = total + float(pairs.mean()), prompts + 1
            collapsed += bool(pairs.min() >= plan.near_duplicate)
        start = end
    return {"similarity_sum": total, "prompts": prompts, "collapsed": collapsed}


def fit(plan: Plan, _: int = 0) -> dict:
    """Spherical k-means on the sample (faiss, seeded; its result does not depend on its threads)."""
    import os

    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # alone at this point; Ray set the worker's threads to 1
    sample = np.concatenate([_load_npy(plan.output, f"{WORK}/sample/{p:05d}.npy") for p in range(len(plan.parts))])
    clusters = max(1, min(plan.clusters, len(sample)))
    if clusters == 1:
        centroids = normalised(sample.mean(axis=0, keepdims=True)) if len(sample) else np.zeros((1, 1), np.float32)
    else:
        kmeans = faiss.Kmeans(
            sample.shape[1],
            clusters,
            niter=KMEANS_ITERATIONS,
            seed=plan.seed,
            spherical=True,
            max_points_per_centroid=1 << 20,
            verbose=False,
        )
        kmeans.train(np.ascontiguousarray(sample, np.float32))
        centroids = kmeans.centroids
    plan.output.write(f"{WORK}/centroids.npy", _npy(np.asarray(centroids, np.float32)), plan.retry_for_s)
    return {"clusters": len(centroids), "sample": len(sample)}


def exact(plan: Plan, bucket: int) -> dict:
    """The images under the CLIP score threshold, then the exact duplicates among the rest (same sha256):
    the decisions for the images this stage removes, by part and row."""
    rows = _gather(
        plan.output, "scan", len(plan.parts), "bucket", bucket, ["image_key", "sha256", "clip_score", "part", "row"]
    )
    low = np.zeros(rows.num_rows, bool)
    if plan.min_clip_score is not None:
        low = pc.fill_null(pc.less(rows["clip_score"], plan.min_clip_score), False).to_numpy(zero_copy_only=False)
    decided = []
    for row in rows.filter(pa.array(low)).to_pylist():
        decided.append({**_where(row), "reason": "low_clip_score", "duplicate_of": None, "similarity": None})
    rest = ranked(rows.filter(pa.array(~low))).to_pylist()
    first: dict[str, str] = {}
    for row in rest:  # best first: the first of each sha256 is its group's kept image
        if row["sha256"] in first:
            decided.append(
                {**_where(row), "reason": "exact_duplicate", "duplicate_of": first[row["sha256"]], "similarity": 1.0}
            )
        else:
            first[row["sha256"]] = row["image_key"]
    table = _decisions(decided)
    write_table(plan.output, work_file("exact", bucket), table, None, plan.retry_for_s)
    return {"removed": table.num_rows}


def _where(row: dict) -> dict:
    return {"part": row["part"], "row": row["row"], "image_key": row["image_key"]}


DECISION_SCHEMA = pa.schema(
    [
        ("part", pa.int32()),
        ("row", pa.int64()),
        ("image_key", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float32()),
        ("cluster", pa.int32()),
    ]
)


def _decisions(decided: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist([{"cluster": None, **d} for d in decided], schema=DECISION_SCHEMA)
    return table.sort_by([("part", "ascending"), ("row", "ascending")])


def assign(plan: Plan, part: int, centroids: np.ndarray) -> dict:
    """Each image the exact stage left to its nearest centroid, rows sorted by cluster for the dedup stage."""
    rows, vectors = part_embeddings(plan, part)
    removed = _gather(plan.output, "exact", plan.buckets, "part", part, ["row"])["row"].to_numpy()
    left = np.ones(rows.num_rows, bool)
    left[removed] = False
    unit = normalised(vectors[left])
    nearest = _nearest(unit, centroids)
    table = pa.table(
        {
            "cluster": pa.array(nearest, pa.int32()),
            "part": pa.array(np.full(len(unit), part, np.int32)),
            "row": pa.array(np.flatnonzero(left), pa.int64()),
            "image_key": rows["image_key"].filter(pa.array(left)),
            "clip_score": rows["clip_score"].filter(pa.array(left)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit.ravel(), pa.float32()), unit.shape[1] or 1)
            if len(unit)
            else pa.array([], pa.list_(pa.float32(), unit.shape[1] or 1)),
        }
    )
    counts = np.bincount(nearest, minlength=len(centroids))
    meta = {"counts": {str(c): int(n) for c, n in enumerate(counts) if n}}
    write_table(
        plan.output,
        work_file("assign", part),
        table.sort_by([("cluster", "ascending"), ("row", "ascending")]),
        meta,
        plan.retry_for_s,
    )
    return {"images": len(unit)}


def _nearest(unit: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    out = np.zeros(len(unit), np.int64)
    for start in range(0, len(unit), chunk):
        out[start : start + chunk] = np.argmax(unit[start : start + chunk] @ centroids.T, axis=1)
    return out


def pack_clusters(counts: dict[int, int], clusters: int, per_bucket: int = IMAGES_PER_BUCKET) -> list[tuple[int, int]]:
    """Contiguous cluster ranges [lo, hi) of about ``per_bucket`` images each (a bigger cluster alone)."""
    ranges, lo, size = [], 0, 0
    for cluster in range(clusters):
        n = counts.get(cluster, 0)
        if size and size + n > per_bucket:
            ranges.append((lo, cluster))
            lo, size = cluster, 0
        size += n
    ranges.append((lo, clusters))
    return ranges


def dedup(plan: Plan, index: int, ranges: list[tuple[int, int]]) -> dict:
    """The near-duplicates within each cluster of the index-th range: kept, or near_duplicate of a better image."""
    lo, hi = ranges[index]
    tables = [
        read_table(plan.output, work_file("assign", p), None, [("cluster", ">=", lo), ("cluster", "<", hi)])
        for p in range(len(plan.parts))
    ]
    rows = pa.concat_tables(tables)
    decided = []
    for cluster in np.unique(rows["cluster"].to_numpy()) if rows.num_rows else []:
        members = ranked(rows.filter(pc.equal(rows["cluster"], int(cluster))))
        vectors = embedding_matrix(members["embedding"])
        groups = [np.arange(members.num_rows)]
        if members.num_rows > MAX_CLUSTER:
            groups = split_cluster(vectors, plan.seed)
        keys = members["image_key"].to_pylist()
        where = members.select(["part", "row"]).to_pylist()
        for group in groups:
            best, similarity = near_duplicates(vectors[group])
            for i, j, s in zip(group, best, similarity):
                duplicate = j >= 0 and s >= plan.near_duplicate
                decided.append(
                    {
                        **where[i],
                        "image_key": keys[i],
                        "reason": "near_duplicate" if duplicate else "kept",
                        "duplicate_of": keys[group[j]] if duplicate else None,
                        "similarity": float(s) if j >= 0 else None,
                        "cluster": int(cluster),
                    }
                )
    table = _decisions(decided)
    write_table(plan.output, work_file("dedup", index), table, None, plan.retry_for_s)
    return {"rows": table.num_rows}


def near_duplicates(vectors: np.ndarray, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """For each row (rows best first, unit length), the row above it most similar to it and that similarity
    (-1 and -inf for the first). Computed tile by tile: memory of two tiles. Other tile sizes give the same
    pairs, but BLAS may round a block of another shape differently in the last bit: TILE is a constant."""
    n = len(vectors)
    best, similarity = np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    for a in range(0, n, tile):
        rows = vectors[a : a + tile]
        for b in range(0, a + 1, tile):
            block = rows @ vectors[b : b + tile].T
            if b == a:  # only the rows above each row
                block[np.triu_indices(len(rows), 0, block.shape[1])] = -np.inf
            j = np.argmax(block, axis=1)
            s = block[np.arange(len(rows)), j]
            better = s > similarity[a : a + tile]  # ties keep the earlier (better-ranked) row
            similarity[a : a + tile][better] = s[better]
            best[a : a + tile][better] = j[better] + b
    return best, similarity


def split_cluster(vectors: np.ndarray, seed: int) -> list[np.ndarray]:
    """A cluster too large to compare pair by pair, split by k-means into clusters of the default size."""
    import faiss

    pieces = math.ceil(len(vectors) / IMAGES_PER_CLUSTER)
    kmeans = faiss.Kmeans(vectors.shape[1], pieces, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors, np.float32))
    nearest = _nearest(vectors, kmeans.centroids)
    return [np.flatnonzero(nearest == c) for c in range(pieces) if (nearest == c).any()]


def finalize(plan: Plan, part: int, buckets: int) -> dict:
    """One record per image of a part, in the output's order, from the exact and dedup stages' decisions."""
    keys = read_table(plan.output, work_file("scan", part), ["id", "k", "image_key", "clip_score", "row"])
    keys = keys.sort_by("row")
    decided = pa.concat_tables(
        [
            _gather(plan.output, "exact", plan.buckets, "part", part),
            _gather(plan.output, "dedup", buckets, "part", part),
        ]
    ).sort_by("row")
    if decided["row"].to_pylist() != keys["row"].to_pylist():  # every image exactly once
        raise RuntimeError(f"part {part}: {decided.num_rows} decisions for {keys.num_rows} images")
    reason = decided["reason"]
    records = pa.table(
        {
            "id": keys["id"],
            "k": pc.cast(keys["k"], pa.int32()),
            "image_key": keys["image_key"],
            "clip_score": keys["clip_score"],
            "keep": pc.equal(reason, "kept"),
            "reason": reason,
            "duplicate_of": decided["duplicate_of"],
            "similarity": decided["similarity"],
            "cluster": decided["cluster"],
        },
        schema=RECORD_SCHEMA,
    )
    counts = {r: 0 for r in REASONS}
    for value in pc.value_counts(reason).to_pylist():
        counts[value["values"]] = value["counts"]
    scores = pc.drop_null(keys["clip_score"]).to_numpy()
    histogram = np.histogram(scores, HISTOGRAM_BINS, (-1.0, 1.0))[0]
    meta = {"by_reason": counts, "histogram": histogram.tolist()}
    write_table(plan.output, record_file(part), records, meta, plan.retry_for_s)
    return meta


def image_bytes(output: Location, keys: list[str]) -> list[bytes]:
    """The PNG bytes of images by their image_key (a file of their own, or a sample in a shard file). Keys are
    the output's earlier contents: only keys of the forms a job writes are read."""
    from unclip_batch.report import _SHARD_FILE
    from unclip_batch.writer import IMAGE_KEY, shard_pngs

    found: dict[str, bytes] = {}
    for file in sorted({k.split("#")[0] for k in keys if "#" in k}):
        if not _SHARD_FILE.fullmatch(file):
            raise CurationError(f"image key {file!r} names no shard file a job writes")
        found.update(shard_pngs(output, file))
    for key in keys:
        if "#" not in key:
            if not IMAGE_KEY.fullmatch(key):
                raise CurationError(f"image key {key!r} is not one a job writes")
            found[key] = output.read(*key.split("/"))
    missing = [k for k in keys if k not in found]
    if missing:
        raise CurationError(f"{len(missing)} images are missing from the output, e.g. {missing[0]}")
    return [found[k] for k in keys]


def embed_part(plan: Plan, part: int, model, chunk: int = 64) -> dict:
    """A part's CLIP image embeddings computed from its stored images by the output's own model, kept in
    curation/embeddings/<part>.parquet (image_key, embedding) in the metadata's order."""
    from PIL import Image

    keys = pa.concat_tables(list(part_rows(plan, part, ["image_key"])))["image_key"].to_pylist()
    vectors = []
    for start in range(0, len(keys), chunk):
        images = [
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for data in image_bytes(plan.output, keys[start : start + chunk])
        ]
        _, embeds = model.clip(images, [""] * len(images))
        vectors.append(np.asarray(embeds, np.float32))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
    table = pa.table({"image_key": keys, "embedding": pa.array(list(matrix), pa.list_(pa.float32()))})
    write_table(plan.output, embedding_file(part), table, None, plan.retry_for_s)
    return {"images": len(keys)}


def _npy(array: np.ndarray) -> bytes:
    from unclip_batch.writer import npy_bytes

    return npy_bytes(array)


def _load_npy(output: Location, relative: str) -> np.ndarray:
    return np.load(io.BytesIO(output.read(*relative.split("/"))), allow_pickle=False)


# -- the whole curation ---------------------------------------------------------------------------------------


def curate(config: CurateConfig) -> dict:
    """Curate ``config.output`` (resuming where an earlier curate with the same settings stopped) and export
    its kept samples with ``config.export``; returns the curation's summary (``curation/_SUCCESS``)."""
    from unclip_batch import pipeline
    from unclip_batch.storage import Stores

    started = time.time()
    stores = Stores(config.storage_options, [config.output, *([config.export] if config.export else [])])
    try:
        output = stores.location(config.output)
        export_to = stores.location(config.export) if config.export else None
    except ValueError as exc:
        raise CurationError(str(exc)) from exc
    plan, record = make_plan(config, output)
    if export_to is not None:
        from unclip_batch import export

        export.check_destination(output, export_to, config.format or record.get("format", "files"), plan.settings())
    if plan.embeddings_from == "curation":
        _check_model_has_clip(record["model"], stores)
    summary = _finished(plan)
    if summary is None or export_to is not None:
        pipeline.ensure_ray_for(config.address, config.verbose)
    if summary is None:
        _start_or_resume(plan)
        summary = _run_stages(plan, config, record, stores, started)
    if export_to is not None:
        from unclip_batch import export

        summary["export"] = export.export(plan, export_to, config.format or record.get("format", "files"), stores)
    return summary


def _check_model_has_clip(model: str, stores) -> None:
    from unclip_batch.models import ModelSpec

    if ModelSpec.parse(model).family == "null":
        raise CurationError(
            f"the output was made without --embeddings by model {model!r}, which has no CLIP image encoder to "
            "compute them: rerun the job with a CLIP model and --embeddings"
        )


def _finished(plan: Plan) -> dict | None:
    try:
        summary = json.loads(plan.output.read(FOLDER, "_SUCCESS"))
    except FileNotFoundError:
        return None
    return summary if summary.get("settings") == plan.settings() else None


def _start_or_resume(plan: Plan) -> None:
    """Resume a curation with the same settings; else start over (the old one's files are ours to remove)."""
    settings = json.dumps(plan.settings(), sort_keys=True).encode()
    try:
        same = plan.output.read(WORK, "settings.json") == settings
    except FileNotFoundError:
        same = False
    if not same:  # what an earlier curation wrote, but the embeddings computed from the images (still right)
        if plan.output.files(FOLDER):
            logger.info("curation: replacing an earlier curation made with other settings")
        for folder in (WORK, f"{FOLDER}/records", f"{FOLDER}/_SUCCESS"):
            plan.output.remove(*folder.split("/"), retry_for_s=plan.retry_for_s)
        plan.output.write(f"{WORK}/settings.json", settings, plan.retry_for_s)


def _run_stages(plan: Plan, config: CurateConfig, record: dict, stores, started: float) -> dict:
    """The stages in order, each over what is not done yet; the summary written last."""
    from unclip_batch import pipeline

    parts = range(len(plan.parts))
    done = set(plan.output.files(FOLDER))
    peaks: list[float] = []  # each task's worker's peak memory (pipeline.each measures it)

    def run(stage, items, **kwargs) -> None:
        peaks.extend(
            r.get("peak_mb", 0.0)
            for r in pipeline.each(stage, [i for i, f in items if f not in done], plan=plan, **kwargs)
        )

    if plan.embeddings_from == "curation":
        pending = [p for p in parts if embedding_file(p) not in done]
        pipeline.embed_parts(plan, pending, record["model"], config.device, stores)
    run(scan, [(p, work_file("scan", p)) for p in parts])
    scans = [table_meta(plan.output, work_file("scan", p)) for p in parts]
    dims = {s["dims"] for s in scans if s["images"]}
    if len(dims) > 1:
        raise CurationError(f"embeddings of mixed dimensions across the output: {sorted(dims)}")
    run(fit, [(0, f"{WORK}/centroids.npy")])
    centroids = _load_npy(plan.output, f"{WORK}/centroids.npy")
    run(exact, [(b, work_file("exact", b)) for b in range(plan.buckets)])
    run(assign, [(p, work_file("assign", p)) for p in parts], centroids=centroids)
    counts: dict[int, int] = {}
    for p in parts:
        for cluster, n in table_meta(plan.output, work_file("assign", p))["counts"].items():
            counts[int(cluster)] = counts.get(int(cluster), 0) + n
    ranges = pack_clusters(counts, len(centroids))
    run(dedup, [(c, work_file("dedup", c)) for c in range(len(ranges))], ranges=ranges)
    run(finalize, [(p, record_file(p)) for p in parts], buckets=len(ranges))
    return _summarise(plan, scans, len(ranges), max(peaks, default=None), started)


def _summarise(plan: Plan, scans: list[dict], dedup_tasks: int, peak: float | None, started: float) -> dict:
    by_reason = {r: 0 for r in REASONS}
    histogram = np.zeros(HISTOGRAM_BINS, np.int64)
    for p in range(len(plan.parts)):
        meta = table_meta(plan.output, record_file(p))
        for reason, n in meta["by_reason"].items():
            by_reason[reason] += n
        histogram += np.array(meta["histogram"])
    prompts = sum(s["prompts"] for s in scans)
    summary = {
        "output": storage.redact(plan.output.url),
        "images": sum(s["images"] for s in scans),
        "kept": by_reason["kept"],
        "by_reason": by_reason,
        "settings": plan.settings(),
        "clusters": {"fitted": plan.clusters, "dedup_tasks": dedup_tasks},
        "clip_score_histogram": {"range": [-1.0, 1.0], "counts": histogram.tolist()},
        "diversity": {
            "prompts_with_several_images": prompts,
            "mean_similarity_within_prompt": sum(s["similarity_sum"] for s in scans) / prompts if prompts else None,
            "share_all_near_duplicates": sum(s["collapsed"] for s in scans) / prompts if prompts else None,
        },
        # The largest peak memory (RSS) of a worker process that ran one of this run's tasks, in MiB.
        "worker_peak_mb": round(peak, 1) if peak else None,
        "started": _iso(started),
        "finished": _iso(time.time()),
        "wall_s": round(time.time() - started, 3),
    }
    plan.output.write(f"{FOLDER}/_SUCCESS", (json.dumps(summary, indent=2) + "\n").encode(), plan.retry_for_s)
    plan.output.remove(*WORK.split("/"), retry_for_s=plan.retry_for_s)
    storage.clear_partial(plan.output)
    logger.info("curation: %d of %d images kept (%s)", summary["kept"], summary["images"], by_reason)
    return summary


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def records(output: Location, columns=None) -> pa.Table | None:
    """Every curation record of an output (None where it has no finished curation)."""
    files = [f for f in output.files(FOLDER, "records") if f.endswith(".parquet")]
    if not files:
        return None
    return pa.concat_tables([read_table(output, f, columns) for f in files])
