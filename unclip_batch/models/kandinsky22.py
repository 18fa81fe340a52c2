"""Kandinsky 2.2: CLIP + diffusion prior + MoVQ latent decoder, the open model with DALL-E 2's layout.

A location names three checkpoint folders side by side, as the Hub publishes them:
``<location>/kandinsky-2-2-prior``, ``<location>/kandinsky-2-2-decoder`` and
``<location>/kandinsky-2-2-decoder-inpaint`` (``kandinsky-community`` on the Hub, or a local folder).

The prior runs through diffusers' ``KandinskyV22PriorPipeline``. The decoder loop is our own, on the
pipelines' own components: diffusers' inpaint pipeline blends every image of a batch with the first
image's latents and mask (``image[:1]``), so it cannot batch rows with different sources. Everything
else follows ``KandinskyV22Pipeline`` / ``KandinskyV22InpaintPipeline`` step for step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from unclip_batch import sampling
from unclip_batch.models import ModelInfo
from unclip_batch.sampling import Sampling

logger = logging.getLogger(__name__)

FAMILY = "kandinsky22"
PRIOR, DECODER, INPAINT = "kandinsky-2-2-prior", "kandinsky-2-2-decoder", "kandinsky-2-2-decoder-inpaint"
# Kandinsky 2.2 is trained at 512-768 px; past 1024 px it tiles and memory grows quadratically.
MAX_SIZE = 1024
# --scheduler choices for the decoder ("default" keeps the checkpoint's own, DDPM for Kandinsky 2.2).
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
SETTINGS_FILE = "unclip_batch.json"
# Compiled kernels per module: one set per call shape (task, size, guidance, batch). A job seldom has
# more than a few; past this many, a new shape fails its call (a model_error) rather than run eager code.
RECOMPILE_LIMIT = 64
# Modes whose CUDA graphs give each call's outputs the memory of the last call's, and the same without them:
# for the encoders, whose outputs the model keeps past their next call (the zero embedding, each image's
# CLIP embedding until the call's are joined). On a CPU no mode makes CUDA graphs.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def _read_config(location: str, component: str, subfolder: str) -> dict:
    folder = Path(location) / component
    if folder.is_dir():
        return json.loads((folder / subfolder / "config.json").read_text())
    from huggingface_hub import hf_hub_download  # a Hub id: served from the local cache when offline

    return json.loads(Path(hf_hub_download(f"{location}/{component}", "config.json", subfolder=subfolder)).read_text())


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_FOLDERS = {
    PRIOR: ("prior", "text_encoder", "image_encoder"),
    DECODER: ("unet", "movq"),
    INPAINT: ("unet", "movq"),
}


def check_safetensors(location: str) -> None:
    """Refuse a local checkpoint whose weights exist only as pickles: loading a pickle runs its code."""
    for component, folders in WEIGHT_FOLDERS.items():
        for folder in folders:
            path = Path(location) / component / folder
            if not path.is_dir():
                continue
            names = [p.name for p in path.iterdir()]
            if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(PICKLE_SUFFIXES) for n in names):
                raise ValueError(
                    f"{path} has only pickle weights ({', '.join(sorted(names))}); unclip-batch loads "
                    "safetensors only, since a pickle can run code: convert them with save_pretrained("
                    "..., safe_serialization=True)"
                )


def describe(location: str) -> ModelInfo:
    """What a row may ask of this model, from its config files alone (no weights are read)."""
    check_safetensors(location)
    movq = _read_config(location, DECODER, "movq")
    unet = _read_config(location, DECODER, "unet")
    movq_scale = 2 ** (len(movq["block_out_channels"]) - 1)
    # The UNet halves the latent once per level after the first; the pipeline rounds sizes to this multiple.
    multiple = movq_scale * 2 ** (len(unet["block_out_channels"]) - 1)
    sample_size = unet.get("sample_size")
    default_size = sample_size * movq_scale if isinstance(sample_size, int) else 512
    settings = _settings(location)
    return ModelInfo(
        family=FAMILY,
        location=location,
        default_size=default_size,
        size_multiple=multiple,
        max_size=MAX_SIZE,
        defaults={**sampling.DEFAULTS, **settings.get("defaults", {})},
        vocabulary=frozenset(settings["vocabulary"]) if "vocabulary" in settings else None,
    )


def _settings(location: str) -> dict:
    """What a checkpoint says of itself in ``unclip_batch.json`` beside its three folders: sampling
    defaults chosen by measurement (the embedded model's guidance) and, for a model of a closed world, its
    vocabulary. Hub checkpoints have none: diffusers' defaults, any words."""
    path = Path(location) / SETTINGS_FILE
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    unknown = set(settings.get("defaults", {})) - set(sampling.NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown defaults {sorted(unknown)}; known: {', '.join(sampling.NAMES)}")
    return settings


class Kandinsky22:
    """Holds CLIP, the prior and the decoder(s); turns a group of same-shaped requests into pixels."""

    def __init__(
        self,
        location: str,
        *,
        tasks: frozenset[str],
        device: str,
        dtype: str = "float32",
        scheduler: str = "default",
        compile: str = "off",
    ):
        # Before diffusers' pipelines import transformers' image processor (the notice comes then).
        logging.getLogger("transformers.utils.import_utils").addFilter(NO_TORCHVISION_NOTICE)
        import diffusers
        import torch
        import transformers
        from diffusers import KandinskyV22InpaintPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

        # Per-component loading bars from every actor drown Ray's own progress; the job reports progress.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = ("float16" if device == "cuda" else "float32") if dtype == "auto" else dtype
        logger.info("loading %s on %s (%s)", location, device, dtype)
        self.torch, self.device, self.dtype = torch, torch.device(device), getattr(torch, dtype)
        load = dict(use_safetensors=True, dtype=self.dtype)
        self.prior = _local_or_hub(KandinskyV22PriorPipeline, location, PRIOR, load).to(self.device)
        self.decoder = _local_or_hub(KandinskyV22Pipeline, location, DECODER, load).to(self.device)
        self.inpainter = None
        if "inpaint" in tasks:  # a 9-channel UNet is as large as the decoder: load it only when needed
            self.inpainter = _local_or_hub(
                KandinskyV22InpaintPipeline, location, INPAINT, dict(load, movq=self.decoder.movq)
            ).to(self.device)
        for pipe in (self.prior, self.decoder, self.inpainter):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        for pipe in (self.decoder, self.inpainter):
            if pipe is not None and scheduler != "default":
                pipe.scheduler = decoder_scheduler(scheduler, pipe.scheduler.config)
        self.movq_scale = self.decoder.movq_scale_factor
        self._zero_embed = self._emb2emb = None
        if compile != "off":
            compile_modules(torch, self.denoisers(), compile)
            compile_modules(torch, self.encoders(), WITHOUT_CUDA_GRAPHS.get(compile, compile))

    def denoisers(self) -> list:
        """The networks of the denoising loops, the prior and the decoder UNet(s): each step's output is
        used up before the next step."""
        return [self.prior.prior] + [pipe.unet for pipe in (self.decoder, self.inpainter) if pipe is not None]

    def encoders(self) -> list:
        """The other networks, each once: the CLIP text and image encoders, MoVQ's decoder and, for
        inpainting, its encoder (the inpainter shares the decoder's MoVQ)."""
        movq = self.decoder.movq
        return [self.prior.text_encoder, self.prior.image_encoder, movq.decoder] + [movq.encoder] * bool(self.inpainter)

    def modules(self) -> list:
        return self.denoisers() + self.encoders()

    # -- embeddings -------------------------------------------------------------------------------
    def text_embeds(self, prompts, negative_prompts, seeds, s: Sampling):
        """Prior: prompt -> CLIP image embedding, one prior sample per image (seeded per image)."""
        generators = [self._generator(seed) for seed in seeds]
        negative = None
        if any(negative_prompts):
            negative = list(negative_prompts)
            generators += [self._generator(seed) for seed in seeds]
        out = self.prior(
            list(prompts),
            negative_prompt=negative,
            num_inference_steps=s.prior_num_inference_steps,
            guidance_scale=s.prior_guidance_scale,
            generator=generators,
        )
        return out.image_embeds, out.negative_image_embeds

    def image_embeds(self, images: list[np.ndarray]):
        """CLIP image encoder: source pixels -> CLIP image embedding (the variation's condition)."""
        # One image per call: a ViT's token count (patches + 1) is rarely a multiple of the CPU kernels'
        # row blocks, so in a batch an image's embedding would depend on its position (benchmarks/README.md,
        # "Why the code is as it is"). The encoder is cheap.
        pixels = self.prior.image_processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.prior.image_encoder.dtype)
        return self.torch.cat([self.prior.image_encoder(p[None]).image_embeds for p in pixels])

    def clip(self, images: np.ndarray, prompts: list[str]) -> tuple[list[float | None], np.ndarray]:
        """Each image's CLIP image embedding, and its cosine similarity with its prompt's CLIP text embedding
        (the joint space the prior maps across; None without a prompt). Each image and prompt is encoded
        alone, so neither depends on the call's other images (see image_embeds)."""
        torch, texts, scores = self.torch, {}, []
        with torch.inference_mode():
            embeds = self.image_embeds(list(images)).float()
            for image, prompt in zip(embeds, prompts):
                if not prompt:
                    scores.append(None)
                    continue
                if prompt not in texts:
                    texts[prompt] = self.text_embed(prompt)
                scores.append(float(torch.nn.functional.cosine_similarity(image, texts[prompt], dim=0)))
        return scores, embeds.cpu().numpy()

    def text_embed(self, prompt: str):
        """A prompt's CLIP text embedding (float32), in the joint space of the image embeddings; encoded
        alone, padded as the prior pipeline pads its prompts."""
        tokenizer = self.prior.tokenizer
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.prior.text_encoder(ids.to(self.device)).text_embeds[0].float()

    def zero_embeds(self, n: int):
        if self._zero_embed is None:  # the prior pipeline's unconditional embedding: CLIP of a black image
            self._zero_embed = self.prior.get_zero_embed(1, device=self.device)
        return self._zero_embed.repeat(n, 1)

    # -- tasks ------------------------------------------------------------------------------------
    def generate(self, prompts, negative_prompts, seeds, s: Sampling) -> np.ndarray:
        embeds, negative = self.text_embeds(prompts, negative_prompts, seeds, s)
        return self.decode(self.decoder, embeds, negative, seeds, s)

    def variation(self, images, prompts, seeds, s: Sampling) -> np.ndarray:
        embeds = self.image_embeds(images)
        if any(prompts):
            embeds = self.steer(embeds, prompts, seeds, s)
        return self.decode(self.decoder, embeds, self.zero_embeds(len(seeds)), seeds, s)

    def steer(self, embeds, prompts, seeds, s: Sampling):
        """A steered variation's embedding: the source's, noised ``variation_strength`` of the prior's steps
        back and denoised by the prior with the prompt (diffusers' KandinskyV22PriorEmb2EmbPipeline, seeded
        per image). It moves what the prompt names and keeps the rest; mixing in the prompt's own prior
        sample, as ``interpolate()`` does, brought that sample's place and background along too."""
        if int(s.prior_num_inference_steps * s.variation_strength) == 0:  # no step to run: the source's own
            return embeds
        if self._emb2emb is None:
            from diffusers import KandinskyV22PriorEmb2EmbPipeline

            self._emb2emb = KandinskyV22PriorEmb2EmbPipeline(**self.prior.components)
            self._emb2emb.set_progress_bar_config(disable=True)
        return self._emb2emb(
            list(prompts),
            embeds,
            strength=s.variation_strength,
            num_inference_steps=s.prior_num_inference_steps,
            guidance_scale=s.prior_guidance_scale,
            generator=[self._generator(seed) for seed in seeds],
        ).image_embeds

    def interpolate(self, images, images2, prompts, prompts2, weights, seeds, s: Sampling) -> np.ndarray:
        """DALL-E 2's interpolations (section 3.1): the decoder on slerp(end, end2, weight), one noise per seed."""
        with self.torch.inference_mode():
            first, second = self._ends(images, prompts, seeds, s), self._ends(images2, prompts2, seeds, s)
            embeds = self.torch.stack([slerp(self.torch, a, b, w) for a, b, w in zip(first, second, weights)])
        return self.decode(self.decoder, embeds, self.zero_embeds(len(seeds)), seeds, s)

    def _ends(self, images, prompts, seeds, s: Sampling) -> list:
        """One end per image: the CLIP embedding of its image, or where it has none, a prior sample for its
        prompt (the prior on the whole call, seeded per image as for generate: batch-invariant)."""
        text = None
        if any(image is None for image in images):
            asked = [prompt if image is None else "" for image, prompt in zip(images, prompts)]
            text, _ = self.text_embeds(asked, [""] * len(asked), seeds, s)
        given = [image for image in images if image is not None]
        pictures = iter(self.image_embeds(given)) if given else iter(())
        return [text[i] if image is None else next(pictures) for i, image in enumerate(images)]

    def text_diff(self, images, source_prompts, prompts, strengths, seeds, s: Sampling) -> np.ndarray:
        """DALL-E 2's text diffs (section 3.2): each image's embedding turned towards the normalised
        difference of its target and source captions' text embeddings, by ``strength`` (slerp, the image's
        norm kept); strength 0 leaves the embedding as it is: the image's own variation."""
        torch = self.torch
        with torch.inference_mode():
            embeds = self.image_embeds(images)
            moved, diffs = [], {}  # a call's rows mostly share their captions: each pair encoded once
            for z, source, target, strength in zip(embeds, source_prompts, prompts, strengths):
                if strength == 0:
                    moved.append(z)
                    continue
                if (source, target) not in diffs:
                    diffs[source, target] = self.text_embed(target) - self.text_embed(source)
                diff = diffs[source, target]
                if not float(diff.norm()):
                    moved.append(z)
                    continue
                direction = (diff / diff.norm() * z.float().norm()).to(z.dtype)
                moved.append(slerp(torch, z, direction, strength))
        return self.decode(self.decoder, torch.stack(moved), self.zero_embeds(len(seeds)), seeds, s)

    def inpaint(self, images, masks, prompts, negative_prompts, seeds, s: Sampling) -> np.ndarray:
        """Repaint where mask is 1, keep the source elsewhere (pixel-exact: the result is composited)."""
        torch = self.torch
        embeds, negative = self.text_embeds(prompts, negative_prompts, seeds, s)
        source = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1
        repaint = torch.from_numpy(np.stack(masks)).to(self.device, self.dtype)[:, None]
        generated = self.decode(self.inpainter, embeds, negative, seeds, s, source=source, repaint=repaint)
        keep = np.stack(masks)[..., None] == 0
        return np.where(keep, np.stack(images), generated)

    # -- decoder ----------------------------------------------------------------------------------
    def decode(self, pipe, embeds, negative, seeds, s: Sampling, source=None, repaint=None) -> np.ndarray:
        """The KandinskyV22(Inpaint)Pipeline denoising loop, with per-image sources, masks and seeds."""
        torch = self.torch
        from diffusers.utils.torch_utils import randn_tensor

        unet, scheduler, movq = pipe.unet, pipe.scheduler, pipe.movq
        guided = s.guidance_scale > 1.0
        cond = torch.cat([negative, embeds]) if guided else embeds
        cond = cond.to(self.device, unet.dtype)
        channels = movq.config.latent_channels
        shape = (len(seeds), channels, s.height // self.movq_scale, s.width // self.movq_scale)
        generators = [self._generator(seed) for seed in seeds]
        with torch.inference_mode():
            scheduler.set_timesteps(s.num_inference_steps, device=self.device)
            timesteps = scheduler.timesteps
            noise = randn_tensor(shape, generator=generators, device=self.device, dtype=unet.dtype)
            latents = noise * scheduler.init_noise_sigma
            extra = None
            if source is not None:
                source_latents = movq.encode(source)["latents"]
                keep = latent_keep_mask(torch, repaint, source_latents.shape[-2:])
                extra = torch.cat([source_latents * keep, keep], dim=1)
                extra = torch.cat([extra] * 2) if guided else extra
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if guided else latents
                if extra is not None:
                    model_input = torch.cat([model_input, extra], dim=1)
                out = unet(
                    sample=model_input,
                    timestep=t,
                    encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": cond},
                    return_dict=False,
                )[0]
                noise_pred = _guide(
                    torch,
                    out,
                    channels,
                    s.guidance_scale if guided else None,
                    getattr(scheduler.config, "variance_type", None),
                )
                latents = scheduler.step(noise_pred, t, latents, generator=generators)[0]
                if source is not None:  # re-impose the (re-noised) source outside the mask, as diffusers does
                    proper = source_latents
                    if i < len(timesteps) - 1:
                        proper = scheduler.add_noise(source_latents, noise, timesteps[i + 1 : i + 2])
                    latents = keep * proper + (1 - keep) * latents
            if source is not None:
                latents = keep * source_latents + (1 - keep) * latents
            image = movq.decode(latents, force_not_quantize=True)["sample"]
        image = ((image.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).cpu().numpy()

    def _generator(self, seed: int):
        # CPU generators: the same seed gives the same noise on any device, and batching cannot change it.
        return self.torch.Generator("cpu").manual_seed(int(seed))


def compile_modules(torch, modules: list, mode: str) -> None:
    """``torch.compile`` each module in place (the pipelines keep calling it as before) in ``mode``, such
    that a compiled job keeps the contract of an eager one: a row's bytes are the same on a resume and
    whatever it is batched with.

    - Inductor's deterministic mode: autotuning never picks a kernel by timing it, which would make the
      bytes depend on how busy the machine was when it compiled. max-autotune then keeps the library's
      matrix kernels where it would have timed its own templates against them.
    - Static shapes (``dynamic=False``): each call shape gets kernels of its own. With dynamic shapes, the
      second shape an actor saw would be compiled for every size, and a row's bytes would depend on which
      shapes its actor had seen before it.
    - Compiled once per module, call shape and actor, on the first call of that shape: the warm-up the
      job's summary reports. A job has few shapes (task x size x guidance); the recompile limit is raised
      past them so that no shape falls back to eager code (other bytes) unseen."""
    torch._inductor.config.deterministic = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for module in modules:
        module.compile(mode=mode, dynamic=False)


def slerp(torch, a, b, t: float):
    """Spherical interpolation of two embeddings' directions at ``t`` (0: ``a``, 1: ``b``) with their norms
    interpolated linearly; the ends themselves exactly at 0 and 1."""
    if t == 0:
        return a
    if t == 1:
        return b
    a32, b32 = a.float(), b.float()
    norm_a, norm_b = a32.norm(), b32.norm()
    unit_a, unit_b = a32 / norm_a, b32 / norm_b
    angle = torch.arccos((unit_a * unit_b).sum().clamp(-1.0, 1.0))
    if float(angle) < 1e-6:  # the same direction: nothing to turn
        direction = unit_a
    else:
        direction = (torch.sin((1 - t) * angle) * unit_a + torch.sin(t * angle) * unit_b) / torch.sin(angle)
    return (direction * ((1 - t) * norm_a + t * norm_b)).to(a.dtype)


def decoder_scheduler(name: str, config):
    """The decoder's scheduler swapped for another, diffusers' way: the same training schedule (betas,
    steps), another sampler. ``dpm++`` reaches DDPM's quality in far fewer steps."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: default, {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **extra)


def _guide(torch, out, channels: int, guidance_scale: float | None, variance_type: str | None):
    """Classifier-free guidance on the noise half of the UNet's output; keep the learned variance if used."""
    noise_pred, variance = out.split(channels, dim=1)
    if guidance_scale is not None:
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance_scale * (cond - uncond)
        variance = variance.chunk(2)[1]
    if variance_type in ("learned", "learned_range"):
        return torch.cat([noise_pred, variance], dim=1)
    return noise_pred


def latent_keep_mask(torch, repaint, size):
    """Pixel repaint mask -> latent keep mask, growing the repaint area by one latent pixel.

    Same result as diffusers' ``prepare_mask`` (a Python loop over every latent pixel), as one max-pool.
    """
    repaint = torch.nn.functional.interpolate(repaint, tuple(size), mode="nearest")
    repaint = torch.nn.functional.max_pool2d(repaint, kernel_size=3, stride=1, padding=1)
    return 1 - repaint


class _NoTorchvisionNotice(logging.Filter):
    """transformers warns, at the first look-up of CLIPImageProcessor, that without torchvision it falls back to
    the PIL processor: the one we want on every machine (torchvision is not a dependency). Nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


NO_TORCHVISION_NOTICE = _NoTorchvisionNotice()  # one instance: addFilter adds it once however many loads


def _local_or_hub(cls, location: str, component: str, kwargs: dict):
    folder = Path(location) / component
    ref = str(folder) if folder.is_dir() else f"{location}/{component}"
    logger.info("loading %s from %s", cls.__name__, ref)
    return cls.from_pretrained(ref, **kwargs)


def load(
    location: str, *, tasks: frozenset[str], device: str, dtype: str, scheduler: str = "default", compile: str = "off"
) -> Kandinsky22:
    return Kandinsky22(location, tasks=tasks, device=device, dtype=dtype, scheduler=scheduler, compile=compile)
