"""The embedded trained model: public layout, a word-level CLIP tokenizer, and pictures that show
what was asked, judged by world.judge (geometry), not by the model's own CLIP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, images_of, job, pixels, read_output, write_manifest

from unclip_batch.models import WEIGHTS, ModelSpec
from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR, describe
from unclip_lab import world

SHAPES = WEIGHTS / "shapes"


def test_shapes_checkpoint_is_the_default_and_has_the_public_layout():
    assert ModelSpec.parse("default").location == str(SHAPES)
    for name, pipeline in (
        (PRIOR, "KandinskyV22PriorPipeline"),
        (DECODER, "KandinskyV22Pipeline"),
        (INPAINT, "KandinskyV22InpaintPipeline"),
    ):
        assert json.loads((SHAPES / name / "model_index.json").read_text())["_class_name"] == pipeline
    assert not [p for p in SHAPES.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    weights = sum(p.stat().st_size for p in SHAPES.rglob("*.safetensors"))
    assert weights < 40e6, f"committed weights grew to {weights / 1e6:.0f} MB"
    info = describe(str(SHAPES))
    assert (info.default_size, info.size_multiple) == (64, 8)
    card = (SHAPES / "README.md").read_text()
    assert "clip_zero_shot" in card and "python -m unclip_lab.train" in card


def test_tokenizer_knows_every_world_word_as_one_token():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SHAPES / PRIOR / "tokenizer")
    assert tokenizer.model_max_length == 77
    for word in world.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word  # <start> word <end>
    # Words outside the world still tokenize (letter by letter), so any prompt runs.
    assert tokenizer.decode(tokenizer("a zebra!").input_ids, skip_special_tokens=True) == "a zebra !"


def test_tokenizer_builder_is_deterministic(tmp_path):
    from unclip_lab.train import build_tokenizer

    first, second = build_tokenizer(tmp_path / "a"), build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "merges.txt").read_text() == (tmp_path / "b" / "merges.txt").read_text()
    assert first.get_vocab() == second.get_vocab()
    caption = "a picture of a large blue square on an orange background at the top left"
    assert first.tokenize(caption) == [w + "</w>" for w in caption.split()]
    # The committed tokenizer is this builder's: a retrain gives the same token ids.
    assert (SHAPES / PRIOR / "tokenizer" / "merges.txt").read_text() == (tmp_path / "a" / "merges.txt").read_text()


def test_recipe_changes_are_typed_and_checked():
    from dataclasses import replace

    from unclip_lab.train import Recipe, _parse_changes

    changes = _parse_changes(["movq_channels=32,64,64", "refine_steps=10", "clip_lr=0.5"])
    assert changes == {"movq_channels": (32, 64, 64), "refine_steps": 10, "clip_lr": 0.5}
    assert replace(Recipe(), **changes).refine_steps == 10
    with pytest.raises(SystemExit, match="no Recipe field 'refine'"):
        _parse_changes(["refine=3"])


def test_resuming_with_another_recipe_is_refused(tmp_path):
    """A resumed run must not mix stages trained under two recipes into one checkpoint."""
    from dataclasses import asdict

    from unclip_lab.train import Recipe, train

    (tmp_path / "training.json").write_text(json.dumps({"recipe": asdict(Recipe(refine_steps=1)), "stages": {}}))
    with pytest.raises(SystemExit, match="another recipe"):
        train(tmp_path, Recipe())


def test_beside_masks_cover_one_shape_and_stop_short_of_the_other():
    """The beside stage's two-shape examples: the mask is over the first shape and never reaches the second
    (or the UNet would learn to repaint what the classic edit keeps); one-shape masks are as before."""
    from unclip_lab.train import _masks

    _, firsts, seconds = world.pairs(300, seed=1)
    masks = _masks(firsts, np.random.default_rng(0), others=seconds)[:, 0]
    for mask, first, second in zip(masks, firsts, seconds):
        x0, y0, x1, y1 = first.box()
        assert mask[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3].all()  # the shape and 2 px around it
        x0, y0, x1, y1 = second.box()
        assert not mask[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3].any()
    alone = _masks(firsts, np.random.default_rng(0))[:, 0]
    assert (alone >= masks).all() and (alone > masks).any()  # the same growth, cut back only near a second shape


MODEL_DEFAULTS = {"num_inference_steps": 20, "prior_num_inference_steps": 25}  # the model's; helpers.job cuts them
GENERATE = [
    ("red", "circle", "white"),
    ("blue", "square", "yellow"),
    ("green", "triangle", "gray"),
    ("yellow", "circle", "purple"),
]
PLACED = [("white", "square", "top left", "blue"), ("purple", "circle", "bottom right", "yellow")]


@pytest.mark.slow
def test_the_default_model_draws_what_it_is_told_through_the_real_job(ray_local, tmp_path):
    """A handful of rows through Ray with the default model and its default steps: colours right, shapes
    where they were asked for."""
    folder = tmp_path / "job"
    folder.mkdir()
    source = world.Scene("orange", "square", "large", "center", "blue")
    from PIL import Image

    Image.fromarray(world.render(source)).save(folder / "source.png")
    Image.fromarray(world.region_mask(source, grow=6)).save(folder / "mask.png")  # over the square
    rows = [{"id": f"{c}-{s}", "prompt": f"a {c} {s} on a {b} background", "seed": 1} for c, s, b in GENERATE]
    for colour, shape, place, background in PLACED:
        prompt = world.describe({"colour": colour, "shape": shape, "position": place, "background": background})
        rows.append({"id": f"{colour}-{shape}-{place.replace(' ', '-')}", "prompt": prompt, "seed": 1})
    rows.append({"id": "variation", "task": "variation", "image": "source.png", "seed": 1})
    rows.append(
        {
            "id": "inpaint",
            "task": "inpaint",
            "image": "source.png",
            "mask": "mask.png",
            "prompt": "a white circle",
            "seed": 1,
        }
    )
    manifest = write_manifest(folder / "m.parquet", rows)
    output = tmp_path / "out"
    from unclip_batch.job import run_job

    summary = run_job(job([manifest], output, model="default", defaults=MODEL_DEFAULTS))
    assert summary["rows"]["succeeded"] == len(rows)
    images = {name.split("/")[0]: pixels(data) for name, data in images_of(output).items()}
    asked = [(f"{c}-{s}", c, s, None, b) for c, s, b in GENERATE]
    asked += [(f"{c}-{s}-{p.replace(' ', '-')}", c, s, p, b) for c, s, p, b in PLACED]
    seen = {key: world.judge(images[key]) for key, *_ in asked}
    for key, colour, _, place, background in asked:
        assert (seen[key].colour, seen[key].background) == (colour, background), seen[key]
        assert place is None or seen[key].position == place, seen[key]
    # Shape is the model's weakest word (81.5% in `make evaluate`, so about 5 of these 6): 4 at least.
    assert sum(seen[key].shape == shape for key, _, shape, *_ in asked) >= len(asked) - 2, seen
    seen = world.judge(images["variation"])
    assert (seen.colour, seen.shape) == ("orange", "square"), seen
    from unclip_lab.evaluate import dominant_inside

    inside = dominant_inside(images["inpaint"], world.region_mask(source, grow=6), "blue")
    assert inside == "white"
    metadata, _ = read_output(output)
    assert set(metadata.column("model").to_pylist()) == {"default"}


def test_clip_side_losses_see_the_shapes_patches_and_start_from_a_2d_position_code():
    """The training-only signals that put position into CLIP (unclip_lab/train.py, clip_side_losses)."""
    import numpy as np

    from unclip_lab.train import PATCH, foreground_patches, sincos_positions

    grid = world.SIZE // PATCH
    scene = world.Scene("red", "square", "small", "top left", "white")
    patches = foreground_patches(world.render(scene)[None], [scene]).reshape(grid, grid)
    x0, y0, x1, y1 = scene.box()
    expected = np.zeros((grid, grid), bool)
    expected[y0 // PATCH : y1 // PATCH + 1, x0 // PATCH : x1 // PATCH + 1] = True
    assert (patches == expected).all() and patches[0, 0] and not patches[grid - 1].any()
    # A black shape on a white background and a white one on black: the background, not a colour, decides.
    for colour, background in (("black", "white"), ("white", "black")):
        flipped = world.Scene(colour, "circle", "large", "bottom right", background)
        assert foreground_patches(world.render(flipped)[None], [flipped])[0].reshape(grid, grid)[-3:-1, -3:-1].all()

    table = sincos_positions(64, grid)
    assert table.shape == (1 + grid * grid, 64) and not table[0].any()  # the class token gets no position
    assert len({row.tobytes() for row in table[1:]}) == grid * grid
    # Neighbours are closer than far patches: the code is smooth in both directions.
    at = lambda row, col: table[1 + row * grid + col]  # noqa: E731
    assert np.linalg.norm(at(0, 0) - at(0, 1)) < np.linalg.norm(at(0, 0) - at(0, 7))
    assert np.linalg.norm(at(0, 0) - at(1, 0)) < np.linalg.norm(at(0, 0) - at(7, 0))


def test_every_stage_starts_after_the_stages_it_reads():
    from unclip_lab.train import NEEDS, ON_DATASET, STAGES

    order = [stage.name for stage in STAGES]
    assert set(NEEDS) == set(order) and len(order) == len(set(order))
    for name in order:
        assert all(order.index(need) < order.index(name) for need in NEEDS[name]), name
    # The dataset is encoded from CLIP and the MoVQ: its readers wait for both.
    assert all({"clip", "movq"} <= _upstream(name, NEEDS) for name in ON_DATASET)


def _upstream(name, needs):
    out = set(needs[name])
    for need in needs[name]:
        out |= _upstream(need, needs)
    return out


FIGURES = (
    "generate_colour",
    "generate_shape",
    "generate_background",
    "generate_size",
    "generate_position",
    "generate_plain_drawn",
    "generate_plain_colour",
    "variation_colour",
    "variation_shape",
    "variation_size",
    "variation_position",
    "steered_colour",
    "steered_shape",
    "steered_position",
    "inpaint_colour",
    "inpaint_shape",
    "inpaint_outside_mad",
    "inpaint_beside_colour",
    "inpaint_beside_outside_mad",
    "clip_zero_shot",
    "clip_zero_shot_position",
)


def test_the_judge_reads_the_models_own_reconstructions_of_world_pictures():
    """The MoVQ's reconstruction of a world picture is the best any decoder of this model can draw; the
    judge must read it as the picture was drawn, or it would blame the model for its own misreading.
    Measured: 40 of 40 (the fill-ratio judge before it: 37, three small triangles read as circles)."""
    import torch
    from diffusers import VQModel

    from unclip_lab.train import movq_pixels

    movq = VQModel.from_pretrained(SHAPES / DECODER, subfolder="movq").eval()
    images, _, scenes, _ = world.samples(40, seed=4242, mention=1.0)
    with torch.inference_mode():
        out = movq.decode(movq.encode(movq_pixels(torch, images))["latents"], force_not_quantize=True)["sample"]
    rebuilt = ((out * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    judged = [world.judge(image) for image in rebuilt]
    seen = [(j.colour, j.shape, j.size, j.position, j.background) for j in judged]
    drawn = [(s.colour, s.shape, s.size, s.position, s.background) for s in scenes]
    assert sum(a == b for a, b in zip(seen, drawn)) >= 39


def test_the_card_is_rendered_from_the_committed_files(tmp_path):
    """The model card (its README.md) is what unclip_lab.card renders from training.json, evaluation.json,
    best_of.json, edits.json and history.md: no figure in it is typed by hand (the next test checks the
    evaluation's figures are today's verdicts)."""
    import shutil

    from unclip_lab.card import write_card
    from unclip_lab.evaluate import AIMS, TARGETS

    copy = tmp_path / "shapes"
    shutil.copytree(SHAPES, copy)
    write_card(copy, TARGETS, AIMS)
    assert (copy / "README.md").read_text() == (SHAPES / "README.md").read_text()
    figures = json.loads((SHAPES / "evaluation.json").read_text())
    card = (SHAPES / "README.md").read_text()
    assert f"| {100 * figures['generate_colour']:.1f}% / " in card
    assert "note" not in json.loads((SHAPES / "training.json").read_text())  # prose lives in history.md


def test_the_committed_figures_are_its_verdicts():
    from unclip_lab.evaluate import AIMS, passed, summarise

    committed = json.loads((SHAPES / "evaluation.json").read_text())
    verdicts = committed["per_case"]
    assert set(verdicts) == set(FIGURES)
    assert all(len(values) == committed["cases_per_task"] for values in verdicts.values())
    assert summarise(verdicts) == {k: committed[k] for k in FIGURES}
    assert passed(committed) == committed["passed"] and all(committed["passed"].values())
    assert passed(committed, AIMS) == committed["aims_met"]  # issue 16's bar: not all met yet
    # Size and position are judged where the prompt names them (about half the cases each), and only there.
    assert set(committed["named"]) == {"generate_size", "generate_position"}
    for name, share in committed["named"].items():
        assert share == sum(v is not None for v in verdicts[name]) / len(verdicts[name]) and 0.35 < share < 0.65


def run_evaluation(tmp_path, *args: str) -> dict:
    """`python -m unclip_lab.evaluate ARGS` in a process of its own (on CPU, as it always runs): its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "unclip_lab.evaluate", *args, "--json", str(tmp_path / "today.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,  # the lab lives beside the package: importable from the repository root
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "today.json").read_text())


