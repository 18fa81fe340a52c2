"""Each output format end to end on S3 (SeaweedFS) through a real Ray, read back by the readers trainers
use: webdataset (as open_clip reads it) and ray.data.read_webdataset, Hugging Face datasets and duckdb,
pyarrow. The null model: this is about how images are stored, not how they are made. (That a Parquet
shard written over two runs is the bytes of one: tests/test_writer.py.)"""

import glob
import hashlib
import io
import json

import pyarrow.parquet as pq
import pytest
from helpers import png_bytes, scene
from PIL import Image

from unclip_batch.job import run_job

pytestmark = pytest.mark.slow

ROWS = [{"id": f"g.{i}", "prompt": f"a red circle {i}", "num_images": 1 + i % 2, "tag": i} for i in range(8)]
ROWS += [{"id": "var", "task": "variation", "image": "img/scene.png"}, {"id": "bad id", "prompt": "x"}]
IMAGES = sum(r.get("num_images", 1) for r in ROWS[:-1])


@pytest.fixture(scope="module")
def manifest(s3):
    from test_s3 import put_manifest

    fs = s3.filesystem()
    fs.mkdir("formats")
    fs.pipe("formats/in/img/scene.png", png_bytes(scene()))
    put_manifest(fs, "formats/in/m.parquet", ROWS)
    return "s3://formats/in/m.parquet"


def run(s3, manifest, output, **kwargs):
    from helpers import job

    config = job([manifest], output, model="null", rows_per_shard=4, storage_options=s3.storage_options, **kwargs)
    return run_job(config)


def common_checks(fs, output: str, folder: str) -> list[dict]:
    """What every format has: metadata and errors by pyarrow, a stats file per shard, _SUCCESS last."""
    root = output.removeprefix("s3://")
    fs.invalidate_cache()  # the job's s3fs is this same instance, with its listings cached
    metadata = pq.read_table(f"{root}/metadata", filesystem=fs).to_pylist()
    errors = pq.read_table(f"{root}/errors", filesystem=fs).to_pylist()
    assert sorted({r["id"] for r in metadata}) == sorted(r["id"] for r in ROWS[:-1]) and len(metadata) == IMAGES
    assert [(e["id"], e["code"]) for e in errors] == [("bad id", "invalid_id")]
    assert {r["tag"] for r in metadata} == set(range(8)) | {None}  # carried through
    stats = [json.loads(fs.cat(p)) for p in sorted(fs.glob(f"{root}/{folder}/*_stats.json"))]
    assert [(s["shard"], s["rows"]) for s in stats] == [("00000", 4), ("00001", 4), ("00002", 2)]
    assert sum(s["images"] for s in stats) == IMAGES and stats[2]["failures_by_code"] == {"invalid_id": 1}
    assert not [p for p in fs.find(f"{root}/_parts") if p.endswith(".parquet")]  # no part left behind
    return metadata


def test_each_format_read_back_by_the_readers_trainers_use_and_resumed_to_the_same_bytes(
    ray_local, s3, manifest, tmp_path
):
    import datasets
    import duckdb
    import ray
    import webdataset as wds

    fs = s3.filesystem()
    # files: a PNG per image, its checksum in the metadata
    run(s3, manifest, "s3://formats/files")
    for record in common_checks(fs, "s3://formats/files", "stats"):
        data = fs.cat(f"formats/files/{record['image_key']}")
        assert hashlib.sha256(data).hexdigest() == record["sha256"]

    # webdataset: read as open_clip reads its training shards, and by Ray Data
    summary = run(s3, manifest, "s3://formats/wds", format="webdataset")
    assert summary["images"] == IMAGES
    common_checks(fs, "s3://formats/wds", "shards")
    fs.get("formats/wds/shards/", str(tmp_path / "wds"), recursive=True)
    urls = sorted(glob.glob(str(tmp_path / "wds" / "*.tar")))
    samples = list(
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .rename(image="jpg;png;jpeg;webp", text="txt", record="json")
        .to_tuple("image", "text", "record", "__key__")
    )
    assert len(samples) == IMAGES and len({key for *_, key in samples}) == IMAGES
    by_id = {(record["id"], record["k"]): (image, text) for image, text, record, _ in samples}
    image, text = by_id[("g.3", 1)]
    assert image.size == (64, 64) and text == "a red circle 3"
    assert by_id[("var", 0)][1] == ""  # a variation has no prompt: an empty caption, still a pair
    assert ray.data.read_webdataset(urls).count() == IMAGES
    # The same job over two runs (--limit stops the first inside the second shard): the same tar bytes.
    first = run(s3, manifest, "s3://formats/wds-resumed", format="webdataset", limit=6)
    second = run(s3, manifest, "s3://formats/wds-resumed", format="webdataset")
    assert (first["rows"]["manifest"], second["rows"]["done_before"]) == (6, 6)
    for name in ("00000", "00001", "00002"):
        assert fs.cat(f"formats/wds/shards/{name}.tar") == fs.cat(f"formats/wds-resumed/shards/{name}.tar"), name

    # parquet: Hugging Face datasets gives PIL images; duckdb reads the rest
    run(s3, manifest, "s3://formats/parquet", format="parquet")
    common_checks(fs, "s3://formats/parquet", "stats")
    fs.get("formats/parquet/data/", str(tmp_path / "parquet"), recursive=True)
    files = sorted(glob.glob(str(tmp_path / "parquet" / "*.parquet")))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == IMAGES and isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (64, 64)
    assert ds.features["image"] == datasets.Image()
    count, sources = duckdb.sql(
        f"select count(*), count(nullif(source_image, '')) from read_parquet({files!r})"
    ).fetchall()[0]
    assert (count, sources) == (IMAGES, 1)
    png = pq.read_table(files[0]).to_pylist()[0]["image"]["bytes"]
    assert Image.open(io.BytesIO(png)).format == "PNG"
