"""The processor against the job: the same rows, model and Ray, side by side in one process.

    python benchmarks/processor.py                  # 64 generate rows on the embedded model, 2 pairs of runs
    python benchmarks/processor.py --model tiny --rows 8 --runs 1 --steps 2   # a smoke run

Both sides share one local Ray (started first, not timed) and one model actor each: ``unclip_batch.run`` on
the rows as a Parquet manifest (a fresh output each run: manifest planning, the checks, the pipeline,
commits and ``_SUCCESS``), and ``build_processor(...)(ray.data.from_items(rows))`` consumed to the end
(``materialize``). The sides alternate, so a slow minute of the machine falls on both. Prints a JSON line per
run and a final JSON summary with the medians and the processor's images/s over the job's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle on a white background"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="pairs of runs (job, then processor)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="decoder steps (default: the model's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    import unclip_batch as ub

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    rows = [{"id": f"r{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(args.rows)]
    settings = {"num_inference_steps": args.steps} if args.steps else {}
    work = Path(tempfile.mkdtemp(prefix="processor-bench-"))
    manifest = work / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    options = {"model": args.model, "batch_size": args.batch_size, "device": "cpu"}
    results: dict[str, list[float]] = {"job": [], "processor": []}
    for run in range(args.runs):
        start = time.perf_counter()
        summary = ub.run(str(manifest), output=str(work / f"job{run}"), **options, **settings)
        results["job"].append(summary.images / (time.perf_counter() - start))
        print(json.dumps({"run": run, "side": "job", "images": summary.images, "images_per_s": results["job"][-1]}))
        config = ub.ProcessorConfig(**options, defaults=settings)
        start = time.perf_counter()
        made = ub.build_processor(config)(ray.data.from_items(rows)).materialize()
        images = made.filter(lambda r: r["png"] is not None).count()
        results["processor"].append(images / (time.perf_counter() - start))
        print(json.dumps({"run": run, "side": "processor", "images": images, "images_per_s": results["processor"][-1]}))
    job, processor = (statistics.median(results[side]) for side in ("job", "processor"))
    print(
        json.dumps(
            {
                "rows": args.rows,
                "model": args.model,
                "runs": args.runs,
                "job_images_per_s": round(job, 3),
                "processor_images_per_s": round(processor, 3),
                "processor_over_job": round(processor / job, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
