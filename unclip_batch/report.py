"""``unclip-batch report OUTPUT``: one HTML page that shows what a job made and what failed.

Written to ``OUTPUT/report/index.html`` (local or object storage): the summary, a contact sheet per
task (each image with its prompt, seed and, for variations and inpaints, thumbnails of the source and
mask), and the error records by code with their messages. Images are linked relatively
(``../images/<id>/<k>.png``) and source thumbnails are copied into ``report/sources/``, so the page
works opened from disk or served as the folder is, wherever the sources were.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip_batch import storage
from unclip_batch.manifest import ID_PATTERN, TASKS
from unclip_batch.sources import SourcePolicy, check_source, open_image
from unclip_batch.storage import Location, Stores
from unclip_batch.writer import IMAGE_KEY as _IMAGE_KEY

logger = logging.getLogger(__name__)

FOLDER = "report"
PER_TASK = 120  # images shown per task: a contact sheet, not a gallery of millions
ERRORS_SHOWN = 200
SORTED_UP_TO = 1_000_000  # rows; more are shown in shard order
METADATA_COLUMNS = ["id", "k", "task", "image_key", "prompt", "image", "mask", "seed", "clip_score"]
ERROR_COLUMNS = ["id", "stage", "code", "message"]
THUMBNAIL = 96  # px, the longer side of a source or mask thumbnail
# The page loads its own files and nothing else, and runs no script: it shows prompts and messages that came
# from manifests.
CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_SHARD_FILE = re.compile(r"(shards/[0-9]+\.tar|data/[0-9]+\.parquet)")
_SAMPLE = re.compile(r"images/[0-9]+_[0-9]+_[0-9]+\.png")
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
.sheet { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 200px; } figure img.out { width: 200px; height: auto; image-rendering: pixelated; }
figcaption { font-size: 12px; word-wrap: break-word; }
.group { display: flex; gap: 8px; align-items: flex-start; margin-bottom: 12px; }
.group figure { width: 120px; } .group figure img.out { width: 120px; } .group .kept { outline: 3px solid #2a2; }
.inputs img { width: 48px; margin-right: 4px; }
.code { font-family: monospace; }
"""


def write_report(output: Location, stores: Stores | None = None) -> str:
    """Write the report page (and source thumbnails) under ``output``; return the page's URL. The output's
    records are read as data: the sources they name are read under the jobs' source policy (``stores``:
    which stores get the options), and only shard files of the output's own are opened."""
    policy = SourcePolicy(stores or Stores(None), retry_for_s=5.0)
    summary = _summary(output)
    metadata = _read(output, "metadata", METADATA_COLUMNS)
    errors = _read(output, "errors", ERROR_COLUMNS)
    objects: dict[str, bytes] = {}
    shown = storage.redact(output.url)
    body = [f"<h1>unclip-batch report: {html.escape(shown)}</h1>", _summary_html(summary, metadata, errors)]
    for task in TASKS:
        if metadata is not None:
            of_task = metadata.filter(pc.equal(metadata["task"], task))
            if of_task.num_rows:
                rows = of_task.slice(0, PER_TASK).to_pylist()  # only what the page shows becomes Python
                _copy_from_shards(output, rows, objects)
                body.append(_sheet(task, rows, of_task.num_rows, objects, policy, output))
    body.append(_errors_html(errors))
    body.append(_curation_html(output, objects))
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>unclip-batch report</title>"
        "<link rel='icon' href='data:,'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    objects["index.html"] = page.encode()  # report-relative names, as the page links them
    output.write_many({f"{FOLDER}/{name}": data for name, data in objects.items()})
    if summary is not None:  # the job is over: nothing else writes under the output now
        storage.clear_partial(output)
    url = storage.redact(output.url_of(FOLDER, "index.html"))  # printed and logged: no user:password@
    images = metadata.num_rows if metadata is not None else 0
    logger.info("report: %s (%d images, %d error records)", url, images, errors.num_rows if errors else 0)
    return url


