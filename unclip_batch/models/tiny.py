"""Build the tiny random Kandinsky 2.2 checkpoint that tests and the demo use.

No machine of ours reaches a model hub, so the project makes its own checkpoint: real diffusers and
transformers classes with random weights, saved with ``save_pretrained`` as safetensors in exactly the
folder layout of ``kandinsky-community/kandinsky-2-2-prior``, ``-decoder`` and ``-decoder-inpaint``.
It draws noise, but it exercises the same loading and sampling code as the real model.

    python -m unclip_batch.models.tiny unclip_batch/weights/tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR

EMBED_DIM = 32  # CLIP projection = prior embedding = decoder conditioning width
IMAGE_SIZE = 64  # default output size in pixels
CLIP_IMAGE_SIZE = 32  # what the CLIP image encoder sees


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


def build_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (no merges): any text tokenizes, the vocabulary stays tiny."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # model_max_length=77: without it the prior pipeline fails with "int too big to convert".
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    return tokenizer


def build(root: Path, seed: int = 0) -> None:
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    prior_dir = root / PRIOR
    tokenizer = build_tokenizer(prior_dir / "tokenizer")
    tokenizer.save_pretrained(prior_dir / "tokenizer")
    clip = dict(hidden_size=EMBED_DIM, projection_dim=EMBED_DIM, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2)
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77, **clip,
    )).save_pretrained(prior_dir / "text_encoder")
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=CLIP_IMAGE_SIZE, patch_size=8, **clip)).save_pretrained(
        prior_dir / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                       crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}).save_pretrained(
        prior_dir / "image_processor")
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, embedding_dim=EMBED_DIM, num_layers=1)
    prior.clip_std.data.fill_(1.0)  # random init leaves these at 0, which would collapse every embedding
    prior.save_pretrained(prior_dir / "prior")
    prior_scheduler().save_pretrained(prior_dir / "scheduler")
    write_prior_index(prior_dir)

    # SpatialNorm in the MoVQ decoder hard-codes 32 groups, so its widths are multiples of 32.
    movq = VQModel(
        block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    scheduler = decoder_ddpm_scheduler()
    for name, in_channels in ((DECODER, 4), (INPAINT, 9)):
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2, in_channels=in_channels, out_channels=8,  # 8 = latent + learned variance
            addition_embed_type="image", encoder_hid_dim=EMBED_DIM, encoder_hid_dim_type="image_proj",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
            class_embed_type=None, norm_num_groups=8,
        )
        folder = root / name
        unet.save_pretrained(folder / "unet")
        movq.save_pretrained(folder / "movq")
        scheduler.save_pretrained(folder / "scheduler")
        write_decoder_index(folder, "KandinskyV22InpaintPipeline" if name == INPAINT else "KandinskyV22Pipeline")


def prior_scheduler():
    """kandinsky-2-2-prior's scheduler settings."""
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                           clip_sample=True, clip_sample_range=10.0)


def decoder_ddpm_scheduler(prediction_type: str = "epsilon"):
    """kandinsky-2-2-decoder's scheduler settings (the embedded model changes only what its UNet predicts)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type, thresholding=False)


def write_prior_index(folder: Path) -> None:
    _write_model_index(folder, "KandinskyV22PriorPipeline", {
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "prior": ["diffusers", "PriorTransformer"],
        "scheduler": ["diffusers", "UnCLIPScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    })


def write_decoder_index(folder: Path, pipeline: str, scheduler: str = "DDPMScheduler") -> None:
    _write_model_index(folder, pipeline, {
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", scheduler],
        "unet": ["diffusers", "UNet2DConditionModel"],
    })


def _write_model_index(folder: Path, class_name: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder that receives the three checkpoint folders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.output, seed=args.seed)


if __name__ == "__main__":
    main()
