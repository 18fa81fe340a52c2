"""The predictor on plain dict batches, without Ray (as Ray's batch-inference docs test theirs)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST

from unclip_batch.batches import rows_of, to_batch
from unclip_batch.manifest import ROW_FIELDS
from unclip_batch.predict import UnclipPredictor


def row(i, **kw):
    base = dict(
        row=i,
        id=f"r{i}",
        task="generate",
        prompt=f"prompt {i}",
        negative_prompt="",
        image="",
        mask="",
        num_images=1,
        seed=i,
        best_of=1,
        image2="",
        prompt2="",
        source_prompt="",
        strength=0.5,
        pixels2=b"",
        width=64,
        height=64,
        guidance_scale=4.0,
        prior_guidance_scale=4.0,
        variation_strength=0.3,
        code="",
        message="",
        stage="",
        pixels=b"",
        repaint=b"",
        load_s=0.0,
        input_hash=f"h{i}",
        **FAST,
    )
    base.update(kw)
    assert set(ROW_FIELDS) <= set(base)
    return base


@pytest.fixture(scope="module")
def predictor():
    return UnclipPredictor(model="tiny", tasks=("generate",), batch_size=4, device="cpu", threads=2)


def test_rows_expand_to_images_with_seed_plus_k(predictor):
    out = rows_of(predictor(to_batch([row(0, num_images=2), row(1, width=32, height=32), row(2)])))
    assert [(r["id"], r["k"], r["seed"]) for r in out] == [("r0", 0, 0), ("r0", 1, 1), ("r2", 0, 2), ("r1", 0, 1)]
    sizes = {r["id"]: len(r["pixels"]) for r in out}
    assert sizes == {"r0": 64 * 64 * 3, "r1": 32 * 32 * 3, "r2": 64 * 64 * 3}
    assert all(r["code"] == "" and r["model_s"] > 0 for r in out)


def test_best_of_keeps_each_images_candidate_with_the_highest_clip_score(predictor):
    """best_of 3, two images: image k's candidates are seeds 3k..3k+2, each the image that seed gives alone,
    and the one kept is the candidate its CLIP scores highest, with that seed and candidate recorded."""
    out = rows_of(predictor(to_batch([row(0, num_images=2, best_of=3, seed=10)])))
    alone = {
        seed: rows_of(predictor(to_batch([row(0, seed=seed)])))[0] for seed in range(10, 16)
    }  # best_of 1: seed + k
    assert [r["k"] for r in out] == [0, 1]
    for image in out:
        k = image["k"]
        candidates = [alone[10 + 3 * k + c] for c in range(3)]
        scores = [c["clip_score"] for c in candidates]
        assert len(set(scores)) == 3  # three different images, so the choice means something
        best = int(np.argmax(scores))
        assert (image["candidate"], image["seed"]) == (best, 10 + 3 * k + best)
        assert image["pixels"] == candidates[best]["pixels"] and image["clip_score"] == max(scores)
        assert image["best_of"] == 3


def test_interpolation_frames_share_one_noise_and_end_at_each_ends_variation(predictor):
    """Frames at weights 0, 1/2, 1 of two images, all with the row's seed: the first frame is the first
    image's variation, the last the second's (the same seed and embedding), the middle one neither; a frame
    is the same bytes in a crowd (with prompt ends run through the prior) as alone."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes() for _ in range(2))
    ends = dict(task="interpolate", prompt="", image="a.png", image2="b.png", pixels=a, pixels2=b, seed=5)
    frames = rows_of(predictor(to_batch([row(0, num_images=3, **ends)])))
    assert [(f["k"], f["seed"]) for f in frames] == [(0, 5), (1, 5), (2, 5)]
    variation = dict(task="variation", prompt="", image="x.png", seed=5)
    of_a, of_b = (rows_of(predictor(to_batch([row(1, pixels=p, **variation)])))[0]["pixels"] for p in (a, b))
    assert frames[0]["pixels"] == of_a and frames[2]["pixels"] == of_b
    assert frames[1]["pixels"] not in (of_a, of_b)
    with_prompts = dict(task="interpolate", prompt="a red circle", prompt2="a blue circle", seed=9, num_images=3)
    alone = rows_of(predictor(to_batch([row(2, **with_prompts)])))
    crowd = rows_of(predictor(to_batch([row(3, num_images=2, **ends), row(2, **with_prompts)])))
    assert [f["pixels"] for f in crowd if f["id"] == "r2"] == [f["pixels"] for f in alone]


def test_a_text_diff_at_strength_0_is_the_images_own_variation(predictor):
    source = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()
    common = dict(image="x.png", pixels=source, seed=3)
    diff = dict(task="text_diff", source_prompt="a red square", prompt="a green square", **common)
    unmoved, moved = (rows_of(predictor(to_batch([row(0, strength=s, **diff)])))[0] for s in (0.0, 0.5))
    variation = rows_of(predictor(to_batch([row(0, task="variation", prompt="", **common)])))[0]
    assert unmoved["pixels"] == variation["pixels"] and moved["pixels"] != variation["pixels"]
    assert moved["clip_score"] == moved["clip_score"]  # scored against the target caption (not NaN)


def test_upstream_errors_pass_through(predictor):
    out = rows_of(predictor(to_batch([row(0, code="image_invalid", message="bad", stage="load"), row(1)])))
    assert [(r["id"], r["code"], r["k"]) for r in out] == [("r0", "image_invalid", -1), ("r1", "", 0)]