def _copy_from_shards(output: Location, shown: list[dict], objects: dict) -> None:
    """Images inside shards (``shards/00000.tar#<key>.png``, ``data/00000.parquet#...``), which a browser
    cannot open there: copied beside the page, and the rows point at the copies."""
    from unclip_batch.writer import shard_pngs

    inside = [row for row in shown if "#" in row["image_key"]]
    for row in shown:  # a key no job writes (the records are an output's earlier contents): no picture
        if "#" in row["image_key"] and not _SHARD_FILE.fullmatch(row["image_key"].split("#")[0]):
            inside.remove(row)
            row["image_key"] = ""
    for file in sorted({row["image_key"].split("#")[0] for row in inside}):
        pngs = shard_pngs(output, file)
        for row in inside:
            if row["image_key"].startswith(file + "#"):
                copy = f"images/{row['image_key'].split('#')[1]}"
                if row["image_key"] not in pngs or not _SAMPLE.fullmatch(copy):
                    row["image_key"] = ""
                    continue
                objects[copy] = pngs[row["image_key"]]
                row["image_key"] = f"{FOLDER}/{copy}"  # the page links ../<image_key>


def _summary(output: Location) -> dict | None:
    try:
        return json.loads(output.read("_SUCCESS"))
    except FileNotFoundError:
        return None


def _read(output: Location, folder: str, columns: list[str]) -> pa.Table | None:
    """The shards' columns the page uses (not the carried ones), in id order where that is cheap."""
    files = [output.path(f) for f in output.files(folder) if f.endswith(".parquet")]
    fs = output.fs
    # Shards written before a column existed (clip_score) lack it: read what each has.
    tables = [
        pq.read_table(f, filesystem=fs, columns=[c for c in columns if c in pq.read_schema(f, filesystem=fs).names])
        for f in files
    ]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows > SORTED_UP_TO:  # a page for millions of rows shows shard order, not a sort of them all
        return table
    return table.sort_by([(key, "ascending") for key in ("id", "k") if key in columns])


