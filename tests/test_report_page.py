"""The report page's content without a browser or a job: what it shows of large outputs."""

import pyarrow as pa
import pyarrow.parquet as pq

from unclip_batch import report
from unclip_batch.storage import Location


def test_a_large_output_shows_a_sheet_and_says_how_many_there_are(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PER_TASK", 2)
    monkeypatch.setattr(report, "ERRORS_SHOWN", 1)
    (tmp_path / "metadata").mkdir()
    (tmp_path / "errors").mkdir()
    ids = [f"r{i}" for i in range(5)]
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "k": [0] * 5,
                "task": ["generate"] * 5,
                "image_key": [f"images/{i}/0.png" for i in ids],
                "prompt": ["a <b>bold</b> prompt"] * 5,
                "image": [""] * 5,
                "mask": [""] * 5,
                "seed": list(range(5)),
                "carried": [1.5] * 5,
            }
        ),
        tmp_path / "metadata" / "part-1.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["x", "y", "z"],
                "stage": ["load"] * 3,
                "code": ["image_unreadable", "image_invalid", "image_unreadable"],
                "message": ["m"] * 3,
            }
        ),
        tmp_path / "errors" / "part-1.parquet",
    )
    # A later run's shard has clip_score, the first one (from before the column existed) not: both read.
    pq.write_table(
        pa.table(
            {
                "id": ["a0"],
                "k": [0],
                "task": ["generate"],
                "image_key": ["images/a0/0.png"],
                "prompt": ["p"],
                "image": [""],
                "mask": [""],
                "seed": [1],
                "clip_score": [0.8406],
            }
        ),
        tmp_path / "metadata" / "part-0.parquet",
    )
    report.write_report(Location(str(tmp_path)))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "generate: 6 images (the first 2 of 6)" in page and page.count("<figure>") == 2
    assert "<b>a0</b> #0 seed 1, CLIP 0.84" in page
    assert "incomplete: no _SUCCESS yet" in page and "rows with images</th><td>6" in page
    assert "a &lt;b&gt;bold&lt;/b&gt; prompt" in page  # manifest text is escaped, never markup
    assert "<td class='code'>image_unreadable</td><td>2</td>" in page and "The first 1 of 3" in page


def test_images_inside_webdataset_shards_are_copied_beside_the_page(tmp_path):
    from unclip_batch.writer import tar_bytes

    (tmp_path / "metadata").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(tar_bytes([("00000_000000_00.png", b"png bytes")]))
    row = {"id": "r0", "k": 0, "task": "generate", "prompt": "p", "image": "", "mask": "", "seed": 1}
    pq.write_table(
        pa.Table.from_pylist([{**row, "image_key": "shards/00000.tar#00000_000000_00.png"}]),
        tmp_path / "metadata" / "00000.parquet",
    )
    report.write_report(Location(str(tmp_path)))
    assert (tmp_path / "report" / "images" / "00000_000000_00.png").read_bytes() == b"png bytes"
    assert "src='../report/images/00000_000000_00.png'" in (tmp_path / "report" / "index.html").read_text()


