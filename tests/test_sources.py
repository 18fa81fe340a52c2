import numpy as np
import pytest
from helpers import box_mask, png_bytes, scene
from PIL import Image

from unclip_batch.batches import image_of, mask_of, rows_of, to_batch
from unclip_batch.sources import load_sources


def row(**kw):
    base = {
        "id": "r",
        "task": "variation",
        "image": "",
        "mask": "",
        "width": 64,
        "height": 64,
        "code": "",
        "message": "",
        "stage": "",
    }
    return {**base, **kw}


def load(*rows):
    return rows_of(load_sources(to_batch(list(rows))))


def save(tmp_path, name, data):
    path = tmp_path / name
    if isinstance(data, Image.Image):
        data.save(path)
    else:
        path.write_bytes(data)
    return str(path)


def test_variation_source_is_decoded_and_resized(tmp_path):
    (out,) = load(row(image=save(tmp_path, "big.png", scene(size=128)), width=32, height=32))
    assert out["code"] == "" and image_of(out).shape == (32, 32, 3)
    assert tuple(image_of(out)[16, 16]) == (220, 30, 30)


def test_generate_rows_pass_untouched(tmp_path):
    (out,) = load(row(task="generate"))
    assert out["code"] == "" and out["pixels"] == b""


def test_mask_white_is_repaint(tmp_path):
    (out,) = load(row(task="inpaint", image=save(tmp_path, "s.png", scene()), mask=save(tmp_path, "m.png", box_mask())))
    repaint = mask_of(out)
    assert repaint[40, 40] == 1 and repaint[10, 10] == 0


def test_rgba_transparent_pixels_are_repainted(tmp_path):
    rgba = scene().convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(64)[None, :] < 32, 0, 255).astype(np.uint8).repeat(64, 0)))
    (out,) = load(row(task="inpaint", image=save(tmp_path, "h.png", rgba)))
    assert mask_of(out)[:, :32].all() and not mask_of(out)[:, 32:].any()


def _ramp16() -> Image.Image:
    """A 16-bit greyscale ramp over the whole range: 0 at the top left, 65535 at the bottom right."""
    return Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK"])
def test_other_modes_are_normalised_to_rgb(tmp_path, mode):
    source = scene()
    name = "x.tif" if mode == "CMYK" else "x.png"
    (out,) = load(row(image=save(tmp_path, name, source.convert(mode))))
    assert out["code"] == ""
    pixels, rgb = image_of(out).astype(int), np.asarray(source, dtype=int)
    if mode == "L":  # grey: three equal channels, the grey value PIL gives
        grey = np.asarray(source.convert("L"), dtype=int)
        assert (pixels == grey[..., None]).all()
    else:  # PIL's own conversion back to RGB, and that is the picture (the palette's colours are near)
        assert (pixels == np.asarray(source.convert(mode).convert("RGB"), dtype=int)).all()
        assert np.abs(pixels - rgb).max() <= (60 if mode == "P" else 1)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    (out,) = load(row(image=save(tmp_path, "x.png", _ramp16())))
    assert out["code"] == ""
    pixels = image_of(out).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    # The whole 0-255 range, rising along the ramp (clipping would make everything past 255/65535 white).
    assert (pixels[0, 0, 0], pixels[-1, -1, 0]) == (0, 255)
    assert 120 <= pixels[32, 0, 0] <= 135 and (np.diff(pixels[:, 0, 0]) >= 0).all()


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda d: d / "missing.png", "image_unreadable"),
        (lambda d: save(d, "empty.png", b""), "image_invalid"),
        (lambda d: save(d, "trunc.png", png_bytes(scene())[:100]), "image_invalid"),
        (lambda d: save(d, "text.png", b"hello, not an image"), "image_invalid"),
        (lambda d: save(d, "tiny.png", Image.new("RGB", (1, 1))), "image_too_small"),
    ],
)
def test_bad_sources_become_row_errors(tmp_path, make, code):
    good = row(id="good", image=save(tmp_path, "ok.png", scene()))
    bad, fine = load(row(image=str(make(tmp_path))), good)
    assert (bad["code"], bad["stage"]) == (code, "load") and bad["message"]
    assert fine["code"] == ""


def test_decompression_bomb_is_refused(tmp_path):
    bomb = Image.new("1", (9000, 9000))  # 81 Mpx, a few KB as PNG
    (out,) = load(row(image=save(tmp_path, "bomb.png", bomb)))
    assert out["code"] == "image_too_large"


@pytest.mark.parametrize(
    "mask, code",
    [
        (box_mask(size=32), "mask_size_mismatch"),
        (Image.new("L", (64, 64), 0), "mask_empty"),
    ],
)
def test_bad_masks(tmp_path, mask, code):
    (out,) = load(row(task="inpaint", image=save(tmp_path, "s.png", scene()), mask=save(tmp_path, "m.png", mask)))
    assert out["code"] == code


def test_inpaint_without_mask_or_alpha(tmp_path):
    (out,) = load(row(task="inpaint", image=save(tmp_path, "s.png", scene())))
    assert out["code"] == "missing_mask"


def test_upstream_errors_are_not_reloaded(tmp_path):
    (out,) = load(row(image=str(tmp_path / "missing.png"), code="invalid_id", message="m", stage="validate"))
    assert out["code"] == "invalid_id"
