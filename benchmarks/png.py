"""PNG encoding: CPU and bytes per image at Pillow's default (zlib 6), zlib 1, and zlib 1 with the
run-length strategy (OpenCV's default; what the job writes), median of 5 rounds, in this process.

    python benchmarks/png.py out/images/*/*.png photo.jpg   # pictures to encode, plus the null model's noise

Pictures of 64 px are timed as they are; larger ones at 512 x 512.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
import zlib

import numpy as np
from PIL import Image

SETTINGS = {"zlib 6 (Pillow)": (6, -1), "zlib 1": (1, -1), "zlib 1 + RLE (job)": (1, zlib.Z_RLE)}


def encode(pixels: np.ndarray, level: int, strategy: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level, compress_type=strategy)
    return buffer.getvalue()


def main() -> None:
    small, large = [], []
    for path in sys.argv[1:]:
        image = Image.open(path).convert("RGB")
        (small if image.size == (64, 64) else large).append(
            np.asarray(image if image.size == (64, 64) else image.resize((512, 512)))
        )
    sets = {"noise 64 px (null model)": [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)]}
    if small:
        sets[f"{len(small)} pictures of 64 px"] = small
    if large:
        sets[f"{len(large)} pictures at 512 px"] = large
    for name, images in sets.items():
        rounds = max(1, 300 // len(images)) if images[0].shape[0] == 64 else 6
        for setting, (level, strategy) in SETTINGS.items():
            times, size = [], 0
            for _ in range(5):
                start = time.perf_counter()
                size = sum(len(encode(a, level, strategy)) for _ in range(rounds) for a in images) / (
                    rounds * len(images)
                )
                times.append((time.perf_counter() - start) / (rounds * len(images)))
            print(
                json.dumps(
                    {
                        "pictures": name,
                        "setting": setting,
                        "ms": round(1000 * statistics.median(times), 3),
                        "bytes": round(size),
                    }
                )
            )


if __name__ == "__main__":
    main()
