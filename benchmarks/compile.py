"""--compile against eager, in one process: the model stage's time per image per task, the warm-up, and how far
compiled images are from eager ones, at the model's own settings.

    python benchmarks/compile.py                          # the embedded model, 16 per call, 3 timed calls a task
    python benchmarks/compile.py --mode max-autotune --calls 5
    python benchmarks/compile.py --model tiny --calls 1 --steps 2  # smoke

Two ``UnclipPredictor``s, as the job's model actors hold them: one eager, one with ``compile=MODE``. Each
gets one warm-up call per task (the compiled one compiles there: its warm-up, as a job's summary reports
it), then they take turns on the same calls, so that drift in the machine's speed hits both alike. Rows:
generate, variation and inpaint over the shapes world, ``--batch-size`` images per call. Prints one JSON
line per task and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package

TASKS = ("generate", "variation", "inpaint")


def task_rows(task: str, n: int, first: int, size: int, defaults: dict) -> list[dict]:
    """n rows of one task as the model stage receives them (sources decoded), seeds from ``first``."""
    from unclip_batch.manifest import Row
    from unclip_batch.predict import model_input
    from unclip_lab import world

    rng = np.random.default_rng(first)
    out = []
    for i in range(first, first + n):
        scene = world.random_scene(rng)
        prompt = world.describe({"colour": scene.colour, "shape": scene.shape, "background": scene.background})
        sources = {}
        if task != "generate":
            sources["pixels"] = np.asarray(world.render(scene), np.uint8)[:size, :size].tobytes()
        if task == "inpaint":
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 2] = 1
            sources["repaint"] = mask.tobytes()
        row = Row(
            row=i,
            id=f"{task}-{i}",
            task=task,
            prompt="" if task == "variation" else prompt,
            negative_prompt="",
            image="" if task == "generate" else "x.png",
            mask="m.png" if task == "inpaint" else "",
            num_images=1,
            seed=i,
            width=size,
            height=size,
            best_of=1,
            **defaults,
        )
        out.append(model_input(row, **sources))
    return out


def timed(predictor, rows: list[dict]) -> tuple[float, dict[str, dict]]:
    from unclip_batch.batches import rows_of, to_batch

    started = time.perf_counter()
    out = rows_of(predictor(to_batch(rows)))
    return time.perf_counter() - started, {r["id"]: r for r in out}


def differences(a: dict, b: dict) -> dict:
    """How compiled images differ from eager ones: share of values that differ, largest and mean gap."""
    pixels = [(np.frombuffer(a[k]["pixels"], np.uint8), np.frombuffer(b[k]["pixels"], np.uint8)) for k in a]
    gaps = np.concatenate([np.abs(x.astype(int) - y) for x, y in pixels])
    return {
        "values_differ": round(float((gaps > 0).mean()), 5),
        "max": int(gaps.max()),
        "mean": round(float(gaps.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--mode", default="default", help="torch.compile mode (the job's --compile MODE)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per task and side")
    parser.add_argument("--steps", type=int, help="decoder steps (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from unclip_batch.models import ModelSpec
    from unclip_batch.predict import UnclipPredictor
    from unclip_batch.sampling import NAMES

    torch.set_num_threads(args.threads)
    info = ModelSpec.parse(args.model).describe()
    defaults = {k: v for k, v in info.defaults.items() if k in NAMES and k not in ("width", "height", "best_of")}
    if args.steps:
        defaults["num_inference_steps"] = args.steps
    common = dict(model=args.model, tasks=TASKS, batch_size=args.batch_size, device="cpu", threads=args.threads)
    sides = {"eager": UnclipPredictor(**common), "compiled": UnclipPredictor(**common, compile=args.mode)}
    n = args.batch_size
    summary = {"model": args.model, "mode": args.mode, "batch_size": n, "torch": torch.__version__, **defaults}
    per_task = {}
    for task in TASKS:
        warm = task_rows(task, n, 0, info.default_size, defaults)
        warm_s = {side: timed(p, warm)[0] for side, p in sides.items()}
        seconds = {side: [] for side in sides}
        gaps = []
        for call in range(args.calls):
            rows = task_rows(task, n, (call + 1) * n, info.default_size, defaults)
            made = {}
            for side in sorted(sides, reverse=call % 2 == 1):  # each side first in every other call
                took, made[side] = timed(sides[side], rows)
                seconds[side].append(took)
            gaps.append(differences(made["compiled"], made["eager"]))
        ms = {side: round(statistics.median(s) / n * 1000, 1) for side, s in seconds.items()}
        per_task[task] = {
            "ms_per_image": ms,
            "speedup": round(ms["eager"] / ms["compiled"], 2),
            "warm_up_s": {side: round(s, 1) for side, s in warm_s.items()},
            "differences": {
                "values_differ": max(g["values_differ"] for g in gaps),
                "max": max(g["max"] for g in gaps),
                "mean": max(g["mean"] for g in gaps),
            },
        }
        print(json.dumps({"task": task, **per_task[task]}), flush=True)
    print(json.dumps({**summary, "tasks": per_task}), flush=True)


if __name__ == "__main__":
    main()
