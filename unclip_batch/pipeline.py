"""The Ray wiring, and the only library module importing Ray: joining or starting a Ray, placing the model
actors, and the Ray Data pipeline over validated blocks (job.py decides what goes in and records what
comes out):

    blocks -> load_sources (CPU tasks) -> UnclipPredictor (actor pool, GPU) -> write_images (CPU tasks)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

import pyarrow as pa

from unclip_batch.config import JobConfig
from unclip_batch.errors import Interrupted, JobFailed, SetupError, caused_by
from unclip_batch.sources import load_sources
from unclip_batch.writer import write_images

logger = logging.getLogger(__name__)

IO_TASK_CPUS = 0.25  # load and write tasks mostly wait on storage; on 2 cores whole CPUs would starve them


def run(config: JobConfig, blocks: list, tasks: tuple[str, ...]):
    """The pipeline's output batches (numpy dicts of finished rows) as they come; close() stops it."""
    return iter(_dataset(config, blocks, tasks).iter_batches(batch_size=None, batch_format="numpy"))


def put(config: JobConfig, block: pa.Table):
    """A validated block into Ray's object store as soon as it is made (Ray starts with the first one):
    the driver holds references, not also an Arrow copy of every validated row until the job ends."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        start_ray(config.address)  # before `import ray` here: see start_ray on token auth
    import ray

    return ray.put(block)


def ray_address(address: str | None) -> str | None:
    """The cluster a job joins (``--address``, else $RAY_ADDRESS), or None for a Ray of its own.

    Ray Client (``ray://``) cannot run Ray Data (its executor runs in the driver and needs the object
    store), so it is refused before anything starts, with the two ways that work instead."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        host = address.removeprefix("ray://").rsplit(":", 1)[0]
        raise SetupError(
            f"--address {address}: Ray Client (ray://) does not work with Ray Data. Submit the job "
            f"to the cluster instead: ray job submit --address http://{host}:8265 --working-dir . -- "
            "python jobs/run_job.py ... (see README, 'On a Ray cluster'), or run unclip-batch on a "
            "node of the cluster with --address auto"
        )
    return address


