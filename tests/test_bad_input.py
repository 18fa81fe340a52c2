"""The bad-input table: every kind of bad row through the real job. Each becomes an error record with
its code (and the job goes on), or is accepted and normalised where a user would expect that."""

import io

import numpy as np
import pyarrow as pa
import pytest
from helpers import box_mask, job, png_bytes, read_output, scene, write_manifest
from PIL import Image

from unclip_batch.errors import CODES
from unclip_batch.job import run_job

pytestmark = pytest.mark.slow
ACCEPTED = "accepted"


def _files(folder):
    """Source files of every kind, written into the manifest's folder."""
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    cmyk = io.BytesIO()
    scene().convert("CMYK").save(cmyk, format="JPEG")
    files = {
        "ok.png": png_bytes(scene()),
        "empty.png": b"",
        "truncated.png": png_bytes(scene())[:200],
        "text.png": b"this is not an image\n",
        "one_pixel.png": png_bytes(Image.new("RGB", (1, 1))),
        "bomb.png": png_bytes(Image.new("1", (9000, 9000))),
        "grey.png": png_bytes(scene().convert("L")),
        "palette.png": png_bytes(scene().convert("P")),
        "sixteen.png": png_bytes(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))),
        "cmyk.jpg": cmyk.getvalue(),
        "rgba.png": png_bytes(scene().convert("RGBA")),
        "mask.png": png_bytes(box_mask()),
        "mask_small.png": png_bytes(box_mask(size=32)),
        "mask_black.png": png_bytes(Image.new("L", (64, 64), 0)),
        "mask_white.png": png_bytes(Image.new("L", (64, 64), 255)),
    }
    for name, data in files.items():
        (img / name).write_bytes(data)


