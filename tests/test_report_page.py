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