def test_the_page_of_a_finished_job_shows_its_summary_each_task_its_sources_and_its_errors(tmp_path, monkeypatch):
    """The demo manifest (every task, a missing source) through the job's stages in this process (the null
    model): what the page says, cell by cell. (In a browser, over a job on Ray: tests/test_report.py.)"""
    import re

    from helpers import REPO, inline_pipeline, job, read_output

    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    output = tmp_path / "out"
    summary = run_job(job([str(REPO / "manifests" / "demo.parquet")], output, model="null"))
    url = report.write_report(Location(str(output)))
    assert url == f"{output}/report/index.html"
    page = (output / "report" / "index.html").read_text()
    metadata, errors = read_output(output)
    cells = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", page.split("<h2>Summary</h2>")[1]))
    assert cells["status"] == "complete" and cells["model"] == "null" and cells["images"] == str(metadata.num_rows)
    assert cells["rows with images"] == "9" and cells["rows failed"] == "1"
    assert cells["manifests"] == str(REPO / "manifests" / "demo.parquet")
    assert cells["last run"].startswith(summary["started"]) and "images/s" in cells["last run"]
    tasks = metadata["task"].to_pylist()
    assert re.findall(r"<h2 id='(\w+)'>\w+: (\d+) images</h2>", page) == [
        (task, str(tasks.count(task))) for task in ("generate", "variation", "inpaint")
    ]
    assert page.count("<figure>") == metadata.num_rows == 15
    for key in metadata["image_key"].to_pylist():
        assert f"<img class='out' src='../{key}'" in page
    assert "<b>red-circle</b> #1 seed" in page and "a large blue square on a yellow background" in page
    shown = sorted(p.name for p in (output / "report" / "sources").iterdir())
    assert shown == [
        "inpaint-mask-image.png",
        "inpaint-mask-mask.png",
        "inpaint-transparent-image.png",
        "variation-circle-image.png",
        "variation-square-steered-image.png",
    ]
    assert "<img src='sources/inpaint-mask-mask.png' alt='mask'" in page
    assert "<h2 id='errors'>Errors: 1 rows</h2>" in page
    assert "<tr><td class='code'>image_unreadable</td><td>1</td></tr>" in page
    assert "<td>broken-source</td><td>load</td><td class='code'>image_unreadable</td>" in page
    assert errors.num_rows == 1 and "<h2 id='curation'>" not in page
    assert f'content="{report.CSP}"' in page and not (output / "_partial").exists()


def test_the_curation_section_of_the_page(tmp_path, monkeypatch):
    """Counts by reason, the clip_score histogram with the threshold, diversity and the duplicate groups (the
    kept image first, a duplicate's kind and similarity under it), as curate recorded them."""
    import re

    from test_curate import SHARDS, inline, write_output

    from unclip_batch.curation import CurateConfig, curate

    inline(monkeypatch)
    output = write_output(tmp_path / "out", SHARDS)
    curate(CurateConfig(output=output, min_clip_score=0.1))
    monkeypatch.setattr(report, "PER_GROUP", 1)
    report.write_report(Location(output))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    section = page[page.index("<h2 id='curation'>") :]
    assert section.startswith("<h2 id='curation'>Curation: 4 of 9 images kept</h2>")
    assert "near-duplicate at cosine similarity 0.996, min clip_score 0.1, 1 clusters, seed 0" in section
    reasons = re.findall(r"<tr><td class='code'>(\w+)</td><td>(\d+)</td></tr>", section)
    assert reasons == [("kept", "4"), ("low_clip_score", "1"), ("exact_duplicate", "2"), ("near_duplicate", "2")]
    bars = re.findall(r"<rect x='([\d.]+)' y='([\d.]+)' width='([\d.]+)' height='([\d.]+)'", section)
    titles = re.findall(r"<title>([-\d.]+): (\d+)</title>", section)
    # Scores 0.05 .. 0.35 in bins of 0.02 (bins 52 .. 67), the threshold's (55) among them: 16 bins wide.
    assert titles == [
        ("0.04", "1"),
        ("0.20", "1"),
        ("0.22", "2"),
        ("0.24", "1"),
        ("0.28", "2"),
        ("0.34", "1"),
    ]  # 0.30 rounds under its edge
    assert bars[0] == ("0.0", "60.0", "36.5", "60.0") and bars[2][1:] == ("0.0", "36.5", "120.0")
    assert "<line id='threshold' x1='112.5' x2='112.5'" in section
    assert "clip_score from 0.04 to 0.36; the red line: 0.1" in section
    assert "<tr><th>rows with several images</th><td>1</td></tr>" in section
    assert "<tr><th>mean cosine similarity of a row&#x27;s images</th><td>0.000</td></tr>" in section
    assert "<tr><th>rows whose images are all near-duplicates</th><td>0.0%</td></tr>" in section
    groups = re.findall(r"<div class='group'>(.*?)</div>", section)
    assert len(groups) == 3
    first = re.findall(r"src='\.\./([^']+)'.*?<figcaption>([^<]+)</figcaption>", groups[0])
    assert first == [("images/h/0.png", "kept"), ("images/a/1.png", "near 0.999")]
    assert "<p>and 1 more</p>" in groups[0] and "more" not in groups[1]
    assert re.findall(r"<figcaption>([^<]+)</figcaption>", groups[1]) == ["kept", "exact 1.000"]
    assert "images/f/0.png" in groups[2] and "images/e/0.png" in groups[2]

    def figure(key, caption, kind=""):
        return (
            f"<figure class='{kind}'><img class='out' src='../images/{key}.png' alt='images/{key}.png'>"
            f"<figcaption>{caption}</figcaption></figure>"
        )

    def pair(kept, other, caption):
        return figure(kept, "kept", "kept") + figure(other, caption)

    assert section[section.index("<h3>Duplicate groups</h3>") :].startswith(
        "<h3>Duplicate groups</h3>"
        f"<div class='group'>{pair('h/0', 'a/1', 'near 0.999')}<p>and 1 more</p></div>"
        f"<div class='group'>{pair('b/0', 'a/0', 'exact 1.000')}</div>"
        f"<div class='group'>{pair('f/0', 'e/0', 'exact 1.000')}</div>"
    )


