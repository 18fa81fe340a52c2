"""Curation at scale: an output of N null-model images with embeddings of Kandinsky 2.2's size (1,280 floats),
curated by ``unclip-batch curate`` in a process of its own with a Ray of its own.

The output is written in the job's layout (``_job.json``, ``_SUCCESS``, ``metadata/<shard>.parquet`` of
1,000 images each): random unit embeddings, 1% of the images planted as exact duplicates of another (same
sha256 and embedding) and 1% as near-duplicates (the embedding of another plus noise at cosine ~0.98).
Reported: the curate's wall time, the driver's peak RSS (polled every 0.2 s), the largest peak RSS of any
stage's worker (``worker_peak_mb`` in curation/_SUCCESS: each task's ru_maxrss), and the counts, which must
find every planted duplicate.

    .venv/bin/python benchmarks/curate_scale.py --images 100000 --images 1000000 --folder /tmp/curate-scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from unclip_batch.plan import job_record

DIMS = 1280
PER_SHARD = 1000
PLANTED = 0.01  # of the images, each: exact duplicates, near-duplicates


def write_output(folder: Path, images: int, seed: int = 0) -> dict:
    """A finished job's output of ``images`` images; the planted duplicates' counts."""
    rng = np.random.default_rng(seed)
    (folder / "metadata").mkdir(parents=True)
    record = job_record("null", {}, 8, embeddings=True)
    (folder / "_job.json").write_text(json.dumps(record))
    exact = near = 0
    for shard, start in enumerate(range(0, images, PER_SHARD)):
        n = min(PER_SHARD, images - start)
        vectors = rng.standard_normal((n, DIMS), dtype=np.float32)
        sha = [f"{start + i:064x}" for i in range(n)]
        kind = rng.random(n)
        for i in range(1, n):
            if kind[i] < PLANTED:  # the same image as an earlier one of its shard
                vectors[i], sha[i] = vectors[i - 1], sha[i - 1]
                exact += 1
            elif kind[i] < 2 * PLANTED:  # nearly: cosine ~0.9988
                noise = rng.standard_normal(DIMS, dtype=np.float32)
                vectors[i] = vectors[i - 1] / np.linalg.norm(vectors[i - 1]) + 0.05 * noise / np.linalg.norm(noise)
                near += 1
        ids = [f"r{start + i}" for i in range(n)]
        table = pa.table(
            {
                "id": ids,
                "k": pa.array(np.zeros(n, np.int32)),
                "image_key": [f"images/{i}/0.png" for i in ids],
                "sha256": sha,
                "clip_score": pa.array(rng.uniform(0.1, 0.4, n)),
                "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / "metadata" / f"{shard:05d}.parquet")
    (folder / "_SUCCESS").write_text(json.dumps({"status": "complete", "images": images, "images_total": images}))
    return {"exact": exact, "near": near}


def curate(folder: Path) -> dict:
    command = [str(Path(sys.executable).parent / "unclip-batch"), "curate", str(folder)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    out = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"curate failed ({process.returncode}):\n{out[-3000:]}")
    summary = json.loads((folder / "curation" / "_SUCCESS").read_text())
    return {"wall_s": round(wall, 1), "driver_peak_mb": round(peak / 2**20), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, action="append", required=True)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/curate-scale"))
    args = parser.parse_args()
    for images in args.images:
        folder = args.folder / str(images)
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        planted = write_output(folder, images)
        print(f"{images:,} images written in {time.perf_counter() - start:.0f} s; planted {planted}", flush=True)
        result = curate(folder)
        s = result["summary"]
        print(
            f"{images:,} images: curated in {result['wall_s']} s; driver peak {result['driver_peak_mb']} MB; "
            f"largest worker peak {s['worker_peak_mb']:.0f} MB; {s['clusters']}; {s['by_reason']}",
            flush=True,
        )
        found = s["by_reason"]
        assert found["exact_duplicate"] == planted["exact"], (found, planted)
        shutil.rmtree(folder)
    print(f"CPUs: {os.cpu_count()}")


if __name__ == "__main__":
    main()
