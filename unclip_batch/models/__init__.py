"""Model specs and the registry of model families.

A spec is ``[FAMILY:]LOCATION``: a built-in alias (``default`` = ``shapes``, ``tiny``), a local folder, a Hub
namespace (``kandinsky-community``) or an object-storage URL (``s3://bucket/models/k22``), which each
node copies once into a local cache. Families are looked up by name; each lives in its own module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from unclip_batch.sampling import Sampling
    from unclip_batch.storage import Location, Stores

logger = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ALIASES = {
    # The embedded model, trained here on the shapes world (python -m unclip_lab.train).
    "default": ("kandinsky22", WEIGHTS / "shapes"),
    "shapes": ("kandinsky22", WEIGHTS / "shapes"),
    # Random weights, same layout: fast structural tests.
    "tiny": ("kandinsky22", WEIGHTS / "tiny"),
    "null": ("null", "none"),  # benchmarks only: a model that costs nothing
}
FAMILIES = {"kandinsky22": "unclip_batch.models.kandinsky22", "null": "unclip_batch.models.null"}
DEFAULT_FAMILY = "kandinsky22"
# Only these files are copied from object storage: weights are safetensors, never pickles.
SYNCED_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
_FAMILY_PREFIX = re.compile(r"^([a-z][a-z0-9_]*):(?!//)(.+)$")


@dataclass(frozen=True)
class ModelInfo:
    """What rows may ask of a model, read from its config files without loading weights."""

    family: str
    location: str
    default_size: int
    size_multiple: int
    max_size: int
    defaults: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ("generate", "variation", "inpaint", "interpolate", "text_diff")
    # The words the model knows, for a model trained on a closed world (the embedded shapes model); None
    # for one that reads any text (Kandinsky 2.2's CLIP): then nothing is said about words.
    vocabulary: frozenset[str] | None = None
    # What the model's files hold (weights_fingerprint), recorded by a job so that a resume on other weights
    # is refused; None where the files are not on this machine (a Hub namespace).
    weights: str | None = None


@runtime_checkable
class Model(Protocol):
    """A loaded model: what the predictor calls, one call per group of same-shaped requests. Images are
    uint8 height x width x 3 arrays, masks height x width (1 = repaint); each returns N x H x W x 3 uint8.
    Image i of a call uses ``seeds[i]`` alone, so batching never changes it (see predict.py)."""

    def generate(
        self, prompts: list[str], negative_prompts: list[str], seeds: list[int], s: Sampling
    ) -> np.ndarray: ...

    def variation(self, images: list[np.ndarray], prompts: list[str], seeds: list[int], s: Sampling) -> np.ndarray: ...

    def clip(self, images: np.ndarray, prompts: list[str]) -> tuple[list[float | None], np.ndarray | None]:
        """Per image: the cosine similarity of its CLIP image embedding and its prompt's text embedding, in
        [-1, 1] (None for an empty prompt), and the image embeddings (N x D float32); a model without CLIP
        gives no scores (all None) and no embeddings (None)."""

    def inpaint(
        self,
        images: list[np.ndarray],
        masks: list[np.ndarray],
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        s: Sampling,
    ) -> np.ndarray: ...

    def interpolate(
        self,
        images: list[np.ndarray | None],
        images2: list[np.ndarray | None],
        prompts: list[str],
        prompts2: list[str],
        weights: list[float],
        seeds: list[int],
        s: Sampling,
    ) -> np.ndarray:
        """Image i decoded from the spherical interpolation, at ``weights[i]``, of two ends' CLIP image
        embeddings: each end an image (``images[i]``, or ``images2[i]``) or, where that is None, a prompt
        (through the prior)."""

    def text_diff(
        self,
        images: list[np.ndarray],
        source_prompts: list[str],
        prompts: list[str],
        strengths: list[float],
        seeds: list[int],
        s: Sampling,
    ) -> np.ndarray:
        """Each image's CLIP embedding moved towards the normalised difference of two captions' text
        embeddings (``prompts[i]`` minus ``source_prompts[i]``) by ``strengths[i]``, and decoded; strength 0
        is the image's own variation."""


@runtime_checkable
class Family(Protocol):
    """A model family: a module in FAMILIES with these two functions."""

    def describe(self, location: str) -> ModelInfo:
        """What rows may ask of the model at ``location`` (a local folder or Hub id), from configs alone."""

    def load(
        self, location: str, *, tasks: frozenset[str], device: str, dtype: str, scheduler: str, compile: str
    ) -> Model:
        """The model, loaded for ``tasks`` only (an inpainting UNet costs memory); ``compile``: off, or the
        torch.compile mode its networks are compiled in (a family without them ignores it)."""