def test_the_histogram_and_figures_at_their_edges():
    assert report._histogram([0] * 100, 0.2) == "<p>No image has a clip_score.</p>"
    counts = [0] * 100
    counts[99] = 3
    drawn = report._histogram(counts, None, width=100, height=10)
    assert "<rect x='0.0' y='0.0' width='99.0' height='10.0'" in drawn and "threshold" not in drawn
    assert "clip_score from 0.98 to 1.00</p>" in drawn
    low = report._histogram(counts, -1.0, width=100, height=10)
    assert "<line id='threshold' x1='0.0'" in low and "clip_score from -1.00 to 1.00; the red line: -1.0" in low
    assert report._figure(None) == "n/a" and report._figure(0.12345) == "0.123"
    assert report._figure(0.5, percent=True) == "50.0%" and report._figure(1 / 3, percent=True) == "33.3%"
    assert report._picture("images/a/0.png").startswith("<img class='out' src='../images/a/0.png'")
    assert report._picture("report/images/00000_000000_00.png").startswith("<img")
    assert report._picture("../../etc/passwd") == "<p>(no picture)</p>"


def test_a_page_over_an_object_store_sorts_by_id_and_k_and_shows_only_the_shards_own_samples(caplog):
    """An output on a store that is not this disk (fsspec's memory store): the records are read through the
    output's own filesystem, shown in id and k order, and a shard image is copied beside the page only
    where its key names one of the output's shard files and a sample name a job writes."""
    import io
    import re
    import uuid

    import fsspec

    from unclip_batch.writer import tar_bytes

    output = Location(f"memory://report-{uuid.uuid4().hex}/out")
    samples = [("00000_000000_00.png", b"r0 #0"), ("00000_000000_01.png", b"r0 #1"), ("evil.png", b"not ours")]
    output.write("shards/00000.tar", tar_bytes(samples))
    row = {"task": "generate", "prompt": "p", "image": "", "mask": "", "seed": 1}
    keys = {
        ("r0", 1): "shards/00000.tar#00000_000000_01.png",
        ("r0", 0): "shards/00000.tar#00000_000000_00.png",
        ("r1", 0): "shards/00000.tar#evil.png",  # in the shard, but no name a job writes
        ("r2", 0): "shards/00000.tar#00000_000002_00.png",  # a name a job writes, not in the shard
        ("r3", 0): "../elsewhere.tar#00000_000003_00.png",  # no shard file of the output
    }
    records = [{**row, "id": i, "k": k, "image_key": key} for (i, k), key in reversed(keys.items())]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    output.write("metadata/00000.parquet", buffer.getvalue())
    try:
        with caplog.at_level("INFO", logger="unclip_batch.report"):
            url = report.write_report(output)
        page = output.read("report", "index.html").decode()
        copied = {
            name: output.read("report", "images", name) for name in ("00000_000000_00.png", "00000_000000_01.png")
        }
        assert output.files("report", "images") == [
            "report/images/00000_000000_00.png",
            "report/images/00000_000000_01.png",
        ]
    finally:
        fsspec.filesystem("memory").rm(output.root.split("/")[0], recursive=True)
    assert copied == {"00000_000000_00.png": b"r0 #0", "00000_000000_01.png": b"r0 #1"}
    assert re.findall(r"<b>(\w+)</b> #(\d)", page) == [
        ("r0", "0"),
        ("r0", "1"),
        ("r1", "0"),
        ("r2", "0"),
        ("r3", "0"),
    ]
    assert page.count("src='../report/images/") == 2 and page.count("(no picture: its key is not one a job") == 3
    assert page.endswith("\n</body></html>\n") and "</h1>\n<h2>Summary</h2>" in page
    assert f"report: {url} (5 images, 0 error records)" in caplog.text


