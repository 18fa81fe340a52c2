"""A model that costs nothing, for benchmarks only: what the pipeline around the model can sustain.

Generate returns a fixed noise image (noise, so PNG encoding costs what it costs on real images);
variation, inpaint and text_diff return their source, interpolate its first image (or the noise).
``--model null``.
"""

from __future__ import annotations

import numpy as np

from unclip_batch import sampling
from unclip_batch.models import ModelInfo
from unclip_batch.sampling import Sampling

FAMILY = "null"


def describe(location: str) -> ModelInfo:
    return ModelInfo(
        family=FAMILY,
        location=location,
        default_size=64,
        size_multiple=8,
        max_size=1024,
        defaults=dict(sampling.DEFAULTS),
    )


class NullModel:
    def __init__(self):
        self._noise: dict[tuple[int, int], np.ndarray] = {}

    def generate(self, prompts, negative_prompts, seeds, s: Sampling) -> np.ndarray:
        key = (s.height, s.width)
        if key not in self._noise:
            self._noise[key] = np.random.default_rng(0).integers(0, 256, (*key, 3), dtype=np.uint8)
        return np.broadcast_to(self._noise[key], (len(seeds), *key, 3))

    def clip(self, images, prompts) -> tuple[list[float | None], None]:
        return [None] * len(images), None  # no CLIP: no score, no embedding

    def variation(self, images, prompts, seeds, s: Sampling) -> np.ndarray:
        return np.stack(images)

    def inpaint(self, images, masks, prompts, negative_prompts, seeds, s: Sampling) -> np.ndarray:
        return np.stack(images)

    def interpolate(self, images, images2, prompts, prompts2, weights, seeds, s: Sampling) -> np.ndarray:
        noise = self.generate(prompts, prompts, seeds, s)
        return np.stack([image if image is not None else noise[i] for i, image in enumerate(images)])

    def text_diff(self, images, source_prompts, prompts, strengths, seeds, s: Sampling) -> np.ndarray:
        return np.stack(images)


def load(
    location: str, *, tasks: frozenset[str], device: str, dtype: str, scheduler: str = "default", compile: str = "off"
) -> NullModel:
    return NullModel()  # no networks: nothing to compile
