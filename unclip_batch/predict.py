"""Predict stage: one actor holds CLIP + prior + decoder(s) and turns rows into images.

Rows arrive mixed; they are grouped by everything a model call must share (task, size, steps,
guidance), and each group is cut into calls of exactly ``batch_size`` images (a power of two),
padding the last one. Every image gets its own seeded noise, and kernels pick
their algorithm by tensor shape, so with a fixed call shape a row's images are the same bytes whatever
they were batched with: on a resume, after a retry, alone or in a crowd. The call size is a power of
two because at some other sizes an image's position in the call changes its bytes (vector kernels work
on rows in blocks): benchmarks/README.md, "Why the code is as it is".
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from unclip_batch.batches import image_of, mark_error, mask_of, rows_of, to_batch
from unclip_batch.models import ModelSpec
from unclip_batch.sampling import Sampling, call_key

if TYPE_CHECKING:
    from unclip_batch.storage import Stores

logger = logging.getLogger(__name__)

# Rows carry clip_score as a float between stages, NaN for none: a column of one type in every block
# (None-only blocks would become Arrow's null type). The metadata stores it as null.
NO_SCORE = float("nan")


class UnclipPredictor:
    """Callable class for ``map_batches``: loads the model once in ``__init__``."""

    def __init__(
        self,
        *,
        model: str,
        tasks: tuple[str, ...],
        batch_size: int,
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "default",
        compile: str = "off",
        threads: int | None = None,
        stores: Stores | None = None,
        embeddings: bool = False,
    ):
        # The family imports its own libraries (the null model: none).
        self.model = ModelSpec.parse(model).load(
            tasks=tasks,
            device=device,
            dtype=dtype,
            scheduler=scheduler,
            compile=compile,
            stores=stores,
        )
        if batch_size & (batch_size - 1):
            raise ValueError(f"batch_size must be a power of two, not {batch_size}")
        self.batch_size = batch_size
        self.embeddings = embeddings  # hand each image's CLIP image embedding on (float32 bytes)
        self.threads, self._threaded = threads, set()
        # A compiled model builds its kernels in the first call of each call shape: that call's time is this
        # actor's warm-up for the shape, handed on with the group's first row (the summary's warm_up).
        self.compiled, self._warmed = compile != "off", set()

    def _use_threads(self):
        # OpenMP's thread count belongs to each thread. oneDNN's convolutions start OpenMP directly, so in
        # a thread torch has not set up they get OMP_NUM_THREADS, which Ray sets to an actor's whole CPUs
        # (1 here); and Ray Data calls the actor from a thread pool, not the thread that built it. Set the
        # count in the calling thread (without it the UNet ran on one core: benchmarks/README.md).
        torch = sys.modules.get("torch")  # not imported: the model computes without it
        if torch and self.threads and threading.get_ident() not in self._threaded:
            torch.set_num_threads(self.threads)
            self._threaded.add(threading.get_ident())

    def __call__(self, batch: dict) -> dict:
        self._use_threads()
        rows = rows_of(batch)
        out = []
        groups = defaultdict(list)
        for row in rows:
            if row["code"]:
                out.append(_without_inputs(row))  # failed upstream: pass the error through
            else:
                groups[call_key(row)].append(row)
        for group in groups.values():
            out.extend(self._run_group(group))
        return to_batch(out)

    def _run_group(self, rows: list[dict]) -> list[dict]:
        # Every candidate c of every image k (best_of per image; one with best_of 1).
        images = [(row, k, c) for row in rows for k in range(int(row["num_images"])) for c in candidates_of(row)]
        results, failed = {}, {}
        key, warm_up_s = call_key(rows[0]), 0.0
        for start in range(0, len(images), self.batch_size):
            call = images[start : start + self.batch_size]
            try:
                made, seconds = self._timed_call(call)
                results.update(made)
                if self.compiled and key not in self._warmed:
                    self._warmed.add(key)
                    warm_up_s = seconds
            except Exception as exc:  # one bad row must not fail its batch: retry each row alone
                logger.warning("model call of %d images failed (%s); retrying row by row", len(call), exc)
                self._free_memory()
                for row_id in dict.fromkeys(row["id"] for row, _, _ in call):
                    try:
                        results.update(self._timed_call([image for image in call if image[0]["id"] == row_id])[0])
                    except Exception as row_exc:
                        failed[row_id] = f"{type(row_exc).__name__}: {row_exc}"
                        self._free_memory()
        out = []
        for row in rows:
            if row["id"] in failed:
                failed_row = _without_inputs(row)
                mark_error(failed_row, "predict", "model_error", failed[row["id"]])
                out.append(failed_row)
                continue
            for k in range(int(row["num_images"])):
                candidate = best_candidate([results[(row["id"], k, c)][2] for c in candidates_of(row)])
                pixels, model_s, score, embedding = results[(row["id"], k, candidate)]
                image_row = _without_inputs(row)
                image_row.update(
                    k=k,
                    seed=seed_of(row, k, candidate),
                    candidate=candidate,
                    pixels=pixels,
                    model_s=model_s * int(row["best_of"]),  # the model's time for this image, candidates and all
                    clip_score=score,
                    embedding=embedding,
                )
                out.append(image_row)
        out[0]["warm_up_s"] = warm_up_s
        return out

    def _timed_call(self, call: list[tuple[dict, int, int]]) -> tuple[dict, float]:
        """Run one call of (row, k, candidate) images: {(row id, k, candidate): (pixels, seconds, CLIP score,
        embedding)}, and the call's seconds."""
        start = time.perf_counter()
        padded = call + [call[-1]] * (self.batch_size - len(call))  # fixed shape: see the module docstring
        pixels = self._call(padded)[: len(call)]
        # An interpolation's frames lie between two ends: no one prompt to score them against.
        prompts = ["" if row["task"] == "interpolate" else row["prompt"] for row, _, _ in call]
        scores, embeds = self.model.clip(pixels, prompts)
        seconds = time.perf_counter() - start
        per_image = seconds / len(call)
        kept = self.embeddings and embeds is not None
        made = {
            (row["id"], k, c): (
                pixels[i].tobytes(),
                per_image,
                NO_SCORE if scores[i] is None else scores[i],
                embeds[i].astype(np.float32).tobytes() if kept else b"",
            )
            for i, (row, k, c) in enumerate(call)
        }
        return made, seconds

    def _call(self, call: list[tuple[dict, int, int]]) -> np.ndarray:
        first = call[0][0]
        sampling = Sampling.of(first)
        seeds = [seed_of(row, k, c) for row, k, c in call]
        prompts = [row["prompt"] for row, _, _ in call]
        negatives = [row["negative_prompt"] for row, _, _ in call]
        task = first["task"]
        if task == "generate":
            return self.model.generate(prompts, negatives, seeds, sampling)
        if task == "interpolate":
            ends = [image_of(row) if row["image"] else None for row, _, _ in call]
            ends2 = [image_of(row, "pixels2") if row["image2"] else None for row, _, _ in call]
            weights = [frame_weight(k, int(row["num_images"])) for row, k, _ in call]
            prompts2 = [row["prompt2"] for row, _, _ in call]
            return self.model.interpolate(ends, ends2, prompts, prompts2, weights, seeds, sampling)
        sources = [image_of(row) for row, _, _ in call]
        if task == "variation":
            return self.model.variation(sources, prompts, seeds, sampling)
        if task == "text_diff":
            source_prompts = [row["source_prompt"] for row, _, _ in call]
            strengths = [float(row["strength"]) for row, _, _ in call]
            return self.model.text_diff(sources, source_prompts, prompts, strengths, seeds, sampling)
        masks = [mask_of(row) for row, _, _ in call]
        return self.model.inpaint(sources, masks, prompts, negatives, seeds, sampling)

    def _free_memory(self):
        torch = sys.modules.get("torch")
        if torch and torch.cuda.is_available():
            torch.cuda.empty_cache()


