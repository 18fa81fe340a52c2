"""Train the embedded model: a small unCLIP that draws the shapes world, in Kandinsky 2.2's layout.

Every part is a real diffusers / transformers class, trained here from nothing, stage by stage:

1. tokenizer: CLIP BPE learned from the world's words (every world word is one token);
2. clip: CLIPTextModelWithProjection + CLIPVisionModelWithProjection, contrastive, where a caption
   matches every picture that shows what it names (captions leave size/position/background out);
3. movq: VQModel autoencoder, 64 px <-> 4x16x16 latents (used unquantised, as the pipelines do),
   then its decoder alone refined further (the latents, and so every later stage, stay the same);
4. prior: PriorTransformer, CLIP text -> CLIP image embedding (UnCLIPScheduler, predicts the sample);
5. decoder: UNet2DConditionModel on MoVQ latents conditioned on the image embedding (DDPM, v-prediction);
6. inpaint: the decoder UNet widened to 9 input channels, fine-tuned with masks over the shape;
7. polish: the decoder UNet trained further from where stage 5 stopped (a second, gentler cosine);
   inpaint2, beside it: the inpaint UNet further, always conditioned on another picture of the kind;
8. beside: the inpaint UNet further, half its examples two-shape pictures masked over one shape only
   (the classic edit, "add a red circle here" beside what is there, which one-shape pictures never show).

    python -m unclip_lab.train OUT                             # a little over 3 h on two CPU cores
    python -m unclip_lab.train OUT --device cuda --workers 3   # ~9 min on one H100 (measured at 800 CLIP steps)

Each stage saves its components into the output folder when it ends, so an interrupted run resumes
at the first unfinished stage. ``--scale 0.02`` runs every stage for 2% of its steps (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from unclip_batch.models.kandinsky22 import DECODER, INPAINT, PRIOR, latent_keep_mask
from unclip_lab import layout, world
from unclip_lab.card import write_card
from unclip_lab.evaluate import TARGETS
from unclip_lab.layout import OPENAI_CLIP_MEAN as CLIP_MEAN
from unclip_lab.layout import OPENAI_CLIP_STD as CLIP_STD
from unclip_lab.layout import TEXT_LENGTH

logger = logging.getLogger(__name__)

EMBED_DIM = 64  # CLIP projection = prior width = decoder conditioning width


@dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes and learning rates of each stage (AdamW, cosine decay, short warm-up)."""

    seed: int = 0
    dataset: int = 20_000  # world pictures behind the prior, decoder and inpaint stages
    clip_steps: int = 2400  # 800 left CLIP undertrained: shape zero-shot 92%, its best-of reranking a coin toss
    clip_batch: int = 256
    clip_lr: float = 1e-3
    # Weight of CLIP's side losses: each embedding names the attributes (heads thrown away after), and
    # the image encoder's first layer tells shape patches from background. Without them position never
    # reached either embedding (a linear probe: 15% on the image side, chance 11%), not even with position
    # as the image encoder's only target: see clip_side_losses.
    clip_side: float = 1.0
    # VQModel block_out_channels, per level at 64/32/16 px: 32 wide at full size (the costly level), 64
    # below. (32, 32, 32) blurred the corners of small shapes (its reconstructions judged right 81%).
    movq_channels: tuple[int, ...] = (32, 64, 64)
    movq_steps: int = 900
    movq_batch: int = 16
    movq_lr: float = 2e-3
    refine_steps: int = 3000  # MoVQ decoder only, encoder frozen: sharper small shapes, same latents
    refine_batch: int = 16
    refine_lr: float = 5e-4
    prior_steps: int = 3000
    prior_batch: int = 128
    prior_lr: float = 1e-3
    decoder_steps: int = 5000
    decoder_batch: int = 32
    decoder_lr: float = 1e-3
    inpaint_steps: int = 1500
    inpaint_batch: int = 32
    inpaint_lr: float = 5e-4
    polish_steps: int = 2000  # the decoder UNet again, from where it stopped, after the inpaint copy
    polish_lr: float = 3e-4
    # The inpaint UNet again, now always conditioned on another picture of the same kind: the prompt's
    # embedding puts the shape anywhere, the mask says where it must go.
    inpaint2_steps: int = 1500
    inpaint2_lr: float = 3e-4
    # The inpaint UNet again, a share of each batch two-shape pictures (world.pairs) with the mask over
    # one: trained only on one-shape pictures, it left an empty masked area beside a shape blank or drew
    # the other shape's colour there (inpaint beside 85.5% with the CPU-made MoVQ).
    beside_steps: int = 1000
    beside_lr: float = 2e-4
    beside_share: float = 0.5
    beside_pairs: int = 5000  # two-shape pictures encoded beside the dataset
    uncond: float = 0.1  # share of examples trained without their condition (classifier-free guidance)

    def scaled(self, scale: float) -> Recipe:
        values = asdict(self)
        for key in values:
            if key.endswith("_steps"):
                values[key] = max(2, int(values[key] * scale))
        if scale < 1:
            values["dataset"] = max(512, int(self.dataset * scale))
            values["beside_pairs"] = max(64, int(self.beside_pairs * scale))
        return Recipe(**values)


