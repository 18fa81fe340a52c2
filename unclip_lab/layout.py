"""Kandinsky 2.2-shaped components of any size: the one place that builds them.

The tiny checkpoint (tests), the shapes model (the trainer) and the GPU benchmark's full-size stand-in
all use these builders, so all three have exactly the classes, block types, folder layout and index
files of ``kandinsky-community/kandinsky-2-2-prior``, ``-decoder`` and ``-decoder-inpaint``; only the
widths and depths differ. Building draws from torch's global random stream in call order (seed first).
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT_LENGTH = 77  # CLIP's context; the prior pipeline needs the tokenizer to say so (model_max_length)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's pixel statistics
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-to-character table: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tokenizer(folder: Path, merges: list[str] = ()):
    """A CLIP BPE tokenizer over bytes plus ``merges`` (none: character level): any text tokenizes."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    # model_max_length=77: without it the prior pipeline fails with "int too big to convert".
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LENGTH, pad_token="<|endoftext|>"
    )


def clip_text(tokenizer, *, width: int, layers: int, heads: int, intermediate: int, projection: int, **extra):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=TEXT_LENGTH,
            hidden_size=width,
            projection_dim=projection,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            **extra,
        )
    )


def clip_vision(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    intermediate: int,
    projection: int,
    **extra,
):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=width,
            projection_dim=projection,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            **extra,
        )
    )


def image_processor(size: int, **extra):
    """What the prior pipeline's image_processor folder holds: resize and crop to the encoder's size."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **extra)


def prior(*, embedding_dim: int, heads: int, head_dim: int, layers: int, **extra):
    from diffusers import PriorTransformer

    model = PriorTransformer(
        num_attention_heads=heads, attention_head_dim=head_dim, embedding_dim=embedding_dim, num_layers=layers, **extra
    )
    model.clip_std.data.fill_(1.0)  # random init leaves these at 0, which would collapse every embedding
    return model


def movq(*, widths, layers_per_block: int, norm_num_groups: int, num_vq_embeddings: int, **extra):
    """MoVQ (``VQModel`` with spatial norm); attention at the lowest resolution, as Kandinsky's has.
    SpatialNorm in its decoder hard-codes 32 groups, so its widths are multiples of 32."""
    from diffusers import VQModel

    levels = len(widths)
    return VQModel(
        block_out_channels=list(widths),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=layers_per_block,
        down_block_types=["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        norm_num_groups=norm_num_groups,
        norm_type="spatial",
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=4,
        **extra,
    )


def unet(
    *,
    in_channels: int,
    sample_size: int,
    embed_dim: int,
    widths,
    layers_per_block: int,
    cross_attention_dim: int,
    attention_head_dim: int,
    norm_num_groups: int,
    **extra,
):
    """The decoder UNet (4 input channels) or its inpainting twin (9: + masked source latents + mask),
    conditioned on the CLIP image embedding; 8 outputs = latent + learned variance."""
    from diffusers import UNet2DConditionModel

    levels = len(widths)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=8,
        addition_embed_type="image",
        encoder_hid_dim=embed_dim,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=norm_num_groups,
        **extra,
    )


def prior_scheduler():
    """kandinsky-2-2-prior's scheduler settings."""
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )


def decoder_ddpm_scheduler(prediction_type: str = "epsilon"):
    """kandinsky-2-2-decoder's scheduler settings (the shapes model changes only what its UNet predicts)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
        thresholding=False,
    )


def write_prior_index(folder: Path) -> None:
    _write_model_index(
        folder,
        "KandinskyV22PriorPipeline",
        {
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_processor": ["transformers", "CLIPImageProcessor"],
            "prior": ["diffusers", "PriorTransformer"],
            "scheduler": ["diffusers", "UnCLIPScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
    )


def write_decoder_index(folder: Path, pipeline: str, scheduler: str = "DDPMScheduler") -> None:
    _write_model_index(
        folder,
        pipeline,
        {
            "movq": ["diffusers", "VQModel"],
            "scheduler": ["diffusers", scheduler],
            "unet": ["diffusers", "UNet2DConditionModel"],
        },
    )


def _write_model_index(folder: Path, class_name: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