def model_input(row, **sources) -> dict:
    """A validated manifest Row as this stage receives it: its fields, no error yet, and the decoded sources
    the stage before adds (``pixels``, ``repaint``, ``pixels2``: empty unless given). For tools that call
    the predictor directly (evaluation, benchmarks)."""
    import dataclasses

    empty = dict(code="", message="", stage="", pixels=b"", repaint=b"", pixels2=b"", load_s=0.0)
    return {**dataclasses.asdict(row), **empty, **sources}


def seed_of(row: dict, k: int, candidate: int) -> int:
    """The seed of a row's image k, candidate ``candidate``: seed + k with best_of 1, as always; with
    best_of N, image k's candidates take the N seeds from seed + k * N. An interpolation's frames all
    take the row's seed: one noise, so that only the embedding changes from frame to frame."""
    if row["task"] == "interpolate":
        return int(row["seed"])
    return int(row["seed"]) + k * int(row["best_of"]) + candidate


def frame_weight(k: int, frames: int) -> float:
    """Frame k of an interpolation: the weight of its second end, evenly spaced from 0 to 1."""
    return k / (frames - 1) if frames > 1 else 0.0


def candidates_of(row: dict) -> range:
    return range(int(row["best_of"]))


def best_candidate(scores: list[float]) -> int:
    """The candidate with the highest CLIP score, the first on a tie; the first when none has a score (a
    model without CLIP). Scores are computed image by image, so the choice never depends on the batch."""
    scored = [(-s, c) for c, s in enumerate(scores) if not np.isnan(s)]
    return min(scored)[1] if scored else 0


def _without_inputs(row: dict) -> dict:
    """The row without its source pixels (not needed downstream), with the image columns every
    output row carries."""
    out = {k: v for k, v in row.items() if k not in ("pixels", "repaint", "pixels2")}
    out.update(k=-1, candidate=0, pixels=b"", model_s=0.0, clip_score=NO_SCORE, embedding=b"", warm_up_s=0.0)
    return out