def test_the_summary_and_error_tables_cell_for_cell():
    """The page's tables as HTML, whole: an output with nothing yet, and error records ranked by code."""
    nothing = report._summary_html(None, None, None)
    assert nothing == (
        "<h2>Summary</h2><table id='summary'>"
        "<tr><th>status</th><td>incomplete: no _SUCCESS yet (the job is running, or stopped; rerun it to resume)"
        "</td></tr>"
        "<tr><th>rows with images</th><td>0</td></tr><tr><th>images</th><td>0</td></tr>"
        "<tr><th>rows failed</th><td>0</td></tr></table>"
    )
    assert report._errors_html(None) == report._errors_html(pa.table({"code": pa.array([], pa.string())}))
    assert report._errors_html(None) == "<h2 id='errors'>Errors</h2><p>No error records.</p>"
    errors = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "stage": ["load", "load", "validate", "model"],
            "code": ["image_unreadable", "image_unreadable", "invalid_id", "a_code"],
            "message": ["m1", "m2 <b>", "m3", "m4"],
        }
    )
    shown = report._errors_html(errors)
    assert shown.startswith(
        "<h2 id='errors'>Errors: 4 rows</h2><table id='codes'><tr><th>code</th><th>rows</th></tr>"
        "<tr><td class='code'>image_unreadable</td><td>2</td></tr>"  # most rows first, then by name
        "<tr><td class='code'>a_code</td><td>1</td></tr><tr><td class='code'>invalid_id</td><td>1</td></tr></table>"
        "<h3>Records</h3><table id='records'><tr><th>id</th><th>stage</th><th>code</th><th>message</th></tr>"
        "<tr><td>a</td><td>load</td><td class='code'>image_unreadable</td><td>m1</td></tr>"
        "<tr><td>b</td><td>load</td><td class='code'>image_unreadable</td><td>m2 &lt;b&gt;</td></tr>"
    )
    assert shown.endswith("<tr><td>d</td><td>model</td><td class='code'>a_code</td><td>m4</td></tr></table>")
    assert report.ERRORS_SHOWN == 200


def test_a_sheet_shows_a_rows_sources_once_beside_its_first_image(tmp_path):
    from helpers import make_sources

    from unclip_batch.sources import SourcePolicy
    from unclip_batch.storage import Stores

    folder = make_sources(tmp_path / "in")
    row = {"id": "v1", "prompt": "", "seed": 3, "clip_score": None, "image": str(folder / "img" / "scene.png")}
    rows = [
        {**row, "k": 0, "image_key": "images/v1/0.png"},
        {**row, "k": 1, "image_key": "images/v1/1.png", "mask": ""},
    ]
    objects = {}
    policy = SourcePolicy(Stores(None), retry_for_s=1)
    sheet = report._sheet("variation", rows, 3, objects, policy, Location(str(tmp_path / "out")))
    assert sheet == (
        "<h2 id='variation'>variation: 3 images (the first 2 of 3)</h2><div class='sheet'>"
        "<figure><a href='../images/v1/0.png'><img class='out' src='../images/v1/0.png' alt='v1'></a>"
        "<figcaption><b>v1</b> #0 seed 3<div class='inputs'><img src='sources/v1-image.png' alt='image' "
        "title='image: " + str(folder / "img" / "scene.png") + "'></div></figcaption></figure>"
        "<figure><a href='../images/v1/1.png'><img class='out' src='../images/v1/1.png' alt='v1'></a>"
        "<figcaption><b>v1</b> #1 seed 3</figcaption></figure></div>"
    )
    assert list(objects) == ["sources/v1-image.png"]
    generated = report._sheet("generate", [{**rows[0], "prompt": "a & b"}], 1, {}, policy, Location(str(tmp_path)))
    assert "<b>v1</b> #0 seed 3<br>a &amp; b</figcaption>" in generated and "inputs" not in generated