@dataclass(frozen=True)
class ModelSpec:
    spec: str  # as the user wrote it: recorded in metadata and compared on resume
    family: str
    location: str  # local folder, Hub namespace, or object-storage URL

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        if spec in ALIASES:
            family, location = ALIASES[spec]
            return cls(spec, family, str(location))
        match = _FAMILY_PREFIX.match(spec)
        family, location = (match.group(1), match.group(2)) if match else (DEFAULT_FAMILY, spec)
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r} in --model {spec!r}; known: {', '.join(FAMILIES)}")
        return cls(spec, family, location)

    def module(self) -> Family:
        return importlib.import_module(FAMILIES[self.family])

    @staticmethod
    def url_of(spec: str) -> str:
        """The location a spec names, for telling which store it is on ("" for one that is not a spec)."""
        try:
            return ModelSpec.parse(spec).location
        except ValueError:
            return ""

    def local_location(self, stores: Stores | None = None) -> str:
        """The location with object-storage URLs replaced by this node's cached copy."""
        from unclip_batch.storage import Stores, local_path

        return local_path(self.location) or sync_to_cache((stores or Stores(None)).location(self.location))

    def describe(self, stores: Stores | None = None) -> ModelInfo:
        local = self.local_location(stores)
        info = self.module().describe(local)
        return dataclasses.replace(info, weights=weights_fingerprint(local) if Path(local).is_dir() else None)

    def load(
        self,
        *,
        tasks=("generate", "variation", "inpaint"),
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "default",
        compile: str = "off",
        stores: Stores | None = None,
    ) -> Model:
        """The one way a model is loaded: by the job's model actors and by the evaluation alike."""
        start = time.perf_counter()
        model = self.module().load(
            self.local_location(stores),
            tasks=frozenset(tasks),
            device=device,
            dtype=dtype,
            scheduler=scheduler,
            compile=compile,
        )
        logger.info("model %s loaded in %.1fs", self.spec, time.perf_counter() - start)
        return model


_HUB_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # a Hub user or organisation name


def describe_model(model: str, stores: Stores | None = None) -> tuple[ModelSpec, ModelInfo]:
    """The spec and what rows may ask of it, or a SetupError saying what is wrong with ``--model``."""
    from unclip_batch.errors import SetupError
    from unclip_batch.storage import local_path

    try:
        spec = ModelSpec.parse(model)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    local = local_path(spec.location)
    path = Path(local or ".").expanduser()
    if local is not None and spec.family != "null" and not path.is_dir():
        known = ", ".join(ALIASES)
        if not _HUB_NAMESPACE.match(spec.location):
            raise SetupError(
                f"model {model!r} not found: not a folder ({path.absolute()} does not exist), not a "
                f"known alias ({known})"
            )
        try:
            return spec, spec.describe(stores)
        except Exception as exc:  # the Hub answers in many exception types; the first line says enough
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                reason = "HF_HUB_OFFLINE is set, and this machine's Hub cache does not have it"
            raise SetupError(
                f"model {model!r} not found: not a folder, not a known alias ({known}), and not "
                f"loadable from the Hugging Face Hub as a namespace ({reason})"
            ) from exc
    try:
        return spec, spec.describe(stores)
    except Exception as exc:
        from unclip_batch.storage import redact

        raise SetupError(f"model {redact(model)!r} could not be read: {type(exc).__name__}: {exc}") from exc


def _cache_root() -> Path:
    return Path(os.environ.get("UNCLIP_BATCH_CACHE", Path.home() / ".cache" / "unclip-batch"))


def sync_to_cache(location: Location) -> str:
    """Copy a checkpoint tree from object storage into a per-node cache, once per version of it; return the
    local folder. The copy is keyed by the URL and by what the store says of each file (size, ETag or
    mtime), so new weights under the same URL are a new copy; a name that would land outside the copy
    (``..``, an absolute key) is refused."""
    from unclip_batch.storage import redact

    cache_root = _cache_root() / "models"
    fs, root = location.fs, location.root
    listing = {path: info for path, info in fs.find(root, detail=True).items() if path.endswith(SYNCED_SUFFIXES)}
    if not listing:
        raise FileNotFoundError(f"no model files (safetensors/json) under {redact(location.url)}")
    names = {path: _confined(location.relative(path)) for path in listing}
    version = sorted(
        (names[p], i.get("size"), str(i.get("ETag") or i.get("mtime") or i.get("LastModified")))
        for p, i in listing.items()
    )
    key = json.dumps([location.url, version], default=str)
    target = cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if target.is_dir():
        return str(target)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".sync-"))
    try:
        for path, name in names.items():
            local = staging / name
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(fs.cat_file(path))
        logger.info("copied %d model files from %s to %s", len(names), redact(location.url), target)
        os.rename(staging, target)  # atomic: a concurrent actor on this node either sees all or nothing
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _confined(name: str) -> str:
    """An object's name below the model's folder, as a relative local path that stays inside the copy."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise ValueError(f"model file {name!r} would be copied outside the model's folder; refusing the model")
    return os.path.join(*parts)


def weights_fingerprint(folder: str) -> str:
    """A digest of every model file under a local folder (names and contents), so that a job can tell the
    weights it started with from others under the same spec. Each file's digest is remembered in the cache
    by its path, size and modification time: a 10 GB checkpoint is read once per machine, not per job."""
    memo_path = _cache_root() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest, changed = hashlib.sha256(), False
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(SYNCED_SUFFIXES)):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            with open(path, "rb") as f:
                memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
            changed = True
        digest.update(f"{path.relative_to(folder).as_posix()}\0{memo[key]}\n".encode())
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            partial = memo_path.with_name(f".{memo_path.name}.{os.getpid()}")
            partial.write_text(json.dumps(memo))
            os.replace(partial, memo_path)
        except OSError:  # a read-only home: computed again next time, nothing else lost
            pass
    return digest.hexdigest()[:16]
