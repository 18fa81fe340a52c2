"""Draw the demo's source images and masks from the shapes world (run once; the PNGs are committed).

python manifests/make_images.py
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package
from unclip_lab import world  # noqa: E402

HERE = Path(__file__).parent / "images"


def main() -> None:
    HERE.mkdir(exist_ok=True)
    circle = world.render(world.Scene("red", "circle", "large", "center", "blue"))
    Image.fromarray(circle).save(HERE / "red_circle_on_blue.png")
    square = world.Scene("green", "square", "small", "top left", "yellow")
    Image.fromarray(world.render(square)).save(HERE / "green_square_on_yellow.png")

    # Repaint the circle and a margin around it: white = repaint. (World pictures hold one shape each,
    # and the model repaints best where that shape was.)
    circle_scene = world.Scene("red", "circle", "large", "center", "blue")
    Image.fromarray(world.region_mask(circle_scene, grow=4)).save(HERE / "circle_mask.png")

    # OpenAI-style edit: an RGBA image whose transparent pixels mark the area to repaint.
    triangle = world.Scene("yellow", "triangle", "small", "top left", "purple")
    hole = np.dstack([world.render(triangle), np.full((world.SIZE, world.SIZE), 255, np.uint8)])
    hole[world.region_mask(triangle, grow=6) > 0, 3] = 0
    Image.fromarray(hole, "RGBA").save(HERE / "triangle_transparent.png")


if __name__ == "__main__":
    main()