# (what is wrong, row, expected code or ACCEPTED)
TABLE = [
    ("empty prompt", {"prompt": ""}, "missing_prompt"),
    ("whitespace prompt", {"prompt": "   \t "}, "missing_prompt"),
    ("over-long prompt", {"prompt": "a red circle " * 100}, "prompt_too_long"),
    ("mojibake prompt", {"prompt": "caf\ufffd with a red circle"}, "invalid_prompt"),
    ("control character in prompt", {"prompt": "a red\x00circle"}, "invalid_prompt"),
    ("over-long negative prompt", {"prompt": "p", "negative_prompt": "x" * 1001}, "prompt_too_long"),
    ("unknown task", {"task": "upscale", "prompt": "p"}, "unknown_task"),
    ("null task means generate", {"task": None, "prompt": "a red circle"}, ACCEPTED),
    ("inpaint without prompt", {"task": "inpaint", "image": "img/ok.png", "mask": "img/mask.png"}, "missing_prompt"),
    ("null num_images means 1", {"prompt": "p", "num_images": None}, ACCEPTED),
    ("NaN num_images means 1", {"prompt": "p", "num_images": float("nan")}, ACCEPTED),
    ("num_images 0", {"prompt": "p", "num_images": 0.0}, "invalid_num_images"),
    ("num_images 10000", {"prompt": "p", "num_images": 10_000.0}, "invalid_num_images"),
    ("fractional num_images", {"prompt": "p", "num_images": 1.5}, "invalid_value"),
    ("infinite num_images", {"prompt": "p", "num_images": float("inf")}, "invalid_value"),
    ("negative seed", {"prompt": "p", "seed": -1.0}, "invalid_seed"),
    ("huge seed", {"prompt": "p", "seed": 1e30}, "invalid_seed"),
    ("NaN seed means derived", {"prompt": "p", "seed": float("nan")}, ACCEPTED),
    ("width not a multiple", {"prompt": "p", "width": 30.0}, "unsupported_size"),
    ("height too large", {"prompt": "p", "height": 4096.0}, "unsupported_size"),
    ("zero steps", {"prompt": "p", "num_inference_steps": 0.0}, "invalid_steps"),
    ("negative guidance", {"prompt": "p", "guidance_scale": -2.0}, "invalid_guidance"),
    ("best_of 0", {"prompt": "p", "best_of": 0.0}, "invalid_best_of"),
    ("generate with an image", {"prompt": "p", "image": "img/ok.png"}, "unexpected_image"),
    ("variation without image", {"task": "variation"}, "missing_image"),
    ("empty id", {"id": "", "prompt": "p"}, "invalid_id"),
    ("null id", {"id": None, "prompt": "p"}, "invalid_id"),
    ("duplicated id", {"id": "row-00", "prompt": "p"}, "duplicate_id"),
    ("id too long", {"id": "x" * 129, "prompt": "p"}, "invalid_id"),
    ("id with /", {"id": "a/b", "prompt": "p"}, "invalid_id"),
    ("id ..", {"id": "..", "prompt": "p"}, "invalid_id"),
    ("id with backslash", {"id": "a\\b", "prompt": "p"}, "invalid_id"),
    ("id with space", {"id": "a b", "prompt": "p"}, "invalid_id"),
    ("id with control character", {"id": "a\x07b", "prompt": "p"}, "invalid_id"),
    ("image missing", {"task": "variation", "image": "img/nope.png"}, "image_unreadable"),
    ("image unreachable", {"task": "variation", "image": "http://127.0.0.1:{closed}/x.png"}, "image_unreadable"),
    ("dead web link (404)", {"task": "variation", "image": "http://127.0.0.1:{web}/img/nope.png"}, "image_unreadable"),
    ("web image", {"task": "variation", "image": "http://127.0.0.1:{web}/img/ok.png"}, ACCEPTED),
    ("image zero bytes", {"task": "variation", "image": "img/empty.png"}, "image_invalid"),
    ("truncated PNG", {"task": "variation", "image": "img/truncated.png"}, "image_invalid"),
    ("not an image", {"task": "variation", "image": "img/text.png"}, "image_invalid"),
    ("1x1 image", {"task": "variation", "image": "img/one_pixel.png"}, "image_too_small"),
    ("decompression bomb", {"task": "variation", "image": "img/bomb.png"}, "image_too_large"),
    ("grayscale image", {"task": "variation", "image": "img/grey.png"}, ACCEPTED),
    ("palette image", {"task": "variation", "image": "img/palette.png"}, ACCEPTED),
    ("16-bit image", {"task": "variation", "image": "img/sixteen.png"}, ACCEPTED),
    ("CMYK JPEG", {"task": "variation", "image": "img/cmyk.jpg"}, ACCEPTED),
    ("RGBA image for a variation", {"task": "variation", "image": "img/rgba.png"}, ACCEPTED),
    ("opaque RGBA and no mask", {"task": "inpaint", "image": "img/rgba.png", "prompt": "p"}, "mask_empty"),
    ("RGB inpaint without mask", {"task": "inpaint", "image": "img/ok.png", "prompt": "p"}, "missing_mask"),
    (
        "mask of another size",
        {"task": "inpaint", "image": "img/ok.png", "mask": "img/mask_small.png", "prompt": "p"},
        "mask_size_mismatch",
    ),
    (
        "mask all black",
        {"task": "inpaint", "image": "img/ok.png", "mask": "img/mask_black.png", "prompt": "p"},
        "mask_empty",
    ),
    (
        "mask all white repaints everything",
        {"task": "inpaint", "image": "img/ok.png", "mask": "img/mask_white.png", "prompt": "p"},
        ACCEPTED,
    ),
    (
        "mask not an image",
        {"task": "inpaint", "image": "img/ok.png", "mask": "img/text.png", "prompt": "p"},
        "image_invalid",
    ),
    ("mask for a variation", {"task": "variation", "image": "img/ok.png", "mask": "img/mask.png"}, "unexpected_image"),
]
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("image", pa.string()),
        ("mask", pa.string()),
        # float columns, as pandas writes them when a value is missing: NaN must be handled
        ("num_images", pa.float64()),
        ("seed", pa.float64()),
        ("width", pa.float64()),
        ("height", pa.float64()),
        ("num_inference_steps", pa.float64()),
        ("guidance_scale", pa.float64()),
        ("best_of", pa.float64()),
        ("case", pa.string()),
    ]
)


@pytest.fixture
def ports(tmp_path):
    """A web server of this test's own over the job folder (404 for what is not there), and a port held
    bound without listening, so a connection to it is refused for certain (no other process can take it)."""
    import functools
    import http.server
    import socket
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "job"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    yield {"web": server.server_address[1], "closed": closed.getsockname()[1]}
    server.shutdown()
    closed.close()


def test_every_bad_row_gets_its_code_and_the_job_goes_on(ray_local, tmp_path, ports):
    assert len(TABLE) >= 30
    folder = tmp_path / "job"
    _files(folder)
    rows = [{"id": "row-00", "prompt": "a good row first", "case": "good"}]
    rows += [{"id": f"case-{i:02d}", **row, "case": case} for i, (case, row, _) in enumerate(TABLE)]
    for row in rows:
        if row.get("image"):
            row["image"] = row["image"].format(**ports)
    manifest = write_manifest(folder / "m.parquet", [{k: r.get(k) for k in SCHEMA.names} for r in rows], SCHEMA)
    summary = run_job(job([manifest], tmp_path / "out", model="null"))  # about rows and codes, not pixels
    metadata, errors = read_output(tmp_path / "out")
    got = {r["case"]: r["code"] for r in errors.to_pylist()}
    got.update({case: ACCEPTED for case in metadata.column("case").to_pylist()})
    expected = {case: code for case, _, code in TABLE} | {"good": ACCEPTED}
    assert got == expected
    assert summary["rows"]["succeeded"] + summary["rows"]["failed"] == len(rows)
    for record in errors.to_pylist():
        assert record["code"] in CODES and len(record["message"]) > 15, record
