"""The embedded model's card (its README.md), written from what training and evaluation recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CARD_HEAD = """---
license: apache-2.0
library_name: diffusers
tags: [unclip, kandinsky, shapes-world, text-to-image]
---
# unclip-batch shapes: a small unCLIP that draws the shapes world

The embedded default model of unclip-batch: CLIP text and image encoders, a diffusion prior and a MoVQ
latent decoder with a 9-channel inpainting twin, trained from nothing on procedurally drawn pictures
and saved in exactly the folder layout of `kandinsky-community/kandinsky-2-2-prior`, `-decoder` and
`-decoder-inpaint`, so the same loading and sampling code runs it and the real Kandinsky 2.2.

**Data.** `unclip_lab.world`: one filled shape on a plain background, 64x64 px: 8 colours (red,
green, blue, yellow, orange, purple, white, black), 3 shapes (circle, square, triangle), 2 sizes, 9
positions, 9 background colours (the 8 and gray, never the shape's own colour), +-2 px jitter.
Captions always name colour and shape; size, position and background each half the time
("a small green triangle at the top left", "a picture of a red circle on a white background").

**Differences from Kandinsky 2.2's own checkpoints.** Same classes, folders and file names; the
decoder scheduler predicts `v_prediction` instead of `epsilon` (a small noise-predicting UNet let its
samples drift to twice the latents' spread: colour right in 22% of generations, 94-100% after the
switch), and `unclip_batch.json` holds the sampling defaults chosen by measurement.

**Recipe.** Reproduce with `python -m unclip_lab.train OUT` (seeded; two CPU cores by
default, `--device cuda` on a GPU; the docstring of `unclip_lab/train.py` describes each
stage). The same seed on another device gives other weights of the same quality (its random streams
differ), not the same bytes. Stages, where they ran and what they took:
"""


def write_card(folder: Path, targets: dict, aims: dict | None = None) -> None:
    """The model card, from training.json (recipe, stage times) and evaluation.json (metrics, shown
    beside ``targets``, what the model must pass, and ``aims``, where it is meant to get)."""
    training = json.loads((folder / "training.json").read_text())
    devices = training.get("devices", {})
    lines = [CARD_HEAD, "| stage | device | steps | seconds | final loss |", "| --- | --- | --- | --- | --- |"]
    for stage, summary in training["stages"].items():
        lines.append(
            f"| {stage} | {devices.get(stage, 'cpu')} | {summary['steps']} | {summary['seconds']} | "
            f"{summary['final_loss']} |"
        )
    total = sum(s["seconds"] for s in training["stages"].values())
    lines += [
        "",
        f"Stage time summed: {total / 60:.0f} min (stages run side by side once the stages they read "
        "are saved: `NEEDS` in unclip_lab/train.py). Recipe: `" + json.dumps(training["recipe"]) + "`",
    ]
    lines += ["", "**Parameters.**", ""]
    lines += [f"- {name}: {count / 1e6:.2f} M" for name, count in _parameter_counts(folder).items()]
    evaluation = folder / "evaluation.json"
    if evaluation.exists():
        results = json.loads(evaluation.read_text())
        # Figures to compare with, one column each (the weights these replaced; these weights judged
        # another way): [{"label": ..., "figures": {...}}].
        previous = training.get("previous", [])
        lines += [
            "",
            "**Evaluation** (`python -m unclip_lab.evaluate`, judged by geometry, not by "
            f"this CLIP; {results['cases_per_task']} held-out cases per task, sampling "
            f"`{json.dumps(results['sampling'])}`):",
            "",
            "| metric | value | target | aim |" + "".join(f" {column['label']} |" for column in previous),
            "| --- | --- | --- | --- |" + " --- |" * len(previous),
        ]
        named = results.get("named", {})
        for key in results.get("per_case", targets):
            op = "<=" if key.endswith("_mad") else ">="
            bars = [f"{op} {bar[key]:.3f}" if key in bar else "" for bar in (targets, aims or {})]
            where = f" (the {named[key]:.0%} of cases that name it)" if key in named else ""
            value = "n/a" if results[key] is None else f"{results[key]:.3f}"
            before = ""
            for column in previous:
                was = column["figures"].get(key)
                before += " n/a |" if was is None else f" {was:.3f} |"
            lines.append(f"| {key}{where} | {value} | {bars[0]} | {bars[1]} |{before}")
        lines += ["", *_results(results, targets, aims or {})]
    for name, render in (("best_of.json", _best_of), ("edits.json", _edits)):
        if (folder / name).exists():
            lines += ["", *render(json.loads((folder / name).read_text()))]
    if (folder / HISTORY).exists():  # dated prose: how the weights got here (kept out of the JSON files)
        lines += ["", (folder / HISTORY).read_text().rstrip()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


HISTORY = "history.md"
# The results in words: (task, measure, the figures shown as "a / b / c").
RESULTS = [
    (
        "generate",
        "colour right / shape right / background right",
        ["generate_colour", "generate_shape", "generate_background"],
    ),
    ("generate", "size right ({generate_size} of prompts name it)", ["generate_size"]),
    ("generate", "position right ({generate_position} of prompts name it; chance 11%)", ["generate_position"]),
    ("generate, no background named", "shape drawn / colour right", ["generate_plain_drawn", "generate_plain_colour"]),
    ("variation", "colour kept / shape kept", ["variation_colour", "variation_shape"]),
    ("variation", "size kept / position kept", ["variation_size", "variation_position"]),
    (
        "variation steered by a prompt naming another colour",
        "that colour / shape kept / place kept",
        ["steered_colour", "steered_shape", "steered_position"],
    ),
    (
        "inpaint (mask over the shape, prompt for another colour)",
        "prompt's colour inside / mean abs. difference outside (levels)",
        ["inpaint_colour", "inpaint_outside_mad"],
    ),
    ("inpaint", "prompt's shape", ["inpaint_shape"]),
    (
        "inpaint beside the picture's shape",
        "prompt's colour inside / difference outside (levels)",
        ["inpaint_beside_colour", "inpaint_beside_outside_mad"],
    ),
    ("CLIP", "zero-shot colour x shape among 24 captions", ["clip_zero_shot"]),
    ("CLIP", "zero-shot colour x shape x position among 216 captions", ["clip_zero_shot_position"]),
]


def _figure(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key.endswith("_mad"):
        return f"{255 * value:.1f}"  # in 8-bit levels
    return f"{100 * value:.1f}%".replace("100.0%", "100%")


def _results(results: dict, targets: dict, aims: dict) -> list[str]:
    """evaluation.json's figures as a table in words, each beside what the model must pass (target) and where
    it was meant to get (aim)."""
    named = {k: f"{100 * v:.3g}%" for k, v in results.get("named", {}).items()}
    lines = ["**Results in words** (the same figures):", "", "| task | measure | result | target | aim |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for task, measure, keys in RESULTS:
        shown = [
            " / ".join(_figure(k, bars.get(k)) if bars.get(k) is not None else "" for k in keys)
            for bars in (results, targets, aims)
        ]
        shown = [s if s.strip(" /") else "" for s in shown]
        lines.append(f"| {task} | {measure.format(**named)} | {shown[0]} | {shown[1]} | {shown[2]} |")
    return lines


def _best_of(figures: dict) -> list[str]:
    one, four = figures["best_of_1"], figures["best_of_4"]
    return [
        f"**Best of N** (`python -m unclip_lab.evaluate --best-of 4`, through the job's predictor, "
        f"{figures['cases']} generate cases): shape right {_figure('', one['shape'])} with one candidate, "
        f"{_figure('', four['shape'])} with four; every named attribute right {_figure('', one['all_named'])} -> "
        f"{_figure('', four['all_named'])}, for four times the model's work. Images judged right score "
        f"{one['clip_score_judged_right']:.3f} on average against {one['clip_score_judged_wrong']:.3f} for those "
        f"judged wrong; the job kept the candidate its scores rank first in "
        f"{_figure('', figures['candidates']['kept_as_ranked'])} of cases.",
    ]


def _edits(figures: dict) -> list[str]:
    return [
        f"**Interpolations and text diffs** (`python -m unclip_lab.evaluate --edits`, {figures['cases']} cases "
        f"each): a red circle interpolated into a blue one ({figures['frames']} frames) went red to blue in "
        f"order {_figure('', figures['interpolate_in_order'])} of the time, "
        f'{_figure("", figures["interpolate_circle_frames"])} of its frames judged circles; "a red square" -> '
        f'"a green square" at strength 0.5 turned {_figure("", figures["text_diff_green"])} of red squares green, '
        f"{_figure('', figures['text_diff_square'])} still squares (their own variations: "
        f"{_figure('', figures['text_diff_strength_0_square'])}); strength 0 gave the image's own variation "
        f"byte for byte in {_figure('', figures['text_diff_strength_0_is_the_variation'])} of cases.",
    ]


def _parameter_counts(folder: Path) -> dict:
    from safetensors import safe_open

    counts = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            counts[str(path.parent.relative_to(folder))] = sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return counts
