"""GPU: Kandinsky 2.2 at real size, our model stage vs the naive diffusers loop, side by side in one run.

    python benchmarks/gpu.py --root /tmp/k22                  # 512 px, bf16, 50 decoder steps
    python benchmarks/gpu.py --root /tmp/k22 --compile default max-autotune   # also compiled (the job's --compile)
    python benchmarks/gpu.py --root /tmp/k22 --batch 32 64 --dtype bfloat16 float16 --channels-last  # precisions
    python benchmarks/gpu.py --root /tmp/k22 --small --device cpu --rows 2 --naive-rows 1 --batch 2   # smoke
    python benchmarks/gpu.py --flops-only                     # FLOPs per image at the real sizes, on any CPU

No hub is reachable, so the checkpoint is Kandinsky 2.2's shape with random weights, built from the
public configs (ViT-bigG/14 CLIP text and image encoders, the 20-layer 1280-wide prior, the 1.2 B
UNet, MoVQ with 8x downsampling), saved with ``save_pretrained`` in the Hub layout: the same classes,
sizes and therefore the same cost per image as the real model.

- naive: what diffusers' docs show: ``KandinskyV22PriorPipeline`` + ``KandinskyV22Pipeline``, one row
  per call, default scheduler (DDPM), PNG saved per image.
- ours: ``UnclipPredictor``, what each of the job's model actors runs (rows grouped by call shape,
  ``--batch`` images per call, one prior call per batch), with PNG encoding and writes in a pool of
  other processes, as the job's write stage runs in other Ray workers beside the model stage. Ray
  itself is not in the loop (its wheel is too large to carry to the lent GPU machines).

Both sides get the same dtype, resolution, steps and guidance. GPU busy fraction is NVML's
utilisation (share of time a kernel was running), sampled every 100 ms over each side's timed part.

MFU (model FLOPs utilisation): FLOPs per image, counted by ``torch.utils.flop_counter`` over one of our
calls (every matrix product and convolution of CLIP, the prior, the UNet steps and MoVQ, divided by the
call's images), times images/s, over the GPU's dense peak for the dtype (``PEAK_TFLOPS``, or
``--peak-tflops``). ``mfu_unet`` counts the decoder UNet's FLOPs alone: how much of the peak the part that
matters most turns into work. The naive loop's MFU uses the same count per image (its calls do the
same work one image at a time).

Runs on our side, each after one warm-up call, in this order: one per ``--batch`` (eager, first dtype); one
per ``--compile`` mode (first batch and dtype, channels_last if asked): the job's own ``--compile``, every
network compiled, its warm-up reported; one per other ``--dtype`` (first batch); one eager with
``--channels-last``.
Prints one JSON line per measurement and a summary line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # unclip_lab, the model lab, lives beside the package

from unclip_batch.config import COMPILE_MODES, DTYPES  # noqa: E402
from unclip_batch.models.kandinsky22 import DECODER, PRIOR  # noqa: E402
from unclip_lab import layout  # noqa: E402

# Dense bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (without sparsity); the first
# name found in the device's name counts. float32 has none here: pass --peak-tflops.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}

PROMPTS = [
    "a red fox in the snow, photograph",
    "an oil painting of a lighthouse at dusk",
    "a bowl of ramen, studio lighting",
    "a robot reading a newspaper in a cafe",
]


def networks(small: bool, tokenizer) -> dict:
    """Each network of Kandinsky 2.2 as a builder of random weights, by its folder (prior side, then decoder
    side): the public configs' sizes, or (``small``) a CPU-sized stand-in with the same structure."""
    embed = 64 if small else 1280
    text = (
        dict(width=64, intermediate=128, heads=2, layers=2)
        if small
        else dict(width=1280, intermediate=5120, heads=20, layers=32)
    )  # bigG
    vision = (
        dict(width=64, intermediate=128, heads=2, layers=2)
        if small
        else dict(width=1664, intermediate=8192, heads=16, layers=48)
    )  # bigG
    prior = (
        dict(heads=2, head_dim=32, layers=2)
        if small
        else dict(heads=32, head_dim=64, layers=20, num_embeddings=77, additional_embeddings=4)
    )
    return {
        (PRIOR, "text_encoder"): lambda: layout.clip_text(tokenizer, projection=embed, hidden_act="gelu", **text),
        (PRIOR, "image_encoder"): lambda: layout.clip_vision(
            image_size=224, patch_size=14, projection=embed, hidden_act="gelu", **vision
        ),
        (PRIOR, "prior"): lambda: layout.prior(embedding_dim=embed, **prior),
        (DECODER, "unet"): lambda: layout.unet(
            in_channels=4,
            sample_size=64,
            embed_dim=embed,
            widths=(32, 64) if small else (384, 768, 1152, 1536),
            layers_per_block=1 if small else 3,
            cross_attention_dim=128 if small else 768,
            attention_head_dim=32 if small else 64,
            norm_num_groups=32,
            addition_embed_type_num_heads=64,
        ),
        (DECODER, "movq"): lambda: layout.movq(
            widths=[32, 32, 32, 32] if small else [128, 256, 256, 512],
            layers_per_block=1 if small else 2,
            norm_num_groups=32,
            num_vq_embeddings=16384,
            scaling_factor=0.18215,
        ),
    }


