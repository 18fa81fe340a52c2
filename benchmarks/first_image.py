"""First image: seconds from typing the command to the first image stored, cold Ray start included.

    python benchmarks/first_image.py                 # 10 generate rows, the default model, 3 runs
    python benchmarks/first_image.py --model tiny --runs 1

Each run is a fresh ``unclip-batch run`` process on a fresh output folder (local disk), so it pays
for starting Ray, validating the manifest, starting the model actor and loading the model. Prints one
JSON line per run and a summary with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package


def run_once(manifest: Path, output: Path, model: str, options: list[str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unclip_batch.cli",
            "run",
            str(manifest),
            "--output",
            str(output),
            "--model",
            model,
            "--quiet",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    first = None
    while process.poll() is None:
        if first is None and next((output / "images").glob("*/*.png"), None) is not None:
            first = time.perf_counter() - started
        time.sleep(0.02)
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"unclip-batch run failed:\n{err[-3000:]}")
    wall = time.perf_counter() - started
    summary = json.loads((output / "_SUCCESS").read_text())
    return {
        "first_image_s": round(first if first is not None else wall, 2),
        "wall_s": round(wall, 2),
        "images": summary["images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, help="decoder steps (default: the model's)")
    parser.add_argument("--prior-steps", type=int, help="prior steps (default: the model's)")
    args = parser.parse_args()
    options = [
        *(["--num-inference-steps", str(args.steps)] if args.steps else []),
        *(["--prior-num-inference-steps", str(args.prior_steps)] if args.prior_steps else []),
    ]
    from unclip_lab import world

    rng = np.random.default_rng(0)
    captions = [world.caption(world.random_scene(rng), rng)[0] for _ in range(args.rows)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.parquet"
        pq.write_table(pa.table({"id": [f"r{i:03d}" for i in range(args.rows)], "prompt": captions}), manifest)
        for n in range(args.runs):
            runs.append(run_once(manifest, Path(tmp) / f"out{n}", args.model, options))
            print(json.dumps({"run": n, **runs[-1]}), flush=True)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "model": args.model,
                "first_image_s": statistics.median(r["first_image_s"] for r in runs),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
            }
        )
    )


if __name__ == "__main__":
    main()