def _summary_html(summary: dict | None, metadata: pa.Table | None, errors: pa.Table | None) -> str:
    rows = metadata.num_rows if metadata is not None else 0
    ids = pc.count_distinct(metadata["id"]).as_py() if metadata is not None else 0
    failed = errors.num_rows if errors is not None else 0
    facts = [("rows with images", ids), ("images", rows), ("rows failed", failed)]
    if summary is None:
        facts.insert(0, ("status", "incomplete: no _SUCCESS yet (the job is running, or stopped; rerun it to resume)"))
    else:
        facts = [("status", summary["status"]), ("model", summary["model"])] + facts
        facts += [
            (
                "last run",
                f"{summary['started']} to {summary['finished']}, {summary['wall_s']:.1f} s, "
                f"{summary['images_per_s'] or 0:.2f} images/s",
            ),
            ("manifests", ", ".join(storage.redact(m) for m in summary["manifests"])),
        ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return f"<h2>Summary</h2><table id='summary'>{cells}</table>"


def _sheet(task: str, shown: list[dict], total: int, objects: dict, policy: SourcePolicy, output: Location) -> str:
    more = f" (the first {len(shown)} of {total})" if total > len(shown) else ""
    figures = []
    for row in shown:
        inputs = ""
        if task != "generate" and row["k"] == 0:
            inputs = (
                "<div class='inputs'>"
                + "".join(_thumbnail(row, what, objects, policy, output) for what in ("image", "mask") if row.get(what))
                + "</div>"
            )
        caption = f"<b>{html.escape(str(row['id']))}</b> #{row['k']} seed {row['seed']}"
        if row.get("clip_score") is not None:
            caption += f", CLIP {row['clip_score']:.2f}"
        if row.get("prompt"):
            caption += f"<br>{html.escape(row['prompt'])}"
        key = row["image_key"]
        picture = (
            f"<a href='../{html.escape(key)}'><img class='out' src='../{html.escape(key)}' "
            f"alt='{html.escape(str(row['id']))}'></a>"
            if _IMAGE_KEY.fullmatch(key) or key.startswith(f"{FOLDER}/images/")
            else "<p>(no picture: its key is not one a job writes)</p>"
        )
        figures.append(f"<figure>{picture}<figcaption>{caption}{inputs}</figcaption></figure>")
    return f"<h2 id='{task}'>{task}: {total} images{more}</h2><div class='sheet'>{''.join(figures)}</div>"


def _thumbnail(row: dict, what: str, objects: dict, policy: SourcePolicy, output: Location) -> str:
    """A small copy of a row's source image or mask beside the page (the original may be anywhere)."""
    name = f"sources/{row['id']}-{what}.png"
    if not ID_PATTERN.fullmatch(str(row["id"])):
        return f"<span>({what} not shown)</span>"
    try:
        check_source(row[what], output.url)  # as the job checked it against the manifest's folder
        image = open_image(row[what], what, policy)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    except Exception as exc:  # the row's source moved since the job ran: say so, keep the page
        return f"<span title='{html.escape(str(exc))}'>({what} unreadable)</span>"
    objects[name] = buffer.getvalue()
    return f"<img src='{html.escape(name)}' alt='{what}' title='{what}: {html.escape(storage.redact(row[what]))}'>"


def _errors_html(errors: pa.Table | None) -> str:
    if errors is None or errors.num_rows == 0:
        return "<h2 id='errors'>Errors</h2><p>No error records.</p>"
    counts = pc.value_counts(errors["code"]).to_pylist()
    by_code = "".join(
        f"<tr><td class='code'>{html.escape(c['values'])}</td><td>{c['counts']}</td></tr>"
        for c in sorted(counts, key=lambda c: (-c["counts"], c["values"]))
    )
    lines = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(r['stage'])}</td>"
        f"<td class='code'>{html.escape(r['code'])}</td><td>{html.escape(r['message'])}</td></tr>"
        for r in errors.slice(0, ERRORS_SHOWN).to_pylist()
    )
    more = (
        f"<p>The first {ERRORS_SHOWN} of {errors.num_rows}; all are in errors/*.parquet.</p>"
        if errors.num_rows > ERRORS_SHOWN
        else ""
    )
    return (
        f"<h2 id='errors'>Errors: {errors.num_rows} rows</h2><table id='codes'><tr><th>code</th><th>rows</th></tr>"
        f"{by_code}</table><h3>Records</h3><table id='records'><tr><th>id</th><th>stage</th><th>code</th>"
        f"<th>message</th></tr>{lines}</table>{more}"
    )


GROUPS_SHOWN = 12  # duplicate groups on the page
PER_GROUP = 6  # duplicates shown beside each kept image


