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
    if training.get("note"):
        lines += ["", training["note"]]
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
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _parameter_counts(folder: Path) -> dict:
    from safetensors import safe_open

    counts = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            counts[str(path.parent.relative_to(folder))] = sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return counts
