"""Pipeline ceiling: rows/s the pipeline sustains when the model costs nothing (``--model null``),
reading the manifest from and writing images + metadata to a real S3 server (SeaweedFS on loopback).
Reports images/s with Ray's start counted and without it (a cluster has Ray running already).

    python benchmarks/ceiling.py --rows 10000            # S3
    python benchmarks/ceiling.py --rows 10000 --local    # local disk, for comparison

Prompts are PartiPrompts (../shared/data/PartiPrompts.tsv), cycled to the row count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
PARTI = REPO.parent / "shared" / "data" / "PartiPrompts.tsv"
sys.path.insert(0, str(REPO / "tests"))  # the SeaweedFS helper the tests use


def prompts() -> list[str]:
    if PARTI.exists():
        lines = PARTI.read_text(encoding="utf-8").splitlines()[1:]
        return [line.split("\t")[0] for line in lines if line.strip()]
    return [f"a shape number {i}" for i in range(1000)]  # without shared/: still runs


def manifest(rows: int) -> bytes:
    texts = prompts()
    table = pa.table({"id": [f"p{i:07d}" for i in range(rows)], "prompt": [texts[i % len(texts)] for i in range(rows)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local", action="store_true", help="local disk instead of S3")
    parser.add_argument("--format", default="files", choices=["files", "webdataset", "parquet"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ray.data import DataContext

    from unclip_batch.config import JobConfig
    from unclip_batch.job import run_job
    from unclip_batch.pipeline import start_ray

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        data = manifest(args.rows)
        if args.local:
            Path(tmp, "m.parquet").write_bytes(data)
            source, output, options, server = f"{tmp}/m.parquet", f"{tmp}/out", {}, None
        else:
            from seaweedfs import SeaweedFS

            server = SeaweedFS(Path(tmp) / "weed").start()
            fs = server.filesystem()
            fs.mkdir("bench")
            fs.pipe("bench/m.parquet", data)
            source, output, options = "s3://bench/m.parquet", "s3://bench/out", server.storage_options
        try:
            start = time.perf_counter()
            start_ray()  # as the job would; timed apart: a cluster (--address) has it started already
            ray_s = time.perf_counter() - start
            summary = run_job(
                JobConfig(
                    manifests=(source,),
                    output=output,
                    model="null",
                    batch_size=args.batch_size,
                    storage_options=options,
                    format=args.format,
                )
            )
            wall = time.perf_counter() - start
        finally:
            if server:
                server.stop()
    result = {
        "rows": args.rows,
        "storage": "local" if args.local else "s3 (SeaweedFS)",
        "format": args.format,
        "wall_s": round(wall, 1),
        "ray_start_s": round(ray_s, 1),
        "images": summary["images"],
        "images_per_s": round(summary["images"] / wall, 1),
        "images_per_s_ray_started": round(summary["images"] / (wall - ray_s), 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
