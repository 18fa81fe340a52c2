"""Job vs naive loop: the same rows, model, steps and machine, side by side in one command.

    python benchmarks/naive_vs_job.py                       # 96 mixed rows, 3 runs each, default model
    python benchmarks/naive_vs_job.py --steps 20 --naive-steps 50    # the model's 20 steps vs the docs' 50
    python benchmarks/naive_vs_job.py --compile default     # and each run the job compiled, beside it eager

The naive loop is what a user writes from diffusers' Kandinsky 2.2 docs: load the prior, decoder and
inpaint pipelines once, then per row call the prior pipeline once (``interpolate`` for a variation) and the
decoder pipeline with ``num_images_per_prompt``, one row per call, default scheduler, PNG to disk.
Ours is ``unclip-batch run`` on the same rows as a Parquet manifest (a fresh output each run, Ray
started by the command, so its wall time counts Ray's start too). Each side is a fresh Python process,
as a user runs either: both walls count interpreter start, imports (torch, diffusers: ~4 s here) and
model loads. Prints one JSON line per run and a final JSON summary with the medians and the ratio of
images/s. With ``--compile``, each run also runs the job with ``--compile MODE``, after the eager one; its
warm-up (the summary's) is reported apart: the first compiled run compiles from nothing, later ones find
inductor's cache on this machine, as later jobs on a cluster node do.
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
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package


def build_rows(n: int, folder: Path) -> list[dict]:
    """A mixed manifest over the shapes world: half generate, a quarter variation, a quarter inpaint;
    every third row asks for 2 images."""
    from unclip_lab import world

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        scene = world.random_scene(rng)
        row = {
            "id": f"r{i:05d}",
            "task": "generate",
            "seed": i,
            "num_images": 2 if i % 3 == 0 else 1,
            "prompt": world.describe({"colour": scene.colour, "shape": scene.shape, "background": scene.background}),
            "image": None,
            "mask": None,
        }
        if i % 4 in (1, 3):
            Image.fromarray(world.render(scene)).save(folder / f"{row['id']}.png")
            row["image"] = f"{row['id']}.png"
            row["task"] = "variation" if i % 4 == 1 else "inpaint"
            row["prompt"] = None if row["task"] == "variation" else "a white square"
        if row["task"] == "inpaint":
            target = world.random_scene(rng, size="small")
            Image.fromarray(world.region_mask(target, grow=6)).save(folder / f"{row['id']}-mask.png")
            row["mask"] = f"{row['id']}-mask.png"
        rows.append(row)
    return rows


def naive(manifest: Path, out: Path, model: str, steps: int, prior_steps: int) -> dict:
    """The naive loop as its own script, timed from outside like the job's command."""
    started = time.perf_counter()
    options = {"manifest": str(manifest), "out": str(out), "model": model, "steps": steps, "prior_steps": prior_steps}
    result = subprocess.run(
        [sys.executable, __file__, "--naive-loop", json.dumps(options)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the naive loop failed:\n{result.stderr[-3000:]}")
    inside = json.loads(result.stdout.splitlines()[-1])
    return {
        "images": inside["images"],
        "wall_s": round(wall, 2),
        "load_s": inside["load_s"],
        "loop_s": inside["loop_s"],
    }


def naive_loop(manifest: str, out: str, model: str, steps: int, prior_steps: int) -> dict:
    """The loop a user would write from the diffusers docs: one row at a time."""
    import torch
    from diffusers import KandinskyV22InpaintPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from unclip_batch.models import ModelSpec
    from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR

    rows, folder, out = pq.read_table(manifest).to_pylist(), Path(manifest).parent, Path(out)
    location = Path(ModelSpec.parse(model).local_location())
    started = time.perf_counter()
    prior = KandinskyV22PriorPipeline.from_pretrained(location / PRIOR)
    decoder = KandinskyV22Pipeline.from_pretrained(location / DECODER)
    inpainter = KandinskyV22InpaintPipeline.from_pretrained(location / INPAINT)
    for pipe in (prior, decoder, inpainter):
        pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    images = 0
    for row in rows:
        n, generator = row["num_images"], torch.Generator().manual_seed(row["seed"])
        call = {
            "height": 64,
            "width": 64,
            "num_inference_steps": steps,
            "generator": generator,
            "num_images_per_prompt": n,
        }
        if row["task"] == "variation":
            embeds = prior.interpolate(
                [Image.open(folder / row["image"])], [1.0], num_inference_steps=prior_steps, generator=generator
            )
        else:
            embeds = prior(row["prompt"], num_inference_steps=prior_steps, generator=generator)
        call.update(image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds)
        if row["task"] == "inpaint":
            out_images = inpainter(
                image=Image.open(folder / row["image"]), mask_image=Image.open(folder / row["mask"]), **call
            ).images
        else:
            out_images = decoder(**call).images
        for k, image in enumerate(out_images):
            image.save(out / f"{row['id']}-{k}.png")
        images += len(out_images)
    done = time.perf_counter()
    return {"images": images, "loop_s": round(done - loaded, 2), "load_s": round(loaded - started, 2)}


def job(
    manifest: Path,
    out: Path,
    model: str,
    steps: int,
    prior_steps: int,
    scheduler: str,
    batch_size: int | None,
    compile: str = "off",
) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_batch.cli",
            "run",
            str(manifest),
            "--output",
            str(out),
            "--model",
            model,
            "--num-inference-steps",
            str(steps),
            "--prior-num-inference-steps",
            str(prior_steps),
            "--quiet",
            "--scheduler",
            scheduler,
            *(["--batch-size", str(batch_size)] if batch_size else []),
            *(["--compile", compile] if compile != "off" else []),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"unclip-batch run failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "_SUCCESS").read_text())
    return {"images": summary["images"], "wall_s": round(wall, 2), "job_s": summary["wall_s"], **_warm_up(summary)}


def _warm_up(summary: dict) -> dict:
    warm_up = summary["warm_up"]
    return {"warm_up_calls": warm_up["calls"], "warm_up_s": warm_up["s"]} if warm_up["compile"] != "off" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        type=int,
        default=96,
        help="manifest rows (every third asks for 2 images); the job's ~15 s start is spread over them",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=50, help="decoder steps (both sides)")
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--naive-steps", type=int, help="decoder steps of the naive loop (default: --steps)")
    parser.add_argument("--scheduler", default="default", help="our job's decoder sampler")
    parser.add_argument("--batch-size", type=int, help="our job's images per model call (default: the job's)")
    parser.add_argument(
        "--compile",
        default="off",
        metavar="MODE",
        help="also run the job with --compile MODE in each run, beside the eager one (default: off)",
    )
    parser.add_argument("--naive-loop", help=argparse.SUPPRESS)  # the naive side's own process: its options
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.naive_loop:
        print(json.dumps(naive_loop(**json.loads(args.naive_loop))))
        return
    naive_runs, job_runs, compiled_runs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        rows = build_rows(args.rows, folder)
        manifest = folder / "manifest.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        settings = (args.model, args.steps, args.prior_steps, args.scheduler, args.batch_size)  # both jobs'
        for run in range(args.runs):  # alternate, so drift in the machine's speed hits both alike
            out = Path(tmp) / f"naive{run}"
            out.mkdir()
            naive_runs.append(naive(manifest, out, args.model, args.naive_steps or args.steps, args.prior_steps))
            print(json.dumps({"run": run, "naive": naive_runs[-1]}), flush=True)
            job_runs.append(job(manifest, Path(tmp) / f"job{run}", *settings))
            print(json.dumps({"run": run, "job": job_runs[-1]}), flush=True)
            if args.compile != "off":
                compiled_runs.append(job(manifest, Path(tmp) / f"compiled{run}", *settings, args.compile))
                print(json.dumps({"run": run, "compiled": compiled_runs[-1]}), flush=True)
    naive_rate = statistics.median(r["images"] / r["wall_s"] for r in naive_runs)
    job_rate = statistics.median(r["images"] / r["wall_s"] for r in job_runs)
    compiled = {}
    if compiled_runs:
        compiled_rate = statistics.median(r["images"] / r["wall_s"] for r in compiled_runs)
        compiled = {
            "compile": args.compile,
            "compiled_images_per_s": round(compiled_rate, 3),
            "compiled_vs_eager": round(compiled_rate / job_rate, 2),
            "warm_up_s": [r["warm_up_s"] for r in compiled_runs],
        }
    print(
        json.dumps(
            {
                "rows": args.rows,
                "images": job_runs[0]["images"],
                "steps": args.steps,
                "naive_steps": args.naive_steps or args.steps,
                "scheduler": args.scheduler,
                "naive_images_per_s": round(naive_rate, 3),
                "job_images_per_s": round(job_rate, 3),
                "ratio": round(job_rate / naive_rate, 2),
                **compiled,
            }
        )
    )


if __name__ == "__main__":
    main()
