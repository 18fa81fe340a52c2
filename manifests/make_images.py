"""Draw the demo's source images and masks (run once; the PNGs are committed).

    python manifests/make_images.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "images"
SIZE = 64


def main() -> None:
    HERE.mkdir(exist_ok=True)
    scene = Image.new("RGB", (SIZE, SIZE), (40, 70, 200))
    ImageDraw.Draw(scene).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    scene.save(HERE / "red_circle_on_blue.png")

    square = Image.new("RGB", (SIZE, SIZE), (240, 220, 40))
    ImageDraw.Draw(square).rectangle((8, 8, 30, 30), fill=(30, 160, 60))
    square.save(HERE / "green_square_on_yellow.png")

    mask = Image.new("L", (SIZE, SIZE), 0)  # white = repaint
    ImageDraw.Draw(mask).rectangle((32, 32, 60, 60), fill=255)
    mask.save(HERE / "bottom_right_mask.png")

    # OpenAI-style edit: an RGBA image whose transparent pixels mark the area to repaint.
    hole = scene.convert("RGBA")
    ImageDraw.Draw(hole).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 0))
    hole.save(HERE / "left_half_transparent.png")


if __name__ == "__main__":
    main()