# -- stage 1: tokenizer ---------------------------------------------------------------------------
def learn_merges(words: list[str]) -> list[str]:
    """Classic BPE (Sennrich et al.) over the world's words until every word is one symbol: merge the
    most frequent adjacent pair, ties broken alphabetically, so the result never varies between runs
    (HF tokenizers' trainer breaks ties by hash order)."""
    symbols = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in symbols.values():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(" ".join(best))
        for word, parts in symbols.items():
            i, out = 0, []
            while i < len(parts):
                if tuple(parts[i : i + 2]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            symbols[word] = out


def build_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose merges make every world word one token; any other text still
    tokenizes, byte by byte."""
    tokenizer = layout.tokenizer(folder, learn_merges(world.vocabulary()))
    for word in world.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, f"{word!r} is not one token"
    tokenizer.save_pretrained(folder)
    return tokenizer


# -- shared helpers -------------------------------------------------------------------------------
def clip_pixels(torch, images: np.ndarray, device="cpu"):
    """uint8 NxHxWx3 -> what CLIPImageProcessor hands the image encoder (64 px in, no resize)."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device)
    return (x - mean[:, None, None]) / std[:, None, None]


def movq_pixels(torch, images: np.ndarray, device="cpu"):
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def _optimizer(torch, params, lr: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))
    )
    return opt, sched


def _step(opt, sched, loss, params, clip: float = 1.0):
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()


class _Progress:
    def __init__(self, stage: str, steps: int):
        self.stage, self.steps, self.start, self.loss = stage, steps, time.monotonic(), None

    def __call__(self, i: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        if i % 100 == 0 or i == self.steps - 1:
            logger.info(
                "%s %d/%d loss %.4f (%.0f s)", self.stage, i + 1, self.steps, self.loss, time.monotonic() - self.start
            )

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": round(time.monotonic() - self.start, 1),
            "final_loss": round(float(self.loss), 5),
        }


# -- stage 2: CLIP --------------------------------------------------------------------------------
def clip_models(tokenizer):
    shared = dict(width=EMBED_DIM, projection=EMBED_DIM, intermediate=4 * EMBED_DIM, heads=4, layers=3)
    text = layout.clip_text(tokenizer, **shared)
    vision = layout.clip_vision(image_size=world.SIZE, patch_size=PATCH, **shared)
    return text, vision


PATCH = 8  # CLIP image encoder: 64 px -> 8 x 8 patches
ATTRIBUTES = {
    "colour": list(world.COLOURS),
    "shape": list(world.SHAPES),
    "size": list(world.RADII),
    "position": list(world.POSITIONS),
    "background": list(world.BACKGROUNDS),
}


