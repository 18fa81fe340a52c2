import dataclasses
import json

import numpy as np
import pytest
from helpers import box_mask, scene
from safetensors.torch import load_file

from unclip_batch.models import WEIGHTS, ModelSpec
from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR, Kandinsky22, describe
from unclip_batch.sampling import Sampling

TINY = str(WEIGHTS / "tiny")
S = Sampling(
    width=64,
    height=64,
    num_inference_steps=4,
    guidance_scale=4.0,
    prior_num_inference_steps=2,
    prior_guidance_scale=4.0,
    variation_strength=0.5,
    best_of=1,
)


@pytest.fixture(scope="module")
def model():
    return Kandinsky22(TINY, tasks=frozenset({"generate", "variation", "inpaint"}), device="cpu")


def test_tiny_checkpoint_has_the_public_layout():
    index = {
        name: json.loads((WEIGHTS / "tiny" / name / "model_index.json").read_text())
        for name in (PRIOR, DECODER, INPAINT)
    }
    assert index[PRIOR]["_class_name"] == "KandinskyV22PriorPipeline"
    assert set(index[PRIOR]) >= {"prior", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor"}
    assert index[INPAINT]["_class_name"] == "KandinskyV22InpaintPipeline"
    assert not list((WEIGHTS / "tiny").rglob("*.bin")), "weights must be safetensors only"
    unet = json.loads((WEIGHTS / "tiny" / INPAINT / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9


def test_committed_weights_are_what_the_builder_makes(tmp_path):
    from unclip_lab.tiny import build

    build(tmp_path)
    for committed in (WEIGHTS / "tiny").rglob("*.safetensors"):
        fresh = load_file(tmp_path / committed.relative_to(WEIGHTS / "tiny"))
        for name, tensor in load_file(committed).items():
            assert (fresh[name] == tensor).all(), f"{committed}: {name}"


def test_describe_reads_configs_only():
    info = describe(TINY)
    assert (info.default_size, info.size_multiple) == (64, 4)
    assert info.defaults["num_inference_steps"] == 50


def test_specs():
    assert ModelSpec.parse("tiny").location == TINY
    assert ModelSpec.parse("kandinsky22:/models/k").location == "/models/k"
    assert ModelSpec.parse("s3://bucket/k22").family == "kandinsky22"
    with pytest.raises(ValueError, match="unknown model family"):
        ModelSpec.parse("dalle9:/x")


def test_pickle_checkpoints_are_refused(tmp_path):
    import shutil

    shutil.copytree(WEIGHTS / "tiny", tmp_path / "m")
    unet = tmp_path / "m" / DECODER / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors"):
        Kandinsky22(str(tmp_path / "m"), tasks=frozenset({"generate"}), device="cpu")


def test_generate_is_seeded_per_image(model):
    a = model.generate(["a red circle", "a blue square"], ["", ""], [1, 2], S)
    again = model.generate(["a red circle", "a blue square"], ["", ""], [1, 2], S)
    alone = model.generate(["a blue square"], [""], [2], S)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert (a == again).all()
    assert np.abs(a[1].astype(int) - alone[0]).max() <= 2
    assert not (a[0] == a[1]).all()


def test_negative_prompts_and_other_sizes(model):
    out = model.generate(["a", "b"], ["blurry", "dark"], [1, 2], Sampling(**{**S.__dict__, "width": 32, "height": 48}))
    assert out.shape == (2, 48, 32, 3)


def test_variation_uses_the_source(model):
    source, other = np.asarray(scene()), np.asarray(scene((30, 160, 60), (240, 220, 40)))
    # Same seed, same (empty) prompt: only the source differs, and so do the images.
    out = model.variation([source, other, source, other], [""] * 4, [1] * 4, S)
    assert out.shape == (4, 64, 64, 3)
    assert (out[0] == out[2]).all() and np.abs(out[0].astype(int) - out[1]).max() > 10
    steered = model.variation([source, source], ["a black square", "a black square"], [1, 1], S)
    assert not (out[0] == steered[0]).all()
    # At strength 0 the prompt moves nothing: the source's own variation.
    unmoved = model.variation(
        [source, other, source, other], ["a black square"] * 4, [1] * 4, dataclasses.replace(S, variation_strength=0)
    )
    assert (unmoved == out).all()


def test_inpaint_keeps_pixels_outside_the_mask(model):
    source = np.asarray(scene())
    repaint = (np.asarray(box_mask()) > 0).astype(np.uint8)
    out = model.inpaint([source, source], [repaint, 1 - repaint], ["a", "b"], ["", ""], [1, 2], S)
    assert (out[0][repaint == 0] == source[repaint == 0]).all()
    assert (out[1][repaint == 1] == source[repaint == 1]).all()
    assert (out[0][repaint == 1] != source[repaint == 1]).any()


def test_scheduler_swap_keeps_the_training_schedule():
    fast = Kandinsky22(TINY, tasks=frozenset({"generate"}), device="cpu", scheduler="dpm++")
    assert type(fast.decoder.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert fast.decoder.scheduler.config.beta_end == 0.012  # Kandinsky's betas, another sampler
    out = fast.generate(["a red circle"], [""], [1], S)
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="unknown scheduler"):
        Kandinsky22(TINY, tasks=frozenset({"generate"}), device="cpu", scheduler="euler")


def test_every_family_keeps_the_declared_interface():
    import inspect

    from unclip_batch.models import FAMILIES, Family, Model

    for name in FAMILIES:
        family = ModelSpec(name, name, "x").module()
        assert isinstance(family, Family), name
        for function in ("describe", "load"):
            declared = inspect.signature(getattr(Family, function)).parameters
            assert list(inspect.signature(getattr(family, function)).parameters) == list(declared)[1:], name
    assert isinstance(ModelSpec.parse("null").load(), Model)
    assert isinstance(ModelSpec.parse("tiny").load(device="cpu", tasks=("generate",)), Model)


def test_clip_scores_and_embeddings_of_each_image_alone(model):
    images = model.generate(["a red circle", "a blue square"], ["", ""], [1, 2], S)
    scores, embeds = model.clip(images, ["a red circle", "a blue square"])
    assert all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert embeds.shape == (2, 32) and embeds.dtype == np.float32  # the tiny CLIP's projection width
    alone_scores, alone_embeds = model.clip(images[1:], ["a blue square"])
    assert alone_scores == scores[1:] and (alone_embeds == embeds[1:]).all()  # alone = in company: bit for bit
    assert model.clip(images, ["", "a blue square"])[0] == [None, scores[1]]  # no prompt, no score
    assert ModelSpec.parse("null").load().clip(images, ["a", "b"]) == ([None, None], None)