CHECKED_CASES = 8  # half a model call per task (8 images; calls are batch-invariant): 8 task sets since issue 16


@pytest.mark.slow
def test_the_committed_evaluation_is_what_the_model_gives_today(tmp_path):
    """Re-run `make evaluate` (on CPU, as it always runs) on the first cases: each one's verdict is the
    committed one (case i is the same model call whatever the run's length; see evaluate.evaluate)."""
    committed = json.loads((SHAPES / "evaluation.json").read_text())
    today = run_evaluation(tmp_path, "--model", "default", "--n", str(CHECKED_CASES))
    # Settings added since the evaluation was made (best_of) are at the defaults that change nothing.
    assert {k: today["sampling"][k] for k in committed["sampling"]} == committed["sampling"]
    assert today["sampling"]["best_of"] == 1 and today["scheduler"] == committed["scheduler"]
    for name in FIGURES:
        assert today["per_case"][name] == committed["per_case"][name][:CHECKED_CASES], name


@pytest.mark.slow
def test_the_default_models_clip_score_prefers_the_prompt_that_names_the_picture():
    """clip_score in the metadata is only useful for filtering if the model's CLIP tells pictures apart."""
    import numpy as np

    model = ModelSpec.parse("default").load(device="cpu", tasks=("generate",))
    kinds = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    rng = np.random.default_rng(0)
    pictures = np.stack(
        [world.render(world.random_scene(rng, colour=c, shape=s, background="white")) for c, s in kinds]
    )
    prompts = [f"a {c} {s}" for c, s in kinds]
    scores = np.array([model.clip(pictures, [prompt] * len(kinds))[0] for prompt in prompts])  # prompt x picture
    assert (scores.argmax(axis=0) == np.arange(len(kinds))).all(), scores.round(3)
    # Where: the same red circle in five places, and prompts that differ only in the position they name.
    places = ["top left", "top right", "bottom left", "bottom right", "center"]
    scenes = [world.random_scene(rng, colour="red", shape="circle", position=p, background="white") for p in places]
    pictures = np.stack([world.render(scene) for scene in scenes])
    prompts = [world.describe({"colour": "red", "shape": "circle", "position": p}) for p in places]
    scores = np.array([model.clip(pictures, [prompt] * len(places))[0] for prompt in prompts])
    assert (scores.argmax(axis=0) == np.arange(len(places))).all(), scores.round(3)