def sincos_positions(width: int, grid: int) -> np.ndarray:
    """(1 + grid^2) x width: the class token's zeros, then each patch's 2-D sine-cosine code (MAE's
    fixed table: half the channels for the row, half for the column)."""

    def axis(channels: int, pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] / 10_000 ** (np.arange(channels // 2) / (channels / 2))
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([axis(width // 2, rows), axis(width // 2, cols)], axis=1)
    return np.concatenate([np.zeros((1, width)), table])


def foreground_patches(images: np.ndarray, scenes: list[world.Scene]) -> np.ndarray:
    """N x patches bool: which of the image encoder's patches hold any pixel of the shape."""
    background = np.array([world.BACKGROUNDS[s.background] for s in scenes], np.uint8)[:, None, None]
    shape = (images != background).any(axis=-1)
    n, grid = len(images), world.SIZE // PATCH
    return shape.reshape(n, grid, PATCH, grid, PATCH).any(axis=(2, 4)).reshape(n, -1)


def clip_side_losses(torch, heads, text_embeds, vision_out, images, scenes, named, device):
    """Training-only signals that put every attribute into both embeddings. Contrastive loss alone
    left position out of both: to say where the shape is, the image encoder's class token must read the
    positions of the patches that differ from the background, a two-step circuit whose first step earns
    nothing until the second exists (trained with position as its only target, it stayed at chance for
    150 steps at 3 layers and 175 at 6). Here layer 1 learns which patches are shape, each embedding
    learns to name the attributes (the text's only those its caption names), and the patches start from
    a 2-D sine-cosine position code (train_clip): with both, position alone was learnt in 150 steps."""
    f = torch.nn.functional
    image = f.normalize(vision_out.image_embeds, dim=-1) * 10
    words = f.normalize(text_embeds, dim=-1) * 10
    loss = 0
    for key, values in ATTRIBUTES.items():
        labels = torch.tensor([values.index(getattr(s, key)) for s in scenes], device=device)
        loss = loss + f.cross_entropy(heads[f"image_{key}"](image), labels)
        said = torch.tensor([key in n for n in named], device=device)
        if said.any():
            loss = loss + f.cross_entropy(heads[f"text_{key}"](words[said]), labels[said])
    patches = vision_out.hidden_states[1][:, 1:]
    target = torch.from_numpy(foreground_patches(images, scenes)).float().to(device)
    return loss + f.binary_cross_entropy_with_logits(heads["foreground"](patches).squeeze(-1), target)


def matches(named: list[dict], scenes: list[world.Scene]):
    """matches[i, j]: picture j shows everything caption i names."""
    out = np.ones((len(named), len(scenes)), bool)
    for key in ATTRIBUTES:
        values = np.array([getattr(s, key) for s in scenes])
        for i, n in enumerate(named):
            if key in n:
                out[i] &= values == n[key]
    return out


def train_clip(tokenizer, recipe: Recipe, folder: Path, device: str = "cpu") -> dict:
    import torch

    text, vision = clip_models(tokenizer)
    positions = vision.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        positions.copy_(torch.from_numpy(sincos_positions(EMBED_DIM, world.SIZE // PATCH)))
    text, vision = text.to(device), vision.to(device)
    outputs = {f"{side}_{key}": len(values) for key, values in ATTRIBUTES.items() for side in ("image", "text")}
    heads = torch.nn.ModuleDict(
        {name: torch.nn.Linear(EMBED_DIM, n) for name, n in (outputs | {"foreground": 1}).items()}
    ).to(device)  # clip_side_losses' heads, thrown away after training
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = [*text.parameters(), *vision.parameters(), *heads.parameters(), logit_scale]
    opt, sched = _optimizer(torch, params, recipe.clip_lr, recipe.clip_steps)
    progress = _Progress("clip", recipe.clip_steps)
    for i in range(recipe.clip_steps):
        images, captions, scenes, named = world.samples(recipe.clip_batch, seed=recipe.seed * 1_000_003 + i)
        ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids.to(device)
        text_embeds = text(ids).text_embeds
        vision_out = vision(clip_pixels(torch, images, device), output_hidden_states=True)
        t = torch.nn.functional.normalize(text_embeds, dim=-1)
        v = torch.nn.functional.normalize(vision_out.image_embeds, dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * t @ v.T
        target = torch.from_numpy(matches(named, scenes)).float().to(device)
        loss = (_soft_ce(logits, target) + _soft_ce(logits.T, target.T)) / 2
        if recipe.clip_side:
            side = clip_side_losses(torch, heads, text_embeds, vision_out, images, scenes, named, device)
            loss = loss + recipe.clip_side * side
        _step(opt, sched, loss, params)
        progress(i, loss.item())
    text.cpu().save_pretrained(folder / "text_encoder")
    vision.cpu().save_pretrained(folder / "image_encoder")
    layout.image_processor(world.SIZE, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(
        folder / "image_processor"
    )
    return progress.summary()


def _soft_ce(logits, target):
    target = target / target.sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


# -- stage 3: MoVQ --------------------------------------------------------------------------------
def movq_model(recipe: Recipe):
    return layout.movq(widths=recipe.movq_channels, layers_per_block=1, norm_num_groups=32, num_vq_embeddings=256)


def train_movq(recipe: Recipe, folder: Path, device: str = "cpu") -> dict:
    """An autoencoder used unquantised (the pipelines decode with force_not_quantize=True). A light
    pull towards unit-scale latents keeps them in the range the diffusion schedules assume; noise on
    the latents teaches the decoder to forgive the diffusion model's small errors."""
    import torch

    movq = movq_model(recipe).to(device)
    params = list(movq.parameters())
    opt, sched = _optimizer(torch, params, recipe.movq_lr, recipe.movq_steps)
    progress = _Progress("movq", recipe.movq_steps)
    for i in range(recipe.movq_steps):
        images, *_ = world.samples(recipe.movq_batch, seed=recipe.seed * 1_000_003 + 500_000 + i)
        x = movq_pixels(torch, images, device)
        z = movq.encode(x).latents
        scale = (z.pow(2).mean() - 1).pow(2) + z.mean(dim=(0, 2, 3)).pow(2).mean()
        noisy = z + 0.1 * torch.randn_like(z)
        out = movq.decode(noisy, force_not_quantize=True).sample
        loss = (out - x).abs().mean() + (out - x).pow(2).mean() + 0.05 * scale
        _step(opt, sched, loss, params)
        progress(i, loss.item())
    movq.cpu().save_pretrained(folder)
    return progress.summary()


def refine_movq(recipe: Recipe, folder: Path, device: str = "cpu") -> dict:
    """More training for the MoVQ decoder alone: the encoder is frozen, so the latents the prior-side
    stages train on do not move, while small shapes get back the corners that blur had rounded."""
    import torch
    from diffusers import VQModel

    movq = VQModel.from_pretrained(folder).to(device)
    params = [*movq.post_quant_conv.parameters(), *movq.decoder.parameters()]
    opt, sched = _optimizer(torch, params, recipe.refine_lr, recipe.refine_steps)
    progress = _Progress("refine", recipe.refine_steps)
    for i in range(recipe.refine_steps):
        images, *_ = world.samples(recipe.refine_batch, seed=recipe.seed * 1_000_003 + 700_000 + i)
        x = movq_pixels(torch, images, device)
        with torch.no_grad():
            z = movq.encode(x).latents
        out = movq.decode(z + 0.1 * torch.randn_like(z), force_not_quantize=True).sample
        loss = (out - x).abs().mean() + (out - x).pow(2).mean()
        _step(opt, sched, loss, params)
        progress(i, loss.item())
    movq.cpu().save_pretrained(folder)
    return progress.summary()


# -- data for the prior, decoder and inpaint stages -----------------------------------------------
@dataclass
class Data:
    captions: list[str]
    scenes: list[world.Scene]
    embeds: object  # torch tensor N x EMBED_DIM: CLIP image embeddings
    latents: object  # torch tensor N x 4 x 16 x 16: MoVQ latents
    zero_embed: object  # CLIP embedding of the all-zero input: the decoder's unconditional embedding
    # Two-shape pictures (world.pairs) for the beside stage: the shape a mask covers, the one it leaves,
    # and the pictures' MoVQ latents
    pair_scenes: list[world.Scene] = field(default_factory=list)
    pair_others: list[world.Scene] = field(default_factory=list)
    pair_latents: object = None

    def to(self, device) -> Data:
        moved = {"embeds": self.embeds, "latents": self.latents, "zero_embed": self.zero_embed}
        if self.pair_latents is not None:
            moved["pair_latents"] = self.pair_latents
        return replace(self, **{name: value.to(device) for name, value in moved.items()})


def encode_dataset(recipe: Recipe, vision, movq, device: str = "cpu") -> Data:
    import torch

    images, captions, scenes, _ = world.samples(recipe.dataset, seed=recipe.seed * 1_000_003 + 900_000)
    pictures, firsts, seconds = world.pairs(recipe.beside_pairs, seed=recipe.seed * 1_000_003 + 950_000)
    embeds, latents, pair_latents = [], [], []
    vision, movq = vision.to(device), movq.to(device)
    with torch.inference_mode():
        for start in range(0, len(images), 512):
            chunk = images[start : start + 512]
            embeds.append(vision(clip_pixels(torch, chunk, device)).image_embeds.cpu())
            latents.append(movq.encode(movq_pixels(torch, chunk, device)).latents.cpu())
        for start in range(0, len(pictures), 512):
            pair_latents.append(movq.encode(movq_pixels(torch, pictures[start : start + 512], device)).latents.cpu())
        zero = vision(torch.zeros(1, 3, world.SIZE, world.SIZE, device=device)).image_embeds.cpu()
    pair_latents = torch.cat(pair_latents) if pair_latents else torch.zeros(0, *latents[0].shape[1:])
    return Data(captions, scenes, torch.cat(embeds), torch.cat(latents), zero, firsts, seconds, pair_latents)


# -- stage 4: prior -------------------------------------------------------------------------------
def train_prior(tokenizer, text, data: Data, recipe: Recipe, folder: Path, device: str = "cpu") -> dict:
    import torch

    scheduler = layout.prior_scheduler()
    prior = layout.prior(heads=2, head_dim=32, embedding_dim=EMBED_DIM, layers=3)
    prior, text = prior.to(device), text.to(device)
    mean, std = data.embeds.mean(0), data.embeds.std(0)
    prior.clip_mean.data.copy_(mean[None])
    prior.clip_std.data.copy_(std[None])
    target_all = (data.embeds - mean) / std
    alphas = scheduler.alphas_cumprod.to(device)
    params = [p for n, p in prior.named_parameters() if n not in ("clip_mean", "clip_std")]
    opt, sched = _optimizer(torch, params, recipe.prior_lr, recipe.prior_steps)
    progress, rng = _Progress("prior", recipe.prior_steps), np.random.default_rng(recipe.seed + 4)
    for i in range(recipe.prior_steps):
        pick = rng.integers(len(data.captions), size=recipe.prior_batch)
        captions = ["" if rng.random() < recipe.uncond else data.captions[j] for j in pick]
        tokens = tokenizer(
            captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            encoded = text(tokens.input_ids)
        x0 = target_all[pick]
        t = torch.randint(0, 1000, (len(pick),), device=device)
        a = alphas[t][:, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
        pred = prior(
            noisy,
            timestep=t,
            proj_embedding=encoded.text_embeds,
            encoder_hidden_states=encoded.last_hidden_state,
            attention_mask=tokens.attention_mask.bool(),
        ).predicted_image_embedding
        loss = (pred - x0).pow(2).mean()
        _step(opt, sched, loss, params)
        progress(i, loss.item())
    prior.cpu().save_pretrained(folder / "prior")
    scheduler.save_pretrained(folder / "scheduler")
    return progress.summary()


# -- stages 5 and 6: decoder and inpaint UNets ----------------------------------------------------
def unet_model(in_channels: int):
    # 8 outputs = latent + variance, which this model leaves unused (it predicts v, see decoder_scheduler)
    return layout.unet(
        in_channels=in_channels,
        sample_size=world.SIZE // 4,
        embed_dim=EMBED_DIM,
        widths=(32, 64),
        layers_per_block=2,
        cross_attention_dim=128,
        attention_head_dim=32,
        norm_num_groups=32,
    )


def decoder_scheduler():
    # kandinsky-2-2-decoder's settings, except that the UNet predicts v, not the noise: a small UNet
    # that predicts noise is least accurate where an error costs most (at high noise a noise error is
    # magnified ~15x into the image), and its samples drifted to twice the latents' spread (first
    # recipe: colour right in 22% of generations). v stays well-posed at every noise level.
    return layout.decoder_ddpm_scheduler(prediction_type="v_prediction")


def _conditions(torch, data: Data, pick, rng, recipe: Recipe, other: float = 0.0, kinds=None, scenes=None):
    """Image embeddings for the picked pictures; a share ``other`` come from another picture of the same
    colour and shape (``kinds``, from _kind_index) instead (a prompt's embedding rarely agrees with the
    source on position or background). ``scenes``: what the picked pictures show, when not data's own."""
    rows = np.array(pick)
    scenes = scenes or [data.scenes[j] for j in pick]
    if other:
        for n, scene in enumerate(scenes):
            if rng.random() < other:
                rows[n] = rng.choice(kinds[(scene.colour, scene.shape)])
    cond = data.embeds[rows].clone()
    drop = torch.from_numpy(rng.random(len(pick)) < recipe.uncond).to(cond.device)
    cond[drop] = data.zero_embed
    return cond


def _kind_index(data: Data) -> dict:
    """(colour, shape) -> indices of the pictures that show it."""
    kinds: dict = {}
    for j, s in enumerate(data.scenes):
        kinds.setdefault((s.colour, s.shape), []).append(j)
    return kinds


def _masks(scenes: list[world.Scene], rng, others: list[world.Scene] | None = None) -> np.ndarray:
    """Repaint masks (N x 1 x 64 x 64, 1 = repaint): a box over each scene's shape grown 2-20 px, each side
    apart; where ``others`` gives a second shape in the picture, the box stops 2 px short of it."""
    masks = np.zeros((len(scenes), 1, world.SIZE, world.SIZE), np.float32)
    for n, scene in enumerate(scenes):
        x0, y0, x1, y1 = box = scene.box()
        grow = rng.integers(2, 21, size=4)
        x0, y0, x1, y1 = x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]
        if others is not None:
            x0, y0, x1, y1 = _short_of((x0, y0, x1, y1), box, others[n].box(), margin=2)
        masks[n, 0, max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = 1
    return masks


def _short_of(rect, box, other, margin: int):
    """``rect`` (grown from ``box``) cut back on the side facing ``other`` where it would come within ``margin``
    px of it, along the axis that separates the two boxes most."""
    x0, y0, x1, y1 = rect
    if world.gap(rect, other) >= margin:
        return rect
    facing = world.separations(box, other)
    side = max(facing, key=facing.get)
    if side == "right":
        x1 = min(x1, other[0] - margin - 1)
    elif side == "left":
        x0 = max(x0, other[2] + margin + 1)
    elif side == "down":
        y1 = min(y1, other[1] - margin - 1)
    else:
        y0 = max(y0, other[3] + margin + 1)
    return x0, y0, x1, y1


def _pair_examples(torch, data: Data, rng, recipe: Recipe, count: int, kinds: dict):
    """``count`` two-shape examples for the beside stage: latents, conditions (another one-shape picture of
    the masked shape's kind, as a prompt's embedding would be) and masks over that shape alone."""
    pick = rng.integers(len(data.pair_scenes), size=count)
    scenes = [data.pair_scenes[j] for j in pick]
    cond = _conditions(torch, data, pick, rng, recipe, other=1.0, kinds=kinds, scenes=scenes)
    masks = _masks(scenes, rng, others=[data.pair_others[j] for j in pick])
    return data.pair_latents[pick], cond, masks


def train_unet(unet, data: Data, recipe: Recipe, *, inpaint: bool, stage: str = "") -> tuple[object, dict]:
    import torch

    steps, batch, lr = (
        (recipe.inpaint_steps, recipe.inpaint_batch, recipe.inpaint_lr)
        if inpaint
        else (recipe.decoder_steps, recipe.decoder_batch, recipe.decoder_lr)
    )
    if stage == "polish":
        steps, lr = recipe.polish_steps, recipe.polish_lr
    elif stage == "inpaint2":
        steps, lr = recipe.inpaint2_steps, recipe.inpaint2_lr
    elif stage == "beside":
        steps, lr = recipe.beside_steps, recipe.beside_lr
    device = data.latents.device
    unet = unet.to(device)
    alphas = decoder_scheduler().alphas_cumprod.to(device)
    params = list(unet.parameters())
    opt, sched = _optimizer(torch, params, lr, steps)
    stage = stage or ("inpaint" if inpaint else "decoder")
    progress = _Progress(stage, steps)
    seeds = {"decoder": 5, "inpaint": 6, "polish": 7, "inpaint2": 8, "beside": 9}
    rng = np.random.default_rng(recipe.seed + seeds[stage])
    other = {"inpaint": 0.5, "inpaint2": 1.0, "beside": 1.0}.get(stage, 0.0)
    kinds = _kind_index(data) if other else None
    pairs = round(batch * recipe.beside_share) if stage == "beside" else 0
    for i in range(steps):
        pick = rng.integers(len(data.scenes), size=batch - pairs)
        x0 = data.latents[pick]
        cond = _conditions(torch, data, pick, rng, recipe, other=other, kinds=kinds)
        if inpaint:
            masks = _masks([data.scenes[j] for j in pick], rng)
        if pairs:
            more = _pair_examples(torch, data, rng, recipe, pairs, kinds)
            x0, cond = torch.cat([x0, more[0]]), torch.cat([cond, more[1]])
            masks = np.concatenate([masks, more[2]])
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[t][:, None, None, None]
        sample = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if inpaint:  # exactly what Kandinsky22.decode feeds the inpaint UNet
            keep = latent_keep_mask(torch, torch.from_numpy(masks).to(device), x0.shape[-2:])
            sample = torch.cat([sample, x0 * keep, keep], dim=1)
        out = unet(
            sample=sample, timestep=t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": cond}
        ).sample
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = (out[:, :4] - v).pow(2).mean()
        _step(opt, sched, loss, params)
        progress(i, loss.item())
    return unet.cpu(), progress.summary()


def widen_for_inpaint(decoder_unet):
    """The decoder UNet with 5 more input channels (masked source latents + keep mask), zero-initialised,
    so fine-tuning starts from a model that already draws."""
    import torch

    unet = unet_model(in_channels=9)
    state = decoder_unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, torch.zeros(weight.shape[0], 5, *weight.shape[2:])], dim=1)
    unet.load_state_dict(state)
    return unet


# -- orchestration --------------------------------------------------------------------------------
# Stages start as soon as the stages they build on are saved, one process and one thread each while
# others run: on small tensors two single-threaded processes get more from two cores than one process
# with two threads. The trainer is a table of stages (STAGES): what each reads, and how it runs.
@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages whose saved output it reads
    on_dataset: bool  # reads .dataset.pt (the training pictures encoded once)
    run: Callable  # (Context) -> summary dict; saves its own output


@dataclass
class Context:
    out: Path
    recipe: Recipe
    device: str
    tokenizer: object
    data: Data | None  # for stages on the dataset


def _decoder_unet(c: Context, source: str, stage: str, inpaint: bool, pipeline: str, widen: bool = False) -> dict:
    """Train a decoder-side UNet: a new one (source ""), or the one saved under ``source``; save it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(c.out / source / "unet") if source else unet_model(4)
    unet, summary = train_unet(
        widen_for_inpaint(unet) if widen else unet, c.data, c.recipe, inpaint=inpaint, stage=stage
    )
    _save_decoder(c.out / (INPAINT if inpaint else DECODER), unet, pipeline)
    return summary


def _prior(c: Context) -> dict:
    from transformers import CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection.from_pretrained(c.out / PRIOR / "text_encoder").eval()
    summary = train_prior(c.tokenizer, text, c.data, c.recipe, c.out / PRIOR, c.device)
    layout.write_prior_index(c.out / PRIOR)
    return summary


# In the order they start among those ready (the longest first: refine, which nothing waits for, runs
# beside the whole prior/decoder chain). refine also waits for clip: then the dataset, which reads the
# MoVQ's folder, is encoded before refine starts rewriting it.
STAGES = (
    Stage("movq", (), False, lambda c: train_movq(c.recipe, c.out / DECODER / "movq", c.device)),
    Stage("clip", (), False, lambda c: train_clip(c.tokenizer, c.recipe, c.out / PRIOR, c.device)),
    Stage("refine", ("clip", "movq"), False, lambda c: refine_movq(c.recipe, c.out / DECODER / "movq", c.device)),
    Stage("prior", ("clip", "movq"), True, _prior),
    Stage("decoder", ("clip", "movq"), True, lambda c: _decoder_unet(c, "", "decoder", False, "KandinskyV22Pipeline")),
    Stage(
        "inpaint",
        ("decoder",),
        True,
        lambda c: _decoder_unet(c, DECODER, "inpaint", True, "KandinskyV22InpaintPipeline", widen=True),
    ),
    Stage("polish", ("inpaint",), True, lambda c: _decoder_unet(c, DECODER, "polish", False, "KandinskyV22Pipeline")),
    Stage(
        "inpaint2",
        ("inpaint",),
        True,
        lambda c: _decoder_unet(c, INPAINT, "inpaint2", True, "KandinskyV22InpaintPipeline"),
    ),
    Stage(
        "beside",
        ("inpaint2",),
        True,
        lambda c: _decoder_unet(c, INPAINT, "beside", True, "KandinskyV22InpaintPipeline"),
    ),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NEEDS = {stage.name: stage.needs for stage in STAGES}
ON_DATASET = {stage.name for stage in STAGES if stage.on_dataset}


def train(out: Path, recipe: Recipe, workers: int = 2, device: str = "cpu") -> dict:
    """Run the stages not yet saved under ``out``; return what each stage took."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    log_path = out / "training.json"
    wanted = json.loads(json.dumps(asdict(recipe)))  # as training.json holds it (tuples become lists)
    log = json.loads(log_path.read_text()) if log_path.exists() else {"recipe": wanted, "stages": {}}
    if log["recipe"] != wanted:
        raise SystemExit(
            f"{log_path} was trained with another recipe; resume with the same options or use a new folder"
        )
    log.setdefault("devices", {})
    if not (out / PRIOR / "tokenizer" / "vocab.json").exists():  # later stages need the one CLIP learned with
        build_tokenizer(out / PRIOR / "tokenizer")
    pending = [stage.name for stage in STAGES if stage.name not in log["stages"]]
    running: dict = {}
    device_name = _device_name(device)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        while pending or running:
            ready = [name for name in pending if all(need in log["stages"] for need in NEEDS[name])]
            if ON_DATASET & set(ready):
                _save_dataset(out, recipe, device)  # before refine starts rewriting the MoVQ's folder
            while ready and len(running) < workers:
                name = ready.pop(0)
                pending.remove(name)
                threads = max(1, workers // (len(running) + 1 + len(ready)))
                running[pool.submit(run_stage, name, out, recipe, threads, device)] = name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                log["stages"][name] = future.result()
                log["devices"][name] = device_name
                log_path.write_text(json.dumps(log, indent=2) + "\n")
    (out / ".dataset.pt").unlink(missing_ok=True)
    shutil.copytree(out / DECODER / "movq", out / INPAINT / "movq", dirs_exist_ok=True)  # one MoVQ for both
    choose_sampling(out)
    return log


# Chosen by measurement (benchmarks/README.md, quality vs speed): DPM-Solver++ at 20 steps matches DDPM
# at 50 within the evaluation's noise, and guidance 2 beats diffusers' 4 on this model, for the decoder and
# for the prior (generate shape 81.5% at prior guidance 4, 89.0% at 2, by the fill-ratio judge of the time).
# A steered variation re-runs 5 of the prior's 25 steps (0.2); the model card has both sweeps.
SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 20, "prior_guidance_scale": 2.0, "variation_strength": 0.2}


def choose_sampling(out: Path) -> None:
    """Save DPM-Solver++ as the decoders' scheduler (same betas and prediction type as training) and
    the sampling defaults beside the checkpoint (unclip_batch.json, read by kandinsky22.describe)."""
    from diffusers import DPMSolverMultistepScheduler

    for name, pipeline in ((DECODER, "KandinskyV22Pipeline"), (INPAINT, "KandinskyV22InpaintPipeline")):
        DPMSolverMultistepScheduler.from_config(
            decoder_scheduler().config, algorithm_type="dpmsolver++", solver_order=2
        ).save_pretrained(out / name / "scheduler")
        layout.write_decoder_index(out / name, pipeline, scheduler="DPMSolverMultistepScheduler")
    settings = {"defaults": SAMPLING, "vocabulary": world.vocabulary()}  # a closed world: validate names other words
    (out / "unclip_batch.json").write_text(json.dumps(settings, indent=2) + "\n")


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads available)"


def run_stage(name: str, out: Path, recipe: Recipe, threads: int, device: str = "cpu") -> dict:
    """One stage, in a process of its own (see train)."""
    import torch
    from transformers import CLIPTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed + len(name))
    stage = BY_NAME[name]
    tokenizer = CLIPTokenizer.from_pretrained(out / PRIOR / "tokenizer")
    data = torch.load(out / ".dataset.pt", weights_only=False).to(device) if stage.on_dataset else None
    return stage.run(Context(out, recipe, device, tokenizer, data))


def _save_dataset(out: Path, recipe: Recipe, device: str = "cpu") -> None:
    """Encode the training pictures once (CLIP embeddings, MoVQ latents) for the later stages."""
    import torch
    from diffusers import VQModel
    from transformers import CLIPVisionModelWithProjection

    if (out / ".dataset.pt").exists():
        return
    vision = CLIPVisionModelWithProjection.from_pretrained(out / PRIOR / "image_encoder").eval()
    movq = VQModel.from_pretrained(out / DECODER / "movq").eval()
    data = encode_dataset(recipe, vision, movq, device)
    logger.info("dataset: %d pictures, latent std %.3f", len(data.scenes), data.latents.std().item())
    torch.save(data, out / ".dataset.pt")


def _save_decoder(folder: Path, unet, pipeline: str) -> None:
    """The UNet, scheduler and index; the MoVQ is copied in once the refine stage is done."""
    unet.save_pretrained(folder / "unet")
    decoder_scheduler().save_pretrained(folder / "scheduler")
    layout.write_decoder_index(folder, pipeline)


def _parse_changes(changes: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> Recipe fields, each VALUE read as its field's type."""
    fields = asdict(Recipe())
    out = {}
    for change in changes:
        key, _, value = change.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {change}: no Recipe field {key!r}; fields: {', '.join(fields)}")
        default = fields[key]
        out[key] = tuple(int(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder that receives the three checkpoint folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    parser.add_argument("--workers", type=int, default=2, help="stages trained side by side")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is there (same recipe, other RNG)")
    parser.add_argument(
        "--set",
        dest="changes",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one Recipe field, e.g. --set movq_channels=64,64,64 (experiments)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    recipe = replace(Recipe(seed=args.seed), **_parse_changes(args.changes)).scaled(args.scale)
    train(args.output, recipe, workers=args.workers, device=args.device)
    write_card(args.output, TARGETS)


if __name__ == "__main__":
    main()
