"""The job's configuration: one frozen dataclass, built by the CLI (or by ``jobs/``) in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from unclip_batch import sampling, storage
from unclip_batch.errors import ConfigError
from unclip_batch.sources import MAX_SOURCE_BYTES

# Decoder samplers a job may ask for: the checkpoint's own, or one the model family swaps in.
SCHEDULERS = ("default", "ddpm", "ddim", "dpm++")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# torch.compile's modes. On a GPU, reduce-overhead and max-autotune add CUDA graphs (to the denoisers alone:
# kandinsky22.WITHOUT_CUDA_GRAPHS); a CPU has none.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
FORMATS = ("files", "webdataset", "parquet")  # writer.FORMATS: kept here so the CLI imports no writer


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """What a model actor needs: the options the job (JobConfig) and the Python processor
    (api.ProcessorConfig) share, declared and checked once."""

    model: str = "default"  # model spec: alias, local folder, Hub namespace or object-storage URL
    # Images per model call, a power of two. Calls are padded to exactly this size, so an image's bytes
    # never depend on what it was batched with (see predict.py).
    batch_size: int = 16
    defaults: dict = field(default_factory=dict)  # sampling settings for rows that leave them empty
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    scheduler: str = "default"  # decoder sampler: the checkpoint's own, or ddpm | ddim | dpm++
    # torch.compile the model's networks in each actor (off | a torch.compile mode): kernels built once per
    # call shape, the first call of each shape paying for it (the summary's warm_up).
    compile: str = "off"
    embeddings: bool = False  # keep each image's CLIP image embedding (metadata column `embedding`)
    # fsspec options for the job's own stores (output, manifests, model): endpoint, region, keys. Never in a
    # repr, and never sent to a store a manifest row names (storage.Stores).
    storage_options: dict = field(default_factory=dict, repr=False)
    max_source_bytes: int = MAX_SOURCE_BYTES  # a source image or mask larger than this is its row's error

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_size & (self.batch_size - 1):
            raise ConfigError(
                f"batch_size must be a power of two (1, 2, 4, 8, 16 ...), not {self.batch_size}: "
                "model calls are padded to exactly that many images, which keeps every image's "
                "bytes independent of what it is batched with"
            )
        unknown = set(self.defaults) - set(sampling.NAMES)
        if unknown:
            raise ConfigError(f"unknown default(s): {', '.join(sorted(unknown))}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}")
        if self.max_source_bytes < 1:
            raise ConfigError("max_source_bytes must be at least 1")


@dataclass(frozen=True, kw_only=True)
class JobConfig(ModelOptions):
    manifests: tuple[str, ...]  # Parquet files or folders, any fsspec URL
    output: str  # folder URL that receives images/, metadata/, errors/, _SUCCESS
    address: str | None = None  # Ray address; None starts a local Ray instance
    workers: int | None = None  # model actors; None = one per GPU, or 1 without a GPU
    cpus_per_worker: float | None = None  # None = 1 with a GPU, else a fraction (see pipeline.py)
    overwrite: bool = False  # delete earlier results under output first (default: resume)
    limit: int | None = None  # run only the first N manifest rows
    retry_errors: bool = False  # redo rows that earlier runs recorded as errors (default: skip them)
    redo_changed: bool = False  # redo rows changed under the same id since recorded (default: refuse the job)
    format: str = "files"  # files (a PNG per image) | webdataset (tar shards) | parquet (image bytes in Parquet)
    # Manifest rows per shard: one input shard (read and validated by one task) becomes one output shard
    # (written whole). img2dataset uses 10,000 for downloads; generating is far slower per row, and a
    # shard is also what a crash loses, so fewer.
    rows_per_shard: int = 1000
    progress_bar: bool | None = None  # None: a progress bar when stderr is a terminal; else log lines only
    verbose: bool = False  # Ray's and Ray Data's own INFO lines on the console too (always in Ray's log folder)
    flush_every_s: float = 30.0  # how often unfinished shards are committed: the most work a killed driver loses
    storage_retry_s: float = storage.RETRY_FOR_S  # how long object-storage failures are retried before the job stops

    def __post_init__(self):
        if not self.manifests:
            raise ConfigError("at least one manifest is needed")
        if not self.output:
            raise ConfigError("--output is required")
        super().__post_init__()
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be positive")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("limit must not be negative")
        if self.flush_every_s <= 0 or self.storage_retry_s < 0:
            raise ConfigError("flush_every_s must be positive and storage_retry_s not negative")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}")
        if self.rows_per_shard < 1:
            raise ConfigError("rows_per_shard must be at least 1")


def default(name: str):
    """A JobConfig field's default: the CLI, run() and the processor show and use these, never copies."""
    return JobConfig.__dataclass_fields__[name].default