def _curation_html(output: Location, objects: dict) -> str:
    """The curation's counts by reason, its clip_score histogram with the threshold, the largest duplicate
    groups (the kept image first, each duplicate's similarity under it) and the diversity figures; nothing
    where the output was not curated."""
    from unclip_batch import curation

    try:
        summary = json.loads(output.read(curation.FOLDER, "_SUCCESS"))
    except FileNotFoundError:
        return ""
    counts = "".join(
        f"<tr><td class='code'>{html.escape(r)}</td><td>{n}</td></tr>" for r, n in summary["by_reason"].items()
    )
    diversity = summary["diversity"]
    facts = [
        ("rows with several images", diversity["prompts_with_several_images"]),
        ("mean cosine similarity of a row's images", _figure(diversity["mean_similarity_within_prompt"])),
        ("rows whose images are all near-duplicates", _figure(diversity["share_all_near_duplicates"], percent=True)),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    settings = summary["settings"]
    return (
        f"<h2 id='curation'>Curation: {summary['kept']} of {summary['images']} images kept</h2>"
        f"<p>near-duplicate at cosine similarity {settings['near_duplicate']}, min clip_score "
        f"{settings['min_clip_score']}, {settings['clusters']} clusters, seed {settings['seed']}</p>"
        f"<table id='reasons'><tr><th>reason</th><th>images</th></tr>{counts}</table>"
        f"<h3>clip_score</h3>{_histogram(summary['clip_score_histogram']['counts'], settings['min_clip_score'])}"
        f"<h3>Diversity</h3><table id='diversity'>{cells}</table>"
        f"<h3>Duplicate groups</h3>{_groups(output, objects)}"
    )


def _figure(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _histogram(counts: list[int], threshold: float | None, width: int = 600, height: int = 120) -> str:
    """An inline SVG of the bins holding scores (and the threshold's), the threshold a red line."""
    bins = len(counts)
    used = [i for i, n in enumerate(counts) if n]
    if not used:
        return "<p>No image has a clip_score.</p>"
    edge = (lambda x: int((x + 1) / 2 * bins)) if threshold is not None else None
    lo, hi = min(used), max(used) + 1
    if edge is not None:
        lo, hi = min(lo, edge(threshold)), max(hi, edge(threshold) + 1)
    step, top = width / (hi - lo), max(counts)
    bars = "".join(
        f"<rect x='{(i - lo) * step:.1f}' y='{height - counts[i] / top * height:.1f}' width='{max(step - 1, 1):.1f}' "
        f"height='{counts[i] / top * height:.1f}' fill='#57a'>"
        f"<title>{-1 + 2 * i / bins:.2f}: {counts[i]}</title></rect>"
        for i in range(lo, hi)
        if counts[i]
    )
    if threshold is not None:
        x = ((threshold + 1) / 2 * bins - lo) * step
        bars += f"<line id='threshold' x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{height}' stroke='#d22' stroke-width='2'/>"
    label = f"{-1 + 2 * lo / bins:.2f} to {-1 + 2 * hi / bins:.2f}"
    return (
        f"<svg id='clip-histogram' width='{width}' height='{height}' role='img' aria-label='clip_score {label}'>"
        f"{bars}</svg><p>clip_score from {label}"
        + (f"; the red line: {threshold}" if threshold is not None else "")
        + "</p>"
    )


def _groups(output: Location, objects: dict) -> str:
    from unclip_batch import curation

    duplicates = curation.records(output, ["image_key", "reason", "duplicate_of", "similarity"])
    if duplicates is not None:
        duplicates = duplicates.filter(pc.is_in(duplicates["reason"], pa.array(["exact_duplicate", "near_duplicate"])))
    if duplicates is None or duplicates.num_rows == 0:
        return "<p>No duplicates.</p>"
    sizes = pc.value_counts(duplicates["duplicate_of"]).to_pylist()
    largest = sorted(sizes, key=lambda s: (-s["counts"], s["values"]))[:GROUPS_SHOWN]
    html_groups = []
    for group in largest:
        kept = group["values"]
        members = duplicates.filter(pc.equal(duplicates["duplicate_of"], kept)).sort_by("image_key")
        rows = [{"image_key": kept, "caption": "kept", "class": "kept"}]
        rows += [
            {"image_key": r["image_key"], "caption": f"{r['reason'].split('_')[0]} {r['similarity']:.3f}", "class": ""}
            for r in members.slice(0, PER_GROUP).to_pylist()
        ]
        _copy_from_shards(output, rows, objects)
        figures = "".join(
            f"<figure class='{row['class']}'>{_picture(row['image_key'])}<figcaption>{html.escape(row['caption'])}"
            "</figcaption></figure>"
            for row in rows
        )
        more = f"<p>and {group['counts'] - PER_GROUP} more</p>" if group["counts"] > PER_GROUP else ""
        html_groups.append(f"<div class='group'>{figures}{more}</div>")
    return "".join(html_groups)


def _picture(key: str) -> str:
    if _IMAGE_KEY.fullmatch(key) or key.startswith(f"{FOLDER}/images/"):
        return f"<img class='out' src='../{html.escape(key)}' alt='{html.escape(key)}'>"
    return "<p>(no picture)</p>"