def test_a_row_that_breaks_the_model_fails_alone(predictor):
    source = np.zeros((64, 64, 3), np.uint8).tobytes()
    rows = [
        row(0, task="variation", image="a.png", pixels=source),
        row(1, task="variation", image="b.png", pixels=b"corrupt"),
        row(2, task="variation", image="c.png", pixels=source),
    ]
    out = rows_of(predictor(to_batch(rows)))
    assert [(r["id"], r["code"]) for r in out] == [("r0", ""), ("r1", "model_error"), ("r2", "")]
    assert out[1]["stage"] == "predict" and "reshape" in out[1]["message"]


def test_companions_do_not_change_a_rows_images(predictor):
    """Calls are padded to batch_size, so a row's bytes do not depend on what it is batched with."""
    crowd = rows_of(predictor(to_batch([row(0, num_images=2), row(1, num_images=2), row(2, prompt="other")])))
    alone = rows_of(predictor(to_batch([row(1, num_images=2)])))
    assert [r["pixels"] for r in crowd if r["id"] == "r1"] == [r["pixels"] for r in alone]


@pytest.mark.slow  # a fresh interpreter that loads the model: ~10 s of the fast suite's minute
def test_model_runs_on_the_configured_threads_from_any_calling_thread():
    """Ray Data calls an actor from another thread than the one that built it, where Ray's
    OMP_NUM_THREADS=1 rules (an actor holding one CPU): the model must still get its ``threads``. Read
    as oneDNN's convolutions see it: OpenMP's own count in the calling thread."""
    probe = """
import ctypes, threading, sys
sys.path.insert(0, "tests")
from test_predict import row
from unclip_batch.batches import to_batch
from unclip_batch.predict import UnclipPredictor
predictor = UnclipPredictor(model="tiny", tasks=("generate",), batch_size=1, device="cpu", threads=2)
gomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
generate, seen = predictor.model.generate, []
def spy(*args):
    seen.append(ctypes.CDLL(gomp).omp_get_max_threads())
    return generate(*args)
predictor.model.generate = spy
caller = threading.Thread(target=predictor, args=(to_batch([row(0)]),))
caller.start()
caller.join()
print(seen)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "[2]"


# Compiled against eager, the tiny model (2026-12-02, 2 cores): at FAST steps 0.14-0.28% of the values of
# each task's image differed, by 1 level; at 10 decoder steps, generated images' 0.34%, by at most 2 levels, and
# variations' and inpaints' by at most 9 levels (0.008 on average). The bar leaves room for another CPU's kernels.
COMPILED_DIFFER_AT_MOST = 0.01  # of the values
COMPILED_MAX_LEVELS = 16


@pytest.mark.slow  # compiling the tiny model's seven networks: ~2 minutes cold, ~20 s from inductor's cache
def test_a_compiled_model_matches_eager_within_tolerance_keeps_its_bytes_and_reports_warm_up(predictor):
    """--compile: every network of the tiny model compiled by inductor (it runs on CPU too), against the same
    rows eager, for each task that runs networks of its own (generate: CLIP text, prior, UNet, MoVQ decoder;
    variation: CLIP image; inpaint: its UNet, MoVQ's encoder). Fused kernels add in another order, so a few
    values differ by a few levels. Compiled, a row's bytes are the same in every call and whatever its
    companions; the first call of each shape, and only it, reports its seconds as warm-up."""
    import torch

    tasks = ("generate", "variation", "inpaint")
    eager = UnclipPredictor(model="tiny", tasks=tasks, batch_size=4, device="cpu", threads=2)
    compiled = UnclipPredictor(model="tiny", tasks=tasks, batch_size=4, device="cpu", threads=2, compile="default")
    source = rows_of(predictor(to_batch([row(9)])))[0]["pixels"]
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 1
    rows = [
        row(0),
        row(1, negative_prompt="blurry"),
        row(2, task="variation", image="a.png", pixels=source, prompt=""),
        row(3, task="inpaint", image="a.png", mask="m.png", pixels=source, repaint=mask.tobytes()),
    ]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = {r["id"]: r for r in rows_of(compiled(to_batch(rows)))}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= len(compiled.model.modules()) == 7
    reference = {r["id"]: r for r in rows_of(eager(to_batch(rows)))}
    for name, image in first.items():
        a, b = (np.frombuffer(r["pixels"], np.uint8).astype(int) for r in (image, reference[name]))
        diff = np.abs(a - b)
        assert (diff > 0).mean() <= COMPILED_DIFFER_AT_MOST and diff.max() <= COMPILED_MAX_LEVELS, name
    assert any(first[name]["pixels"] != reference[name]["pixels"] for name in first)  # compiled code ran
    # Each group's first call compiled: its warm-up is on the group's first row; the second call has none.
    assert all(r["warm_up_s"] > 0 for r in first.values())
    again = rows_of(compiled(to_batch([rows[1], rows[0], rows[3], rows[2]])))
    assert all(r["warm_up_s"] == 0 for r in again)
    assert all(r["pixels"] == first[r["id"]]["pixels"] for r in again)
    assert eager(to_batch(rows))["warm_up_s"].tolist() == [0.0] * 4  # eager: no warm-up to report