def build(root: Path, dtype: str, device: str, small: bool) -> None:
    """Random weights in kandinsky-2-2-prior / -decoder's layout and sizes (``small``: a CPU-sized stand-in
    with the same structure, for the smoke test)."""
    import torch

    if (root / "built.json").exists():
        return
    started = time.perf_counter()
    torch.manual_seed(0)
    prior_dir, decoder_dir = root / PRIOR, root / DECODER
    tokenizer = layout.tokenizer(prior_dir / "tokenizer")
    tokenizer.save_pretrained(prior_dir / "tokenizer")
    dt = getattr(torch, dtype)
    with torch.device(device):
        for (component, folder), make in networks(small, tokenizer).items():
            make().to(dt).save_pretrained(root / component / folder)  # one at a time: 5 B parameters in all
    layout.image_processor(224).save_pretrained(prior_dir / "image_processor")
    layout.prior_scheduler().save_pretrained(prior_dir / "scheduler")
    layout.write_prior_index(prior_dir)
    layout.decoder_ddpm_scheduler().save_pretrained(decoder_dir / "scheduler")
    layout.write_decoder_index(decoder_dir, "KandinskyV22Pipeline")
    (root / "built.json").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))


def flops_on_meta(args) -> dict:
    """FLOPs per image of each network at Kandinsky 2.2's sizes, counted by torch.utils.flop_counter on meta
    tensors (shapes only: no weights, no device, seconds on a CPU), composed as the job calls them per
    image: the prior's text encoder on the prompt and the empty negative, the prior and UNet steps with
    guidance (two rows each), MoVQ once, and CLIP's image and text encoders once each for the score."""
    import tempfile

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    latent = args.size // 8
    with tempfile.TemporaryDirectory() as folder, torch.device("meta"):
        made = {name: make() for (_, name), make in networks(args.small, layout.tokenizer(Path(folder))).items()}
        embed = made["prior"].config.embedding_dim
        once = {
            "text_encoder": count(lambda: made["text_encoder"](torch.zeros(1, 77, dtype=torch.long))),
            "image_encoder": count(lambda: made["image_encoder"](torch.randn(1, 3, 224, 224))),
            "prior": count(
                lambda: made["prior"](
                    torch.randn(2, embed),
                    timestep=torch.tensor(1),
                    proj_embedding=torch.randn(2, embed),
                    encoder_hidden_states=torch.randn(2, 77, embed),
                    attention_mask=torch.ones(2, 77, dtype=torch.bool),
                )
            ),
            "unet": count(
                lambda: made["unet"](
                    sample=torch.randn(2, 4, latent, latent),
                    timestep=torch.tensor(1),
                    encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": torch.randn(2, embed)},
                )
            ),
            "movq": count(lambda: made["movq"].decode(torch.randn(1, 4, latent, latent), force_not_quantize=True)),
        }
    per_image = {
        "text_encoder": 3 * once["text_encoder"],  # prompt + negative for the prior, prompt for the score
        "prior": args.prior_steps * once["prior"],
        "unet": args.steps * once["unet"],
        "movq": once["movq"],
        "image_encoder": once["image_encoder"],
    }
    return {
        "tflop_per_image": {k: _figures(v) for k, v in per_image.items()},
        "total": _figures(sum(per_image.values())),
    }


