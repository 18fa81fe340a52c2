"""What CLIP costs per image: the job's predictor with its CLIP pass (clip_score, and --embeddings) on and off.

    python benchmarks/clip_cost.py                    # the embedded model, 64 generate rows, 3 rounds
    python benchmarks/clip_cost.py --model tiny --rows 8 --rounds 1

One process, one loaded predictor (``UnclipPredictor``, as the model actor runs it), the same rows each
time; the rounds alternate between the settings, so a slower minute of the machine hits all of them:

- ``off``: the model's CLIP pass replaced by a model without CLIP (no score, no embedding);
- ``score``: as every job runs (each image's CLIP image embedding and its prompt's text embedding);
- ``embeddings``: the same with ``--embeddings`` (the embedding handed on with the image).

Prints one JSON line per round and a summary: the median seconds per image of each, and the CLIP pass's
share of the model's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package


def rows(n: int, steps: int | None, prior_steps: int | None = None) -> list[dict]:
    """Generate rows over the shapes world, as the read stage hands them to the model."""
    import numpy as np

    from unclip_batch import sampling
    from unclip_batch.manifest import Row
    from unclip_batch.predict import model_input
    from unclip_lab import world

    rng = np.random.default_rng(0)
    settings = {**sampling.DEFAULTS, "width": world.SIZE, "height": world.SIZE}
    if steps:
        settings["num_inference_steps"] = steps
    if prior_steps:
        settings["prior_num_inference_steps"] = prior_steps
    out = []
    for i in range(n):
        scene = world.random_scene(rng)
        prompt = world.describe({"colour": scene.colour, "shape": scene.shape, "background": scene.background})
        row = Row(
            **settings,
            row=i,
            id=f"r{i}",
            task="generate",
            prompt=prompt,
            negative_prompt="",
            image="",
            mask="",
            num_images=1,
            seed=i,
        )
        out.append(model_input(row))
    return out


def no_clip(images, prompts):
    return [None] * len(images), None  # what a model without CLIP answers (the null model's clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="decoder steps (default: diffusers' 50)")
    parser.add_argument("--prior-steps", type=int, help="prior steps (default: diffusers' 25)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from unclip_batch.batches import rows_of, to_batch
    from unclip_batch.predict import UnclipPredictor

    predictor = UnclipPredictor(model=args.model, tasks=("generate",), batch_size=args.batch_size, device="cpu")
    clip = predictor.model.clip
    batch = rows(args.rows, args.steps, args.prior_steps)
    settings = {"off": (no_clip, False), "score": (clip, False), "embeddings": (clip, True)}
    predictor(to_batch(batch[: args.batch_size]))  # warm-up: first-call allocations, not CLIP's cost
    per_image = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, (function, embeddings) in settings.items():
            predictor.model.clip, predictor.embeddings = function, embeddings
            start = time.perf_counter()
            out = rows_of(predictor(to_batch([dict(r) for r in batch])))
            seconds = (time.perf_counter() - start) / len(out)
            per_image[name].append(seconds)
            print(json.dumps({"round": round_, "setting": name, "s_per_image": round(seconds, 5)}), flush=True)
    median = {name: statistics.median(values) for name, values in per_image.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "rows": args.rows,
                "batch_size": args.batch_size,
                "median_s_per_image": {k: round(v, 5) for k, v in median.items()},
                "clip_share_of_model_time": round((median["score"] - median["off"]) / median["score"], 4),
                "embeddings_extra_s_per_image": round(median["embeddings"] - median["score"], 5),
            }
        )
    )


if __name__ == "__main__":
    main()
