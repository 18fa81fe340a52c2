"""Build the tiny random Kandinsky 2.2 checkpoint that tests and the demo use.

No machine of ours reaches a model hub, so the project makes its own checkpoint: real diffusers and
transformers classes with random weights, saved with ``save_pretrained`` as safetensors in exactly the
folder layout of ``kandinsky-community/kandinsky-2-2-prior``, ``-decoder`` and ``-decoder-inpaint``.
It draws noise, but it exercises the same loading and sampling code as the real model.

    python -m unclip_lab.tiny unclip_batch/weights/tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR
from unclip_lab import layout

EMBED_DIM = 32  # CLIP projection = prior embedding = decoder conditioning width
IMAGE_SIZE = 64  # default output size in pixels
CLIP_IMAGE_SIZE = 32  # what the CLIP image encoder sees


def build(root: Path, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    prior_dir = root / PRIOR
    tokenizer = layout.tokenizer(prior_dir / "tokenizer")
    tokenizer.save_pretrained(prior_dir / "tokenizer")
    clip = dict(width=EMBED_DIM, projection=EMBED_DIM, intermediate=37, heads=4, layers=2)
    layout.clip_text(tokenizer, **clip).save_pretrained(prior_dir / "text_encoder")
    layout.clip_vision(image_size=CLIP_IMAGE_SIZE, patch_size=8, **clip).save_pretrained(prior_dir / "image_encoder")
    layout.image_processor(CLIP_IMAGE_SIZE).save_pretrained(prior_dir / "image_processor")
    layout.prior(heads=2, head_dim=16, embedding_dim=EMBED_DIM, layers=1).save_pretrained(prior_dir / "prior")
    layout.prior_scheduler().save_pretrained(prior_dir / "scheduler")
    layout.write_prior_index(prior_dir)

    movq = layout.movq(widths=(32, 32), layers_per_block=1, norm_num_groups=8, num_vq_embeddings=12)
    scheduler = layout.decoder_ddpm_scheduler()
    for name, in_channels in ((DECODER, 4), (INPAINT, 9)):
        unet = layout.unet(
            in_channels=in_channels,
            sample_size=IMAGE_SIZE // 2,
            embed_dim=EMBED_DIM,
            widths=(16, 32),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        folder = root / name
        unet.save_pretrained(folder / "unet")
        movq.save_pretrained(folder / "movq")
        scheduler.save_pretrained(folder / "scheduler")
        layout.write_decoder_index(folder, "KandinskyV22InpaintPipeline" if name == INPAINT else "KandinskyV22Pipeline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder that receives the three checkpoint folders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.output, seed=args.seed)


if __name__ == "__main__":
    main()