def _figures(tflop: float) -> float:
    return float(f"{tflop:.4g}")  # four significant figures: the stand-in's counts are millions of times smaller


def peak_tflops(device: str, dtype: str) -> float | None:
    if dtype not in ("bfloat16", "float16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device), None)


class Busy:
    """NVML utilisation sampled every 100 ms while the block runs (None without a GPU or NVML)."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return self
        self.thread = threading.Thread(target=self._run, args=(pynvml, handle), daemon=True)
        self.thread.start()
        return self

    def _run(self, pynvml, handle):
        while not self.stop.wait(0.1):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def __exit__(self, *exc):
        self.stop.set()

    @property
    def fraction(self):
        return round(statistics.mean(self.samples) / 100, 3) if self.samples else None


def rows(n: int, size: int, steps: int, prior_steps: int) -> list[dict]:
    """Generate rows as the model stage receives them: a validated Row (every field, defaults included)
    plus the columns the stages before it add."""
    from unclip_batch.manifest import Row
    from unclip_batch.predict import model_input
    from unclip_batch.sampling import DEFAULTS

    out = []
    for i in range(n):
        row = Row(
            row=i,
            id=f"r{i:04d}",
            task="generate",
            prompt=PROMPTS[i % len(PROMPTS)],
            negative_prompt="",
            image="",
            mask="",
            num_images=1,
            seed=i,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=4.0,
            prior_num_inference_steps=prior_steps,
            prior_guidance_scale=4.0,
            variation_strength=DEFAULTS["variation_strength"],  # generate rows do not use it
            best_of=1,
        )
        out.append(model_input(row))
    return out


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive(root: Path, out: Path, n: int, args) -> dict:
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    dt = getattr(torch, args.dtype[0])
    prior = KandinskyV22PriorPipeline.from_pretrained(root / PRIOR, torch_dtype=dt).to(args.device)
    decoder = KandinskyV22Pipeline.from_pretrained(root / DECODER, torch_dtype=dt).to(args.device)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)

    def one(i: int) -> None:
        generator = torch.Generator(args.device).manual_seed(i)
        embeds = prior(PROMPTS[i % len(PROMPTS)], num_inference_steps=args.prior_steps, generator=generator)
        image = decoder(
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            generator=generator,
        ).images[0]
        image.save(out / f"naive-{i}.png")

    one(0)  # warm-up: kernels chosen, memory pooled
    synchronize(args.device)
    with Busy() as busy:
        started = time.perf_counter()
        for i in range(n):
            one(i)
        wall = time.perf_counter() - started
    return {
        "side": "naive",
        "images": n,
        "wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 3),
        "gpu_busy": busy.fraction,
    }


def write(path: Path, pixels: bytes, size: int) -> None:
    Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(size, size, 3)).save(path)


def profile(predictor, batch_rows: list[dict], device: str) -> dict:
    """One more model call under torch.profiler: per phase (prior, decoder loop, MoVQ decode) its wall time
    and the share of it in which a GPU kernel ran; the rest of the call is the predictor's own work."""
    import sys

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, record_function

    from unclip_batch.batches import rows_of, to_batch

    model = predictor.model

    def phased(name, fn):
        def run(*a, **kw):
            with record_function(f"phase:{name}"):
                out = fn(*a, **kw)
                synchronize(device)
            return out

        return run

    model.text_embeds = phased("prior", model.text_embeds)
    model.decode = phased("decoder", model.decode)
    model.decoder.movq.decode = phased("movq", model.decoder.movq.decode)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        with record_function("phase:call"):
            rows_of(predictor(to_batch(batch_rows)))
            synchronize(device)
    events = prof.events()
    # GPU-side events: kernels and copies; not the GPU copies of our phase annotations (they span whole
    # phases) nor the profiler's "Command Buffer Full" markers (the CPU waiting on a full launch queue).
    kernels = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.name.startswith("phase:") and e.name != "Command Buffer Full"
    )

    def busy(start: float, end: float) -> float:  # union of kernel time inside [start, end]
        total, reach = 0.0, start
        for k0, k1 in kernels:
            lo, hi = max(k0, reach), min(k1, end)
            total += max(0.0, hi - lo)
            reach = max(reach, hi)
        return total

    phases = {}
    for e in events:
        if e.name.startswith("phase:") and e.device_type == DeviceType.CPU:
            wall = e.time_range.end - e.time_range.start
            entry = phases.setdefault(e.name[6:], {"wall_ms": 0.0, "kernel_ms": 0.0})
            entry["wall_ms"] += wall / 1e3
            entry["kernel_ms"] += busy(e.time_range.start, e.time_range.end) / 1e3
    for entry in phases.values():
        entry["busy"] = round(entry["kernel_ms"] / max(entry["wall_ms"], 1e-9), 3)
        entry["wall_ms"], entry["kernel_ms"] = round(entry["wall_ms"], 1), round(entry["kernel_ms"], 1)
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if kernels else ()):
        print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr, flush=True)
    return phases