BEST_OF_CASES = 8  # 8 + 32 images, and the 32 candidates alone: five model calls


@pytest.mark.slow
def test_best_of_4_is_as_the_readme_says_and_clip_score_agrees_with_the_judge(tmp_path):
    """best_of.json (`python -m unclip_lab.evaluate --best-of 4`, the job's own predictor, judged by
    geometry): the model card reports its shape figures (100% with one candidate and with four since CLIP trains
    2400 steps; with the 800-step CLIP four did not help, 98.0% -> 96.5%, its score ranking a right shape
    above a wrong one of the same prompt in 42% of the pairs, now in all of them), and images the judge
    finds right score higher than those it finds wrong. The job
    keeps the candidate its scores rank first, byte for byte. The first cases, run again, give the
    committed verdicts and choices."""
    from unclip_lab.evaluate import summarise

    committed = json.loads((SHAPES / "best_of.json").read_text())
    one, four = committed["best_of_1"], committed["best_of_4"]
    card = (SHAPES / "README.md").read_text()
    assert f"shape right {100 * one['shape']:.1f}% with one candidate".replace("100.0%", "100%") in card
    assert one["clip_score_judged_right"] > one["clip_score_judged_wrong"]
    for figures in (one, four):
        assert summarise(figures["per_case"]).items() <= figures.items()
    # Each candidate alone: the job kept, byte for byte, the one its scores rank first, in every case.
    assert committed["candidates"]["kept_as_ranked"] == 1.0
    assert committed["candidates"]["shape"]["any"] >= four["shape"]
    # The one-candidate verdicts are `make evaluate`'s generate verdicts (the same cases and calls, through
    # the predictor instead of the model): checked on the committed files, then 8 cases run again.
    generate = json.loads((SHAPES / "evaluation.json").read_text())["per_case"]
    assert all(one["per_case"][k] == generate[f"generate_{k}"] for k in one["per_case"] if k != "all_named")
    today = run_evaluation(tmp_path, "--best-of", "4", "--n", str(BEST_OF_CASES))
    assert today["sampling"] == committed["sampling"]
    assert today["candidates"]["kept_as_ranked"] == 1.0
    for name in ("best_of_1", "best_of_4"):
        assert today[name]["candidates_kept"] == committed[name]["candidates_kept"][:BEST_OF_CASES]
        for key, verdicts in today[name]["per_case"].items():
            assert verdicts == committed[name]["per_case"][key][:BEST_OF_CASES], (name, key)


EDIT_CASES = 2  # 2 interpolations of 5 frames and 3 x 2 text-diff images: four model calls


@pytest.mark.slow
def test_interpolations_and_text_diffs_do_what_dall_e_2s_do(tmp_path):
    """edits.json (`python -m unclip_lab.evaluate --edits`, the job's predictor, judged by geometry): a red
    circle interpolated into a blue one goes red to blue in order and stays a circle; a text diff "a red
    square" -> "a green square" turns red squares green; at strength 0 it is the image's own variation.
    The first cases, run again, give the committed verdicts."""
    committed = json.loads((SHAPES / "edits.json").read_text())
    assert committed["interpolate_in_order"] >= 0.9 and committed["interpolate_circle_frames"] >= 0.8
    assert committed["text_diff_green"] >= 0.75 and committed["text_diff_strength_0_is_the_variation"] == 1.0
    today = run_evaluation(tmp_path, "--edits", "--n", str(EDIT_CASES))
    assert today["sampling"] == committed["sampling"] and today["text_diff_strength_0_is_the_variation"] == 1.0
    for name, verdicts in today["per_case"].items():
        assert verdicts == committed["per_case"][name][:EDIT_CASES], name
