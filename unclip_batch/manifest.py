"""Manifests: read Parquet, check the whole manifest, validate and normalise each row.

Whole-manifest problems (unreadable, no ``id``, a column of the wrong type, no rows) raise
``ManifestError`` before any model loads. Row problems become error records with a stable code.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip_batch import sampling, storage
from unclip_batch.errors import ManifestError, RowError
from unclip_batch.sampling import Sampling
from unclip_batch.sources import check_source
from unclip_batch.storage import Location, Stores
from unclip_batch.writer import OUTPUT_COLUMNS

logger = logging.getLogger(__name__)

TASKS = ("generate", "variation", "inpaint", "interpolate", "text_diff")
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_NUM_IMAGES = 16  # OpenAI's Images API allows up to 10; a GPU batch of 16 fits every model we serve
MAX_PROMPT_CHARS = 1000  # OpenAI's limit for DALL-E 2; CLIP reads only the first 77 tokens anyway
# Candidate c of image k uses seed + k * best_of + c (image k: seed + k with best_of 1), within an int64.
MAX_SEED = 2**63 - 1 - MAX_NUM_IMAGES * sampling.MAX_BEST_OF
TEXT_MANIFESTS = (".csv", ".jsonl", ".json", ".txt")  # what `unclip-batch manifest build` turns into Parquet

STRING_COLUMNS = ("task", "prompt", "negative_prompt", "image", "mask", "image2", "prompt2", "source_prompt")
# Every sampling setting is a column of its own name (sampling.py declares them).
INT_COLUMNS = ("num_images", "seed") + tuple(n for n in sampling.NAMES if sampling.KINDS[n] is int)
FLOAT_COLUMNS = ("strength",) + tuple(n for n in sampling.NAMES if sampling.KINDS[n] is float)
DEFAULT_STRENGTH = 0.5  # text_diff: how far along the captions' difference (DALL-E 2's figure 5 goes to 0.5)
KNOWN_COLUMNS = ("id",) + STRING_COLUMNS + INT_COLUMNS + FLOAT_COLUMNS
SOURCE_COLUMNS = ("image", "mask", "image2")  # URLs or paths, relative ones to the manifest's folder
# Columns any output format writes beside the manifest's own: a manifest column may not shadow them.
RESERVED_COLUMNS = tuple(sorted(set(OUTPUT_COLUMNS) - set(KNOWN_COLUMNS)))
# Bookkeeping columns added to the manifest table (leading underscore: never a user column).
ROW, MANIFEST, MANIFEST_ROW, FOLDER, FIRST = "_row", "_manifest", "_manifest_row", "_folder", "_first"
BOOKKEEPING = (ROW, MANIFEST, MANIFEST_ROW, FOLDER, FIRST)


@dataclass(frozen=True)
class Row(Sampling):
    """One valid, normalised manifest row: every default filled in, every value checked. Its sampling
    settings are Sampling's fields (checked there); these are the rest."""

    row: int  # position across all manifests of the job
    id: str
    task: str
    prompt: str
    negative_prompt: str
    image: str  # source image URL ("" for generate)
    mask: str  # mask URL ("" = none)
    num_images: int
    seed: int
    input_hash: str = ""  # of the row as written (see input_hash): a resume spots a row changed under its id
    # interpolate: the second end (an image, or a prompt); text_diff: the image's caption and how far to go.
    image2: str = ""
    prompt2: str = ""
    source_prompt: str = ""
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self):
        if self.task not in TASKS:
            raise RowError("unknown_task", f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task in ("generate", "inpaint") and not self.prompt.strip():
            raise RowError("missing_prompt", f"task {self.task!r} needs a non-empty prompt")
        for name in ("prompt", "negative_prompt", "prompt2", "source_prompt"):
            _check_text(name, getattr(self, name))
        if self.task == "interpolate":
            self._check_interpolate()
        elif self.task == "text_diff":
            self._check_text_diff()
        elif self.image2 or self.prompt2 or self.source_prompt:
            raise RowError(
                "unused_column",
                f"task {self.task!r} does not use image2, prompt2 or source_prompt (interpolate and text_diff do); "
                "leave them empty, or set the task",
            )
        if self.task == "generate" and (self.image or self.mask):
            raise RowError(
                "unexpected_image",
                "task 'generate' takes no image or mask; set task to "
                "'variation' or 'inpaint', or leave image and mask empty",
            )
        if self.task in ("variation", "inpaint", "text_diff") and not self.image:
            raise RowError("missing_image", f"task {self.task!r} needs an image (URL or path)")
        if self.task == "variation" and self.mask:
            raise RowError("unexpected_image", "task 'variation' takes no mask; use task 'inpaint' to repaint")
        if self.task == "variation" and self.negative_prompt:
            raise RowError(
                "unused_column",
                "task 'variation' takes no negative_prompt (its prompt steers it; only generate and inpaint "
                "steer away from a negative prompt): leave it empty",
            )
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:
            raise RowError("invalid_num_images", f"num_images is {self.num_images}; use 1-{MAX_NUM_IMAGES}")
        if not 0 <= self.seed <= MAX_SEED:
            raise RowError("invalid_seed", f"seed is {self.seed}; use 0-{MAX_SEED}, or leave it empty")
        if self.best_of > 1 and not self.prompt.strip():
            raise RowError(
                "invalid_best_of",
                f"best_of is {self.best_of}, but candidates are ranked by their CLIP score against the prompt "
                "and this row has none: give it a prompt, or best_of 1",
            )
        super().__post_init__()

    def _check_interpolate(self):
        for end, image, prompt in (("first", "image", "prompt"), ("second", "image2", "prompt2")):
            given = [name for name in (image, prompt) if getattr(self, name).strip()]
            if len(given) != 1:
                raise RowError(
                    "missing_source" if not given else "ambiguous_source",
                    f"task 'interpolate' needs its {end} end as {image} or {prompt}, "
                    + ("and this row has neither" if not given else "not both"),
                )
        if self.mask or self.negative_prompt or self.source_prompt:
            raise RowError("unused_column", "task 'interpolate' takes no mask, negative_prompt or source_prompt")
        if self.best_of > 1:
            raise RowError(
                "invalid_best_of",
                f"best_of is {self.best_of}; an interpolation's frames share one noise so that they change "
                "smoothly, and choosing each frame's best would break that: use best_of 1",
            )

    def _check_text_diff(self):
        if not self.prompt.strip() or not self.source_prompt.strip():
            raise RowError(
                "missing_prompt",
                "task 'text_diff' needs source_prompt (what the image shows) and prompt (what it should show)",
            )
        if self.mask or self.image2 or self.prompt2 or self.negative_prompt:
            raise RowError("unused_column", "task 'text_diff' takes no mask, image2, prompt2 or negative_prompt")
        if not 0 <= self.strength <= 1:
            raise RowError("invalid_strength", f"strength is {self.strength}; use 0-1 (0: the image's own variation)")


ROW_FIELDS = tuple(f.name for f in fields(Row))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_text(name: str, text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise RowError("prompt_too_long", f"{name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "\ufffd" in text:
        raise RowError(
            "invalid_prompt",
            f"{name} contains U+FFFD replacement characters: the text was decoded "
            "with the wrong encoding; re-export the manifest as UTF-8",
        )
    control = _CONTROL.search(text)
    if control:
        raise RowError(
            "invalid_prompt",
            f"{name} contains the control character U+{ord(control.group()):04X} "
            f"at position {control.start()}; remove it",
        )


def input_hash(record: dict) -> str:
    """A fingerprint of a manifest row as written: every known column that has a value (a column left out
    is the same as one left empty, so a column added in a later version changes no earlier row's hash),
    numbers compared as values (5 and 5.0 agree). Recorded with the row's output, so a rerun can tell a
    row changed under the same id from one already done."""
    values = {name: _canonical(record.get(name)) for name in sorted(KNOWN_COLUMNS)}
    text = json.dumps({k: v for k, v in values.items() if v is not None}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value):
    if isinstance(value, float):
        if math.isnan(value):
            return None  # pandas' missing number
        if value.is_integer():
            return int(value)
    return value


def default_seed(row_id: str) -> int:
    """A seed derived from the id, so a row without one is still reproducible (32 bits, like numpy's)."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big")


# -- reading ------------------------------------------------------------------------------------
def read_manifests(
    urls: tuple[str, ...] | list[str], stores: Stores | None = None, limit: int | None = None
) -> pa.Table:
    """All manifests as one table with bookkeeping columns; raises ManifestError for unusable input."""
    stores = stores or Stores(None)
    tables = [_read_one(url, stores) for url in urls]
    table = pa.concat_tables(tables, promote_options="permissive")
    if limit is not None:
        table = table.slice(0, limit)
    table = table.append_column(ROW, pa.array(range(table.num_rows), pa.int64()))
    return table.append_column(FIRST, first_occurrence(table))


def _read_one(url: str, stores: Stores) -> pa.Table:
    """One manifest read whole, in this process (``validate``; a job reads shards in tasks instead)."""
    if "://" not in url:  # workers may run in another folder: relative sources must not depend on it
        url = os.path.abspath(url)
    fs, path, is_dir = _locate(url, stores)
    with _reading(url):
        # A folder's files one by one: read as one dataset, columns only later files have would be dropped.
        files = parquet_files(fs, path, url) if is_dir else [path]
        tables = [pq.read_table(f, filesystem=fs) for f in files]
        table = pa.concat_tables(tables, promote_options="permissive")
    _check_schema(url, table.schema)
    if table.num_rows == 0:
        raise ManifestError(f"manifest {url} has no rows")
    folder = _folder(url, is_dir)
    n = table.num_rows
    for name in ("id",) + STRING_COLUMNS:  # plain strings from here on, whatever string type was written
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table[name], pa.string()))
    _warn_near_misses(url, table.column_names)
    return (
        table.append_column(MANIFEST, pa.array([url] * n, pa.string()))
        .append_column(MANIFEST_ROW, pa.array(range(n), pa.int64()))
        .append_column(FOLDER, pa.array([folder] * n, pa.string()).dictionary_encode())
    )


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a job's manifests, known from its footer alone (no rows read)."""

    manifest: str  # the manifest as the job names it: this file, or the folder it is in
    path: str  # the file, as its filesystem names it
    folder: str  # relative source paths in its rows resolve against this
    rows: int
    first: int  # manifest_row of its first row: a folder's files count on from each other, in name order
    version: str  # size and ETag or mtime: a file written again has another


def manifest_files(urls, stores: Stores | None = None) -> list[ManifestFile]:
    """Every Parquet file of the job's manifests, in order, from footers only: whole-manifest problems
    (unreadable, no ``id``, a column of the wrong type, no rows) raise ManifestError here, before any
    row is read. The footers are read side by side: a folder of thousands of files on S3 takes seconds."""
    found, stores = [], stores or Stores(None)
    for url in urls:
        if "://" not in url:  # workers may run in another folder: relative sources must not depend on it
            url = os.path.abspath(url)
        fs, path, is_dir = _locate(url, stores)
        paths = parquet_files(fs, path, url) if is_dir else [path]
        found.append((url, fs, paths, _folder(url, is_dir)))
    # Footers side by side: S3 round trips add up. (Not mutated: any pool size reads the same footers.)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # pragma: no mutate
        footers = [
            list(
                pool.map(_footer, [fs] * len(paths), paths, [url if len(paths) == 1 else f"{url} ({p})" for p in paths])
            )
            for url, fs, paths, _ in found
        ]
    files = []
    for (url, _, paths, folder), meta in zip(found, footers):
        first = 0
        columns = dict.fromkeys(name for schema, _, _ in meta for name in schema.names)
        _warn_near_misses(url, list(columns))
        for path, (_, rows, version) in zip(paths, meta):
            files.append(ManifestFile(url, path, folder, rows, first, version))
            first += rows
        if first == 0:
            raise ManifestError(f"manifest {url} has no rows")
    return files


def _folder(url: str, is_dir: bool) -> str:
    """Where a manifest's relative source paths start: the folder it names, or the one its file is in (a
    local manifest's URL is absolute by now, a remote one has its scheme: either has a '/')."""
    return url.rstrip("/") if is_dir else url.rsplit("/", 1)[0]


@contextlib.contextmanager
def _reading(where: str, failed: str = "could not be read as Parquet"):
    """Whatever goes wrong reading a manifest as a ManifestError that says which and what to fix."""
    try:
        yield
    except ManifestError:
        raise
    except PermissionError as exc:
        raise ManifestError(
            f"manifest {where}: access denied ({exc}); check the credentials (--storage-options or the AWS_* variables)"
        ) from exc
    except Exception as exc:  # pyarrow and fsspec raise many types for "this is not a Parquet file"
        raise ManifestError(f"manifest {where} {failed}: {exc}") from exc


def _locate(url: str, stores: Stores):
    """(filesystem, path, is a folder) of a manifest URL that exists and is not a text file."""
    with _reading(url, "could not be read"):
        location = stores.location(url)
        fs, path = location.fs, location.root
        is_dir = fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise ManifestError(f"manifest {url} does not exist")
    if not is_dir and path.lower().endswith(TEXT_MANIFESTS):
        raise ManifestError(
            f"manifest {url} is text, not Parquet: convert it with `unclip-batch manifest build {url} "
            f"-o {url.rsplit('.', 1)[0]}.parquet` (.txt a prompt a line, .csv, or .jsonl a row a line)"
        )
    return fs, path, is_dir


def _footer(fs, path: str, where: str) -> tuple[pa.Schema, int, str]:
    """(schema, rows, version) of one Parquet file, checked; its footer is all that is read."""
    with _reading(where):
        info = fs.info(path)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    _check_schema(where, schema)
    version = f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    return schema, meta.num_rows, version


def read_rows(manifest: Location, path: str, start: int, stop: int, columns) -> pa.Table:
    """Rows [start, stop) of a manifest's Parquet file (``path``, on the manifest's filesystem), the given
    columns that it has (string columns as plain strings, whatever string type was written); only the row
    groups holding them are read."""
    with manifest.fs.open(path) as f:  # binary, as fsspec opens by default
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        present = names if columns is None else [c for c in columns if c in names]
        groups, at, offset = [], 0, None
        for i in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(i).num_rows
            if at < stop and at + n > start:
                groups.append(i)
                offset = at if offset is None else offset
            at += n
        table = parquet.read_row_groups(groups, columns=present)  # no groups: no rows, the same columns
    table = table.slice(start - (offset or 0), stop - start)
    for name in ("id",) + STRING_COLUMNS:
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table[name], pa.string()))
    return table


def id_digests(ids: pa.Array) -> np.ndarray:
    """A 128-bit digest of each id (null ids: zeros), as two uint64 columns: duplicates are found by
    digest across every manifest file, in tasks, without any one process holding the ids."""
    # One join of the digests, then one array: 1.3 s per million ids here, 3.0 s as a row-by-row copy
    # (a resume of 3M rows waits on this scan before its first image).
    # Ids equal but for case are one file on macOS, Windows and SMB disks: they are one id here too.
    blake2b, null = hashlib.blake2b, bytes(16)
    digests = b"".join(
        null if value is None else blake2b(str(value).casefold().encode(), digest_size=16).digest()
        for value in ids.to_pylist()
    )
    return np.frombuffer(digests, dtype="<u8,<u8")  # read-only: no caller writes to it


def parquet_files(fs, path: str, url: str) -> list[str]:
    """The ``*.parquet`` files under a manifest folder, sorted; other files (source images beside the
    manifests, scripts, ``_SUCCESS``) are skipped and named once. Hidden and ``_``-prefixed entries are
    skipped as pyarrow's dataset discovery skips them."""
    found = sorted(
        p
        for p in fs.find(path)
        if not any(part.startswith((".", "_")) for part in posixpath.relpath(p, path).split("/"))
    )
    files = [p for p in found if p.endswith(".parquet")]
    skipped = [posixpath.relpath(p, path) for p in found if not p.endswith(".parquet")]
    if not files:
        raise ManifestError(
            f"manifest folder {url} has no *.parquet files"
            + (f" ({len(skipped)} other files, e.g. {skipped[0]})" if skipped else "")
        )
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning(
            "manifest folder %s: read %d *.parquet file(s), skipped %d other file(s): %s",
            url,
            len(files),
            len(skipped),
            shown,
        )
    return files


def _warn_near_misses(url: str, columns: list[str]) -> None:
    """A column that is not ours but nearly is (``prompts``) is carried through untouched: say so."""
    for name in columns:
        if name not in KNOWN_COLUMNS:
            close = difflib.get_close_matches(name.lower(), [c for c in KNOWN_COLUMNS if c not in columns])
            if close:
                logger.warning(
                    "manifest %s: column %r is not a manifest column and is carried through as it is; did you mean %r?",
                    url,
                    name,
                    close[0],
                )


def _string_like(kind: pa.DataType) -> bool:
    """Every Arrow string type: pandas categoricals arrive as dictionaries, newer writers as string_view."""
    if pa.types.is_dictionary(kind):
        return _string_like(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _check_schema(url: str, schema: pa.Schema) -> None:
    if "id" not in schema.names:
        raise ManifestError(
            f"manifest {url} has no 'id' column (columns: {', '.join(schema.names)}); every row needs a unique id"
        )
    checks = [("id", (_string_like, pa.types.is_integer), "string")]
    checks += [(c, (_string_like, pa.types.is_null), "string") for c in STRING_COLUMNS]
    checks += [(c, (pa.types.is_integer, pa.types.is_floating, pa.types.is_null), "integer") for c in INT_COLUMNS]
    checks += [(c, (pa.types.is_integer, pa.types.is_floating, pa.types.is_null), "number") for c in FLOAT_COLUMNS]
    for name, accepted, expected in checks:
        if name in schema.names and not any(ok(schema.field(name).type) for ok in accepted):
            raise ManifestError(
                f"manifest {url}: column {name!r} has type {schema.field(name).type}; expected {expected}"
            )
    clashes = [c for c in schema.names if c in RESERVED_COLUMNS or c.startswith("_")]
    if clashes:
        raise ManifestError(
            f"manifest {url}: column(s) {', '.join(clashes)} are reserved for the output "
            "(or start with '_'); rename them"
        )


def extra_columns(table: pa.Table) -> list[str]:
    """User columns carried through to the metadata untouched."""
    return [c for c in table.column_names if c not in KNOWN_COLUMNS and c not in BOOKKEEPING]


def first_occurrence(table: pa.Table) -> pa.ChunkedArray:
    """True for the first row of each id across all manifests (later ones are duplicates)."""
    folded = pc.utf8_lower(pc.cast(table["id"], pa.string()))  # ids are ASCII: lower is casefold (id_digests)
    keyed = pa.table({"id": folded, ROW: table[ROW]})
    firsts = keyed.group_by("id", use_threads=False).aggregate([(ROW, "min")])
    return pc.is_in(table[ROW], value_set=firsts[f"{ROW}_min"])


# -- validating ---------------------------------------------------------------------------------
def validate(
    table: pa.Table, defaults: dict, size: SizeRule, chunk_rows: int = 8192
) -> Iterator[tuple[list[Row], list[dict]]]:
    """Yield (valid rows, error records) per chunk of the table: memory stays flat for any manifest."""
    table = table.select([c for c in KNOWN_COLUMNS + BOOKKEEPING if c in table.column_names])
    for batch in table.to_batches(max_chunksize=chunk_rows):
        yield parse_records(batch.to_pylist(), defaults, size)


def parse_records(records: list[dict], defaults: dict, size: SizeRule) -> tuple[list[Row], list[dict]]:
    """(valid rows, error records) of raw manifest records with their bookkeeping columns."""
    rows, errors = [], []
    for record in records:
        try:
            rows.append(parse_row(record, defaults, size))
        except RowError as err:
            errors.append(error_record(record, "validate", err.code, err.message))
    return rows, errors


@dataclass(frozen=True)
class SizeRule:
    """The sizes a model accepts (from its config, see models.ModelInfo)."""

    default: int
    multiple: int
    maximum: int

    @classmethod
    def of(cls, info) -> SizeRule:
        """The rule of a models.ModelInfo."""
        return cls(default=info.default_size, multiple=info.size_multiple, maximum=info.max_size)

    def check(self, name: str, value: int) -> None:
        if value % self.multiple or not self.multiple <= value <= self.maximum:
            raise RowError(
                "unsupported_size",
                f"{name} is {value}; this model needs a multiple of "
                f"{self.multiple} between {self.multiple} and {self.maximum}",
            )


def parse_row(record: dict, defaults: dict, size: SizeRule) -> Row:
    """A raw manifest record -> Row, or RowError saying what to fix."""
    row_id = record["id"]
    if row_id is None or not ID_PATTERN.fullmatch(row_id):
        raise RowError("invalid_id", f"id {row_id!r} is not 1-128 characters of [A-Za-z0-9._-] (not starting with '.')")
    if not record[FIRST]:
        raise RowError(
            "duplicate_id",
            f"id {row_id!r} appears earlier in the manifests (ids are compared ignoring case: macOS, Windows "
            "and SMB disks keep 'A' and 'a' as one file); ids must be unique",
        )
    task = (record.get("task") or "generate").strip()
    folder = record[FOLDER]
    values = {}
    for name in INT_COLUMNS + FLOAT_COLUMNS:
        values[name] = _number(name, record.get(name), integer=name in INT_COLUMNS)
        if values[name] is None:
            values[name] = defaults.get(name, sampling.DEFAULTS.get(name))
    values["seed"] = default_seed(row_id) if values["seed"] is None else values["seed"]
    values["num_images"] = 1 if values["num_images"] is None else values["num_images"]
    if record.get("best_of") is None and (task == "interpolate" or not (record.get("prompt") or "").strip()):
        values["best_of"] = 1  # the job's --best-of applies where there is a prompt to rank by, not to frames
    values["strength"] = DEFAULT_STRENGTH if values["strength"] is None else values["strength"]
    for name in ("width", "height"):
        values[name] = size.default if values[name] is None else values[name]
        size.check(name, values[name])
    sources = {name: storage.resolve(record[name], folder) if record.get(name) else "" for name in SOURCE_COLUMNS}
    for url in filter(None, sources.values()):
        check_source(url, folder)
    return Row(
        row=record[ROW],
        id=row_id,
        task=task,
        prompt=record.get("prompt") or "",
        negative_prompt=record.get("negative_prompt") or "",
        **sources,
        prompt2=record.get("prompt2") or "",
        source_prompt=record.get("source_prompt") or "",
        input_hash=input_hash(record),
        **values,
    )


def _number(name: str, value, integer: bool):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # pandas writes missing numbers as NaN in float columns
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError("invalid_value", f"{name} is {value}; use a finite number")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise RowError("invalid_value", f"{name} is {value}; use a whole number")
        return int(value)
    return float(value)


_WORD = re.compile(r"[a-z]+")


class UnknownWords:
    """Words of valid rows' prompts that a closed-world model does not know (it draws as if they were not
    there): counted per word, with the first rows that use them, for one warning per job or validate."""

    def __init__(self, vocabulary: frozenset[str] | None):
        self.vocabulary = vocabulary
        self.words: dict[str, int] = {}
        self.rows = 0
        self.checked = 0  # rows with a prompt of any kind, checked
        self.first_ids: list[str] = []

    def check(self, rows: list[Row]) -> None:
        if self.vocabulary is None:
            return
        for row in rows:
            self.checked += any((row.prompt, row.negative_prompt, row.prompt2, row.source_prompt))
            texts = (row.prompt, row.negative_prompt, row.prompt2, row.source_prompt)
            unknown = {w for text in texts for w in _WORD.findall(text.lower())}
            unknown -= self.vocabulary
            if unknown:
                self.rows += 1
                if len(self.first_ids) < 5:
                    self.first_ids.append(row.id)
                for word in unknown:
                    self.words[word] = self.words.get(word, 0) + 1

    def to_dict(self) -> dict:
        return {"rows": self.rows, "checked": self.checked, "words": self.words, "first_ids": self.first_ids}

    def add(self, found: dict) -> None:
        """Count in what another UnknownWords found (a shard's, read in a task)."""
        self.rows += found["rows"]
        self.checked += found.get("checked", 0)
        for word, n in found["words"].items():
            self.words[word] = self.words.get(word, 0) + n
        self.first_ids.extend(found["first_ids"][: max(0, 5 - len(self.first_ids))])

    def message(self, model: str) -> str:
        """The warning, or "" when every word is known (or the model reads any text)."""
        if not self.rows:
            return ""
        common = sorted(self.words.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{word!r} ({n})" for word, n in common[:12]) + (" ..." if len(common) > 12 else "")
        trap = ""
        if 2 * self.rows >= self.checked:  # mostly other words: this is not the model the user meant
            trap = (
                f"Model {model!r} is the embedded 64 px shapes model, which draws only coloured circles, squares "
                "and triangles; to run Kandinsky 2.2, give --model kandinsky-community (or a local or s3:// copy "
                "of its three folders). "
            )
        return trap + (
            f"{self.rows} rows use words model {model!r} does not know, and it draws them as if those words "
            f"were not there: {shown} (first rows: {', '.join(self.first_ids)}). Its words: "
            f"{', '.join(sorted(self.vocabulary))}"
        )


def error_record(record: dict, stage: str, code: str, message: str) -> dict:
    """The errors/*.parquet row for a manifest record (its id may itself be the problem)."""
    return {
        "id": record.get("id"),
        "task": record.get("task") or "generate",
        "stage": stage,
        "code": code,
        "message": message,
        "row": record[ROW],
        "input_hash": input_hash(record),
    }
