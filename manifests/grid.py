"""Draw a picture of a finished job: one line per row, its inputs then its images.

    python manifests/grid.py out/demo manifests/demo_grid.png

Generate rows show the prompt, variation rows the source, inpaint rows the source with the repainted
area shaded; then every image the row produced, read back from the job's own output.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CELL = 128  # px per image: the 64 px outputs, enlarged without smoothing
TEXT = 300  # px for the prompt column
PAD = 6


def main(output: str, target: str) -> None:
    output = Path(output)
    meta = pq.read_table(output / "metadata").to_pylist()
    rows: dict[str, list[dict]] = {}
    for record in sorted(meta, key=lambda r: (r["manifest_row"], r["k"])):
        rows.setdefault(record["id"], []).append(record)
    width = TEXT + CELL * (1 + max(len(images) for images in rows.values())) + PAD * 6
    canvas = Image.new("RGB", (width, (CELL + PAD) * len(rows) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for line, images in enumerate(rows.values()):
        first, y = images[0], PAD + line * (CELL + PAD)
        label = f"{first['task']}: {first['prompt'] or ''}".strip().rstrip(":")
        draw.multiline_text((PAD, y + CELL // 3), _wrap(label, 40), fill="black")
        x = TEXT
        if first["image"]:
            source = _source(Path(first["manifest"]).parent, first)
            canvas.paste(_big(source), (x, y))
            draw.text((x + CELL + 2, y + CELL // 2), "->", fill="black")
        x += CELL + PAD * 4
        for record in images:
            canvas.paste(_big(Image.open(output / record["image_key"]).convert("RGB")), (x, y))
            x += CELL + PAD
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target)
    print(f"{target}: {len(rows)} rows")


def _source(folder: Path, record: dict) -> Image.Image:
    """The source as the model saw it, with the area to repaint shaded."""
    image = Image.open(folder / record["image"])
    if record["mask"]:
        repaint = np.asarray(Image.open(folder / record["mask"]).convert("L")) >= 128
    elif image.mode == "RGBA":
        repaint = np.asarray(image)[..., 3] < 128
    else:
        return image.convert("RGB")
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    pixels[repaint] = pixels[repaint] * 0.35 + 255 * 0.65
    return Image.fromarray(pixels.astype(np.uint8))


def _big(image: Image.Image) -> Image.Image:
    return image.resize((CELL, CELL), Image.NEAREST)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


if __name__ == "__main__":
    main(*sys.argv[1:])