@dataclass(frozen=True)
class Run:
    """One run of our side: images per call, weights' type, channels_last, torch.compile mode (or off)."""

    batch: int
    dtype: str
    channels_last: bool = False
    compile: str = "off"

    @property
    def name(self) -> str:
        extras = [self.dtype] + ["channels_last"] * self.channels_last
        extras += [f"compiled {self.compile}"] if self.compile != "off" else []
        return f"ours x{self.batch} ({', '.join(extras)})"


def plan_runs(args) -> list[Run]:
    """Our runs, those the issue's target rests on first (a lent GPU's command may run out of time)."""
    first, dtype = args.batch[0], args.dtype[0]
    runs = [Run(batch, dtype) for batch in args.batch]
    runs += [Run(first, dtype, args.channels_last, mode) for mode in args.compile]
    runs += [Run(first, other) for other in args.dtype[1:]]
    runs += [Run(first, dtype, channels_last=True)] if args.channels_last else []
    return runs


def count_flops(predictor, batch_rows: list[dict]) -> dict:
    """FLOPs per image of one call, counted by torch.utils.flop_counter (matrix products, convolutions,
    attention), in all and in the decoder UNet alone; eager, after the warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    from unclip_batch.batches import to_batch

    unet = predictor.model.decoder.unet
    counted = {"unet": 0}
    forward = unet.forward

    def counted_forward(*a, **kw):  # the UNet's share: the counter's total before and after each step
        before = counter.get_total_flops()
        out = forward(*a, **kw)
        counted["unet"] += counter.get_total_flops() - before
        return out

    unet.forward = counted_forward
    try:
        with FlopCounterMode(display=False) as counter:
            predictor(to_batch(batch_rows))
    finally:
        del unet.forward  # the class's own again
    images = len(batch_rows)
    total, unet_flops = counter.get_total_flops(), counted["unet"]
    return {"image_tflop": _figures(total / images / 1e12), "unet_tflop": _figures(unet_flops / images / 1e12)}


def mfu(result: dict, flops: dict | None, peak_tflops: float | None) -> dict:
    """MFU of a timed side: its images/s times the FLOPs per image, over the GPU's peak."""
    if not flops or not peak_tflops:
        return {}
    rate = result["images_per_s"]
    return {
        "mfu": round(rate * flops["image_tflop"] / peak_tflops, 3),
        "mfu_unet": round(rate * flops["unet_tflop"] / peak_tflops, 3),
    }


