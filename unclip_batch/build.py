"""``unclip-batch manifest build``: a Parquet manifest from the text files users already have.

- ``.txt``: a prompt a line (blank lines skipped);
- ``.csv`` (a header line) and ``.jsonl`` / ``.json`` (JSON Lines): columns as they are;
- with ``--template``: the source is a class list (a class a line) and every class x template is a
  row, ``label`` naming the class: synthetic classification data, ``--num-images`` pictures each.

Rows without an id (no id column, or an empty id) get one from their source's name and position
(``prompts-000041``): stable as long as lines are only appended. ``--num-images`` / ``--seed`` fill
the rows that leave those empty.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from unclip_batch import storage
from unclip_batch.errors import ManifestError

logger = logging.getLogger(__name__)

SOURCES = (".txt", ".csv", ".jsonl", ".json")
_NOT_ID = re.compile(r"[^A-Za-z0-9._-]+")


def build(
    sources: list[str],
    target: str,
    *,
    templates: list[str] = (),
    num_images: int | None = None,
    seed: int | None = None,
    stores: storage.Stores | None = None,
) -> pa.Table:
    """Read ``sources``, add ids and defaults, write ``target`` (Parquet, any fsspec URL); return the table."""
    stores = stores or storage.Stores(None)
    tables = [_read(stores.location(url), templates) for url in sources]
    table = pa.concat_tables(tables, promote_options="permissive")
    for name, value in (("num_images", num_images), ("seed", seed)):
        if value is not None:
            table = _fill(table, name, value)
    ids = table["id"].drop_null()
    if len(pc.unique(ids)) < len(ids):
        raise ManifestError(f"the sources give {len(ids) - len(pc.unique(ids))} duplicate ids; ids must be unique")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    location = stores.location(target)
    fs, path = location.fs, location.root
    local = storage.local_path(target)
    if local is not None:  # whole or not at all: a temporary name beside it, renamed into place
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        partial = f"{local}.{uuid.uuid4().hex[:8]}.partial"
        with open(partial, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(partial, local)
    else:
        storage.retrying(lambda: fs.pipe_file(path, buffer.getvalue()), f"writing {target}")
    return table


def _read(location: storage.Location, templates: list[str]) -> pa.Table:
    url = location.url
    if not url.lower().endswith(SOURCES):
        raise ManifestError(f"{url}: not a text manifest; give a .txt (a prompt a line), .csv or .jsonl file")
    fs, path = location.fs, location.root
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(f"{url} does not exist") from None
    stem = _NOT_ID.sub("_", posixpath.basename(path).rsplit(".", 1)[0]).lstrip(".") or "row"
    try:
        if path.lower().endswith(".txt") or templates:
            lines = [line.strip() for line in data.decode("utf-8").splitlines()]
            lines = [line for line in lines if line]
            table = _classes(lines, templates) if templates else pa.table({"prompt": lines})
        elif path.lower().endswith(".csv"):
            table = pyarrow.csv.read_csv(io.BytesIO(data))
        else:
            table = pyarrow.json.read_json(io.BytesIO(data))
    except (UnicodeDecodeError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"{url} could not be read: {exc}") from exc
    if table.num_rows == 0:
        raise ManifestError(f"{url} has no rows")
    width = max(6, len(str(table.num_rows - 1)))
    generated = pa.array([f"{stem}-{i:0{width}d}" for i in range(table.num_rows)], pa.string())
    if "id" not in table.column_names:
        table = table.add_column(0, "id", generated)
    elif table["id"].null_count:  # rows that give none get one; the rest keep theirs
        ids = pc.coalesce(pc.cast(table["id"], pa.string()), generated)
        table = table.set_column(table.schema.get_field_index("id"), "id", ids)
    logger.info("%s: %d rows", url, table.num_rows)
    return table


def _classes(classes: list[str], templates: list[str]) -> pa.Table:
    """Every class x template, each a row: the prompt, the class as ``label``, and an id from both."""
    for template in templates:
        if template.count("{}") != 1:
            raise ManifestError(f"--template {template!r} needs exactly one {{}} where the class goes")
    rows = [(label, j, template.format(label)) for label in classes for j, template in enumerate(templates)]
    return pa.table(
        {
            "id": [f"{_NOT_ID.sub('_', label).lstrip('.') or 'class'}-{j}" for label, j, _ in rows],
            "prompt": [prompt for *_, prompt in rows],
            "label": [label for label, *_ in rows],
        }
    )


def _fill(table: pa.Table, name: str, value: int) -> pa.Table:
    if name not in table.column_names:
        return table.append_column(name, pa.array([value] * table.num_rows, pa.int64()))
    column = pc.fill_null(pc.cast(table[name], pa.int64()), value)
    return table.set_column(table.schema.get_field_index(name), name, column)