def start_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), or start a Ray for this job alone."""
    address = ray_address(address)
    if not address and "ray" not in sys.modules:
        # Token auth on, as Ray 2.60 turns it on for a new local Ray by default, but said before Ray reads
        # its config (at import): Ray then does not warn every user that it chose it for them. Only when
        # Ray is not imported yet (else its cached config would disagree); an explicit RAY_AUTH_MODE stays.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if address:  # a cluster's settings are its own
        ray.init(address=address, logging_level=logging.WARNING)
        logger.info("joined the Ray cluster at %s", address)
    else:
        # address="local": a new Ray for certain. A bare ray.init() would join a Ray that `ray start` left on
        # this machine (found in Ray's temp folder) and then refuse our settings.
        # No dashboard: its processes start beside the model actor and delay the first image
        # (benchmarks/README.md). `ray start --head` + --address keeps one.
        # Ray keeps only as many idle workers as there are CPUs and kills the rest after a second idle; our
        # I/O tasks take a quarter CPU each, so it kept killing workers and starting new ones, each importing
        # Ray Data and the stage's libraries again. Keep one per I/O task slot (benchmarks/README.md).
        ray.init(
            address="local",
            logging_level=logging.WARNING,
            include_dashboard=False,
            _system_config={"num_workers_soft_limit": int((os.cpu_count() or 1) / IO_TASK_CPUS) + 2},
        )
        logger.info("started a Ray for this job alone (--address auto joins a running cluster instead)")
    if threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM a bare sys.exit(15); make it an interruption the job saves its rows for.
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise Interrupted(signum)


@dataclass(frozen=True)
class Placement:
    """Where the model actors run, from the job's settings and the cluster's resources."""

    device: str  # what each actor computes on: cuda or cpu, never auto (it has what Ray gave it)
    workers: int
    worker_cpus: float
    threads: int | None  # torch threads per actor on CPU (None: torch's own choice, with a GPU)


def placement(config: JobConfig, resources: dict) -> Placement:
    """One actor per GPU with --device auto or cuda when the cluster has GPUs; else CPU actors."""
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda" and gpus == 0:
        raise SetupError("--device cuda, but the Ray cluster has no GPU; use --device auto or cpu")
    use_gpu = config.device != "cpu" and gpus >= 1
    workers = config.workers or (gpus if use_gpu else 1)
    cpus = resources.get("CPU", 1)
    if use_gpu:
        return Placement("cuda", workers, config.cpus_per_worker or 1.0, None)
    # Without a GPU the actors compute on CPUs that the load and write tasks need too: reserve a quarter
    # of the cluster for the model (its torch still gets all of a node's CPUs as threads). Not more: a job
    # stopped by a failure can leave its model actor holding its CPUs for a while, and a rerun in the same
    # process would wait for its I/O tasks (benchmarks/README.md, "Why the code is as it is").
    worker_cpus = config.cpus_per_worker or max(0.25, min(1.0, cpus / (4 * workers)))
    return Placement("cpu", workers, worker_cpus, max(1, int(cpus // workers)))


def _dataset(config: JobConfig, blocks: list, tasks: tuple[str, ...]):
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.debug import log_once

    from unclip_batch.predict import UnclipPredictor

    # Our stages raise typed errors (StorageUnavailable) that the driver acts on: keep their type instead
    # of Ray Data's generic UserCodeException, whose cause does not survive pickling.
    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    context.enable_progress_bars = False  # the job shows one bar of its own (job.Sinks), not one per operator
    # Ray Data says once that its bars are off ("to enable, set ..."): the job chose so, not the user.
    log_once("ray_data_progress_manager_disabled")
    _quiet_expected_failures()
    resources = ray.cluster_resources()
    place = placement(config, resources)
    logger.info(
        "Ray: %s; %d model worker(s) on %s",
        resources,
        place.workers,
        "one GPU each" if place.device == "cuda" else f"CPU, {place.threads} threads each",
    )
    so = config.storage_options
    ds = ray.data.from_arrow_refs(blocks)
    io_kwargs = {"storage_options": so, "retry_for_s": config.storage_retry_s}
    ds = ds.map_batches(load_sources, fn_kwargs=io_kwargs, batch_size=None, num_cpus=IO_TASK_CPUS, batch_format="numpy")
    ds = ds.map_batches(
        UnclipPredictor,
        fn_constructor_kwargs=dict(
            model=config.model,
            tasks=tasks,
            batch_size=config.batch_size,
            device=place.device,
            dtype=config.dtype,
            scheduler=config.scheduler,
            threads=place.threads,
            storage_options=so,
            embeddings=config.embeddings,
        ),
        compute=ActorPoolStrategy(size=place.workers),
        batch_size=None,
        batch_format="numpy",  # see model_blocks
        num_gpus=1 if place.device == "cuda" else 0,
        num_cpus=place.worker_cpus,
    )
    return ds.map_batches(
        write_images,
        fn_kwargs={"output": config.output, **io_kwargs},
        batch_size=None,
        num_cpus=IO_TASK_CPUS,
        batch_format="numpy",
    )


class _ExpectedFailures(logging.Filter):
    """Ray Data logs a failed task's exception, whole traceback and "please open an issue on the Ray
    project" included, before the driver sees it. A failure the job expects and explains (JobFailed, e.g.
    a storage outage) reaches the user once, as its own message; Ray Data's log file keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Data logs from inside its `except` block: the exception is the one being handled.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return record.levelno < logging.ERROR or caused_by(exc, JobFailed) is None


def _quiet_expected_failures() -> None:
    """Filter Ray Data's console handlers (not its log file) with _ExpectedFailures."""
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _ExpectedFailures) for f in handler.filters):
            handler.addFilter(_ExpectedFailures())
