"""unclip-batch curate on S3 (SeaweedFS) through a real Ray, over real jobs' outputs (the tiny model): the
exports read back by webdataset, datasets and pyarrow; an output without embeddings curated from its images;
a driver killed mid-curate, then resumed to the bytes of an uninterrupted curate."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, job, kill_processes
from PIL import Image

from unclip_batch.curation import CurateConfig, curate
from unclip_batch.job import run_job
from unclip_batch.storage import Location

pytestmark = pytest.mark.slow

# Three prompts, two images each, and two rows that repeat rows under other ids (same prompt and seed: the
# same images, exact duplicates). Rows of three per shard: two shards.
ROWS = [{"id": f"p{i}", "prompt": p, "num_images": 2, "seed": 10 + i} for i, p in enumerate(["red", "blue", "green"])]
ROWS += [{"id": "p0-again", "prompt": "red", "num_images": 2, "seed": 10}]
ROWS += [{"id": "p2-again", "prompt": "green", "num_images": 2, "seed": 12}]
IMAGES = 10


@pytest.fixture(scope="module")
def outputs(ray_local, s3):
    """The same manifest made twice: with --embeddings as files, and without as WebDataset shards."""
    from test_s3 import put_manifest

    fs = s3.filesystem()
    fs.mkdir("curate")
    put_manifest(fs, "curate/in/m.parquet", ROWS)
    manifest = "s3://curate/in/m.parquet"
    options = s3.storage_options
    run_job(job([manifest], "s3://curate/with", embeddings=True, rows_per_shard=3, storage_options=options))
    run_job(job([manifest], "s3://curate/without", format="webdataset", rows_per_shard=3, storage_options=options))
    return fs


def records(fs, output: str) -> list[dict]:
    fs.invalidate_cache()
    return pq.read_table(f"{output}/curation/records", filesystem=fs).to_pylist()


def by_image(rows: list[dict]) -> dict:
    return {(r["id"], r["k"]): r for r in rows}


def test_curated_and_exported_in_each_format_read_back_by_the_readers_trainers_use(outputs, s3, tmp_path):
    import datasets
    import webdataset as wds

    fs, options = outputs, s3.storage_options
    for format in ("webdataset", "parquet", "files"):
        summary = curate(
            CurateConfig(
                output="s3://curate/with", export=f"s3://curate/kept-{format}", format=format, storage_options=options
            )
        )
    rows = records(fs, "curate/with")
    assert len(rows) == IMAGES and len(by_image(rows)) == IMAGES  # every image exactly once
    reasons = {key: r["reason"] for key, r in by_image(rows).items()}
    # The repeated rows' images are the same bytes: one of each pair is an exact duplicate of the other.
    for a, b in (("p0", "p0-again"), ("p2", "p2-again")):
        for k in (0, 1):
            pair = sorted([reasons[(a, k)], reasons[(b, k)]])
            assert pair[0] == "exact_duplicate" and pair[1] in ("kept", "near_duplicate"), pair
    assert summary["by_reason"]["exact_duplicate"] == 4 and summary["images"] == IMAGES
    kept = {r["image_key"] for r in rows if r["keep"]}
    metadata = pq.read_table("curate/with/metadata", filesystem=fs).to_pylist()
    sha = {(m["id"], m["k"]): m["sha256"] for m in metadata if m["image_key"] in kept}

    # webdataset, as open_clip reads training shards
    fs.get("curate/kept-webdataset/shards/", str(tmp_path / "wds"), recursive=True)
    urls = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "json", "npy"))
    assert {(s[1]["id"], s[1]["k"]) for s in samples} == set(sha) and len(samples) == len(sha)
    assert all(s[2].shape == (len(metadata[0]["embedding"]),) for s in samples)
    # parquet, as Hugging Face datasets reads it
    fs.get("curate/kept-parquet/data/", str(tmp_path / "hf"), recursive=True)
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "*.parquet"), split="train")
    assert sorted((r["id"], r["k"]) for r in dataset) == sorted(sha)
    assert all(isinstance(r["image"], Image.Image) for r in dataset)
    # files, by pyarrow and each image's checksum
    exported = pq.read_table("curate/kept-files/metadata", filesystem=fs).to_pylist()
    assert sorted((m["id"], m["k"]) for m in exported) == sorted(sha)
    for m in exported:
        assert hashlib.sha256(fs.cat(f"curate/kept-files/{m['image_key']}")).hexdigest() == sha[(m["id"], m["k"])]


def test_an_output_without_embeddings_is_curated_from_its_images_by_its_model(outputs, s3):
    fs = outputs
    summary = curate(CurateConfig(output="s3://curate/without", storage_options=s3.storage_options))
    assert summary["settings"]["embeddings_from"] == "curation"
    fs.invalidate_cache()
    computed = pq.read_table("curate/without/curation/embeddings", filesystem=fs)
    metadata = pq.read_table("curate/without/metadata", filesystem=fs, columns=["id", "k", "image_key", "embedding"])
    assert computed["image_key"].to_pylist() == metadata["image_key"].to_pylist()
    assert metadata["embedding"].null_count == IMAGES  # the job stored none
    # The job with --embeddings made the same images: its stored embeddings are what curate computed.
    stored = pq.read_table("curate/with/metadata", filesystem=fs, columns=["id", "k", "embedding"]).to_pylist()
    stored = {(r["id"], r["k"]): r["embedding"] for r in stored}
    keys = list(zip(metadata["id"].to_pylist(), metadata["k"].to_pylist()))
    for key, vector in zip(keys, computed["embedding"].to_pylist()):
        np.testing.assert_allclose(vector, stored[key], atol=1e-5)
    reference = curate(CurateConfig(output="s3://curate/with", storage_options=s3.storage_options))  # done, or here
    assert summary["by_reason"] == reference["by_reason"]
    # The same pairs of exact duplicates (which of a pair is kept differs: ties go by key, and keys differ by format).
    assert exact_pairs(records(fs, "curate/without")) == exact_pairs(records(fs, "curate/with"))


def exact_pairs(rows: list[dict]) -> set:
    image = {r["image_key"]: (r["id"], r["k"]) for r in rows}
    return {frozenset([(r["id"], r["k"]), image[r["duplicate_of"]]]) for r in rows if r["reason"] == "exact_duplicate"}


def test_driver_killed_mid_curate_resumes_to_the_bytes_of_an_uninterrupted_one(outputs, s3, tmp_path):
    fs = outputs
    for name in fs.find("curate/with"):  # a copy of the output, without any curation
        if "/curation/" not in name:
            fs.copy(name, name.replace("curate/with/", "curate/killed/", 1))
    reference = curate(CurateConfig(output="s3://curate/with", storage_options=s3.storage_options))
    options = tmp_path / "storage.json"
    options.write_text(json.dumps(s3.storage_options))
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # the killed driver's own Ray, found again to clean up
    driver = subprocess.Popen(
        [sys.executable, "-m", "unclip_batch.cli", "curate", "s3://curate/killed", "--storage-options", f"@{options}"],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:  # killed once the first stage has written its file: fit, exact, assign, dedup and finalize remain
        deadline = time.monotonic() + 240
        while not fs.exists("curate/killed/curation/_work/scan/00000.parquet"):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
            fs.invalidate_cache()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        kill_processes((ray_tmp,))
    fs.invalidate_cache()
    assert not fs.exists("curate/killed/curation/_SUCCESS"), "the curate finished before it could be killed"
    resumed = curate(CurateConfig(output="s3://curate/killed", storage_options=s3.storage_options))
    assert resumed["by_reason"] == reference["by_reason"]
    for name in fs.ls("curate/with/curation/records"):
        assert fs.cat(name) == fs.cat(name.replace("curate/with/", "curate/killed/", 1)), name
    assert Location("s3://curate/killed", s3.storage_options).files("curation", "_work") == []