def ours(root: Path, out: Path, n: int, run: Run, args, count: bool = False) -> dict:
    import torch

    from unclip_batch.batches import rows_of, to_batch
    from unclip_batch.predict import UnclipPredictor

    # The job's model stage: --compile compiles in the predictor's model, as in each of the job's actors.
    predictor = UnclipPredictor(
        model=str(root),
        tasks=("generate",),
        batch_size=run.batch,
        device=args.device,
        dtype=run.dtype,
        compile=run.compile,
    )
    model = predictor.model
    if run.channels_last:
        model.decoder.unet.to(memory_format=torch.channels_last)
        model.decoder.movq.to(memory_format=torch.channels_last)
    all_rows = rows(n + run.batch, args.size, args.steps, args.prior_steps)
    # The write stage: PNG encode + write in other processes (Ray workers in the job), beside the model.
    pool = ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn"))

    def submit(row: dict):
        return pool.submit(write, out / f"ours-{row['id']}.png", row["pixels"], args.size)

    warm_started = time.perf_counter()
    warm = rows_of(predictor(to_batch(all_rows[: run.batch])))  # warm-up (and compile)
    for f in [submit(row) for row in warm]:
        f.result()
    synchronize(args.device)
    warm_s = time.perf_counter() - warm_started
    pending = []
    with Busy() as busy:
        started = time.perf_counter()
        for start in range(run.batch, len(all_rows), run.batch):
            pending += [submit(row) for row in rows_of(predictor(to_batch(all_rows[start : start + run.batch])))]
        for f in pending:
            f.result()
        wall = time.perf_counter() - started
    pool.shutdown()
    result = {
        "side": run.name,
        "attention": sorted({type(p).__name__ for p in model.decoder.unet.attn_processors.values()}),
        "images": n,
        "batch": run.batch,
        "wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 3),
        "gpu_busy": busy.fraction,
        "warm_up_s": round(warm_s, 1),
    }
    if run.compile != "off":  # as the job's summary has it: the first call of the shape, compiling included
        result["compile_warm_up_s"] = round(sum(r["warm_up_s"] for r in warm), 1)
    if count:  # an eager run: the counter sees through no compiled code
        result["flops"] = count_flops(predictor, all_rows[: run.batch])
    if args.profile:
        result["profile"] = profile(predictor, all_rows[: run.batch], args.device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root", type=Path, help="where the random checkpoint is built (reused); required but with --flops-only"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["bfloat16"],
        choices=DTYPES[1:],
        help="weights' type: the first for the checkpoint, the naive loop and every run; each other one adds a run",
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--rows", type=int, default=32, help="rows (= images) timed on our side")
    parser.add_argument("--naive-rows", type=int, default=8, help="rows timed in the naive loop")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[16],
        help="images per model call on our side (one run each; compiled runs use the first)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="also time ours with the UNet and MoVQ in channels_last"
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        default=[],
        choices=COMPILE_MODES[1:],
        metavar="MODE",
        help="also time ours compiled, once per mode (the job's --compile: every network; default, "
        "reduce-overhead = CUDA graphs, max-autotune)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense peak for the dtype (default: PEAK_TFLOPS)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each of our runs, one call under torch.profiler: wall and GPU busy per phase",
    )
    parser.add_argument("--small", action="store_true", help="a CPU-sized stand-in checkpoint (smoke runs)")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count each network's FLOPs per image on meta tensors and stop (no checkpoint, no device: a CPU will do)",
    )
    parser.add_argument("--out", type=Path, help="PNG folder (default: ROOT/images)")
    args = parser.parse_args()
    if not args.root and not args.flops_only:
        parser.error("--root is required")
    if args.flops_only:
        print(
            json.dumps({"size": args.size, "steps": args.steps, "prior_steps": args.prior_steps, **flops_on_meta(args)})
        )
        return
    import diffusers
    import torch
    import transformers

    build(args.root, args.dtype[0], args.device, args.small)
    out = args.out or args.root / "images"
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype[0],
        "size": args.size,
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "build": json.loads((args.root / "built.json").read_text()),
    }
    print(json.dumps(info), flush=True)
    results = [naive(args.root, out, args.naive_rows, args)]
    print(json.dumps(results[-1]), flush=True)
    flops = None  # per image, the same at any batch size, dtype or compile mode: counted in the first run
    for run in plan_runs(args):
        try:
            count = flops is None and run.compile == "off"
            results.append(ours(args.root, out, args.rows, run, args, count))
        except Exception as exc:  # a lent GPU's minutes are few: one mode that fails must not lose the others
            results.append({"side": run.name, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
            print(json.dumps(results[-1]), flush=True)
            continue
        flops = flops or results[-1].get("flops")
        results[-1].update(mfu(results[-1], flops, args.peak_tflops or peak_tflops(info["device"], run.dtype)))
        print(json.dumps(results[-1]), flush=True)
    peak = args.peak_tflops or peak_tflops(info["device"], args.dtype[0])
    results[0].update(mfu(results[0], flops, peak))  # the same work per image, one image at a time
    base = results[0]["images_per_s"]
    ratios = {r["side"]: round(r["images_per_s"] / base, 2) for r in results[1:] if "error" not in r}
    print(json.dumps({**info, "peak_tflops": peak, "flops": flops, "ratios": ratios, "results": results}), flush=True)


if __name__ == "__main__":
    main()
