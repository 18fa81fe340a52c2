"""The Ray wiring, and the only library module importing Ray: joining or starting a Ray, placing the model
actors, the tasks before the pipeline (duplicate ids, changed rows), the Ray Data pipeline over shards,
and the shard commits (job.py decides what goes in and what is committed when):

    shards -> read_shard (CPU tasks) -> load_sources (CPU tasks; a job with sources to fetch)
           -> UnclipPredictor (actor pool, GPU) -> write_part (CPU tasks)
           -> a few numbers per block to the driver -> commit_shard (CPU tasks)

One Ray Data row is one model block, packed (``batches.pack``): Ray Data merges a task's outputs into blocks
of up to 128 MiB, which would hand a whole shard to one actor call and hold its images until the last one
is made; a row per model block, split into one Ray block each right after the read, keeps blocks exactly
as ``plan.model_blocks`` cut them (calls full, images written as soon as their block is done).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from unclip_batch import plan, storage, writer
from unclip_batch.batches import pack, rows_of, unpack
from unclip_batch.config import JobConfig
from unclip_batch.errors import Interrupted, JobFailed, SetupError, caused_by, storage_outage
from unclip_batch.manifest import ManifestFile, id_digests, read_rows
from unclip_batch.sources import MAX_PIXELS, SourcePolicy, load_sources

logger = logging.getLogger(__name__)

# Load and write tasks wait on storage part of the time: half a CPU each, so two share a core. A quarter
# (until 2026-12-02) ran twice as many at once, but each is a worker process that imports Ray Data and the
# storage libraries (~1 s of CPU): on 2 cores, 9 such workers instead of 6 cost more CPU than they saved in
# waits (benchmarks/README.md, "Pipeline ceiling, 2026-12-02"). Whole CPUs would starve them on 2 cores.
IO_TASK_CPUS = 0.5


# The read's ask: an I/O slot, and room for a worker with Ray Data loaded and a shard's rows (Ray Data checks a
# task's private memory against its ask, and warns past it: 238 MiB measured on the ceiling benchmark's reads).
# The memory also keeps the read out of the model actor: Ray Data fuses a task map into the actor map after it
# when they ask for the same resources (on 2 CPUs both want half a CPU), and the model would then wait on storage.
READ_TASK = {"num_cpus": IO_TASK_CPUS, "memory": 512 << 20}


# How many reports pass between two clearings of Ray Data's per-block statistics (forget_block_stats).
FORGET_STATS_EVERY = 256


def run(config: JobConfig, shards: list[plan.Shard], work: plan.Work, tasks: tuple[str, ...]):
    """The pipeline's reports as they come: a few numbers per finished block (``write_part``'s), the first
    block of each shard with its read report; close() stops it."""
    dataset = _dataset(config, shards, work, tasks)
    return _reports(dataset, iter(dataset.iter_batches(batch_size=None, batch_format="numpy")))


def _reports(dataset, batches):
    try:
        for count, batch in enumerate(batches, 1):
            if count % FORGET_STATS_EVERY == 0:
                forget_block_stats(dataset)
            yield batch
    finally:
        batches.close()


def forget_block_stats(dataset) -> int:
    """Drop the statistics Ray Data keeps in the driver for every block each operator has output (the
    number dropped). Ray Data holds them until the whole execution ends, for ``Dataset.stats()``, so
    the driver grows with the blocks a job has made, ~7 KB per model block here
    (ray-project/ray#66016, open): 1M rows made 115 MB. The job never asks for ``stats()`` (its progress
    and summary come from its own reports), so it drops them as they come. Private attributes of Ray
    Data 2.60: where they are gone this does nothing, and a test says so."""
    executor = getattr(dataset, "_current_executor", None)
    dropped = 0
    for operator in getattr(executor, "_topology", None) or ():
        kept = getattr(operator, "_output_blocks_stats", None)
        if isinstance(kept, list):
            dropped += len(kept)
            kept.clear()
    return dropped


def ensure_ray(config: JobConfig) -> None:
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        start_ray(config.address)  # before `import ray` here: see start_ray on token auth


def scan_ids(config: JobConfig, files: list[ManifestFile], stores: storage.Stores) -> tuple[dict, tuple[str, ...]]:
    """(duplicate ids, tasks) of the job's rows, in tasks: each file's ids are digested where it is read,
    and one task finds the digests that occur twice, with the job-wide row of the first occurrence (the
    one that runs). The driver gets only the duplicates, and the set of tasks the rows ask for."""
    ensure_ray(config)  # before `import ray` here: see start_ray on token auth

    left, spans = config.limit if config.limit is not None else float("inf"), []
    for file in files:
        rows = int(min(file.rows, max(0, left)))
        if rows:
            spans.append((file, rows))
        left -= rows
    scan = _task(_scan_file, num_returns=2)
    refs = [scan.remote(file, rows, stores, config.storage_retry_s) for file, rows in spans]
    digests, tasks = [r[0] for r in refs], [r[1] for r in refs]
    duplicates = _task(_duplicates).remote(*digests)
    return _get(duplicates), tuple(sorted(set().union(*_get(tasks))))


def _get(refs):
    """ray.get for the checks before compute: storage that stayed away is the outage's one-line message
    (the CLI's exit 3), not a task's traceback."""
    import ray

    try:
        return ray.get(refs)
    except Exception as exc:
        outage = storage_outage(exc)
        if outage is not None:
            raise outage from exc
        raise


def _scan_file(file: ManifestFile, rows: int, stores: storage.Stores, retry_for_s: float = storage.RETRY_FOR_S):
    # Storage may be away for a moment: read again, as every write does, before failing the job.
    table = storage.retrying(
        lambda: read_rows(stores.location(file.manifest), file.path, 0, rows, ["id", "task"]),
        f"reading {file.manifest}",
        retry_for_s,
    )
    tasks = set(table["task"].to_pylist()) if "task" in table.column_names else set()
    tasks = {(t or "generate").strip() for t in tasks} or {"generate"}
    return id_digests(table["id"].combine_chunks()), tasks


def _duplicates(*digests: np.ndarray) -> dict[bytes, int]:
    every = np.concatenate(digests) if digests else np.zeros(0, dtype="<u8,<u8")
    unique, first, counts = np.unique(every, return_index=True, return_counts=True)
    twice = counts > 1
    return {u.tobytes(): int(i) for u, i in zip(unique[twice], first[twice])}


def changed_rows(
    config: JobConfig, output: storage.Location, stores: storage.Stores, shards: list[plan.Shard], duplicates: dict
) -> list:
    """Rows of these shards changed since an earlier run recorded them (a task per shard)."""
    import ray

    dup = ray.put(duplicates)
    check = _task(plan.changed_rows)
    options = {"output": output, "stores": stores, "retry_for_s": config.storage_retry_s}
    refs = [check.remote(s, duplicates=dup, **options) for s in shards]
    return [row for found in _get(refs) for row in found]


def commit(config: JobConfig, work: plan.Work, shard: plan.Shard, parts: list[str], model: str):
    """Start a shard's commit (writer.commit_shard) as a task; its reference, for ``finished``."""
    return _task(writer.commit_shard).remote(
        shard,
        parts,
        output=work.output,
        stores=work.stores,
        format=config.format,
        model=model,
        retry_for_s=config.storage_retry_s,
    )


@functools.cache
def _task(function, num_returns: int = 1):
    """A function as a Ray task on an I/O slot, defined once (each definition is exported to the cluster)."""
    import ray

    return ray.remote(num_cpus=IO_TASK_CPUS, num_returns=num_returns, max_retries=3)(function)


def finished(refs: list, timeout: float = 0) -> list:
    """The references among ``refs`` whose task is done (ray.get them for the result or the error)."""
    import ray

    if not refs:
        return []
    return ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)[0]


def result(ref):
    import ray

    return ray.get(ref)


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
            "python jobs/run_job.py ... (docs/operators.md), or run unclip-batch on a "
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


class Asks(Protocol):
    """What placement reads of a job (JobConfig) or a processor's config."""

    device: str
    workers: int | None
    cpus_per_worker: float | None


def placement(config: Asks, resources: dict) -> Placement:
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


def _dataset(config: JobConfig, shards: list[plan.Shard], work: plan.Work, tasks: tuple[str, ...]):
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.debug import log_once

    from unclip_batch.backpressure import blocks_for, bound_read_ahead

    # Our stages raise typed errors (StorageUnavailable) that the driver acts on: keep their type instead
    # of Ray Data's generic UserCodeException, whose cause does not survive pickling.
    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    context.enable_progress_bars = False  # the job shows one bar of its own (job.Progress), not one per operator
    # Ray Data says once that its bars are off ("to enable, set ..."): the job chose so, not the user.
    log_once("ray_data_progress_manager_disabled")
    _quiet_console(config.verbose)
    resources = ray.cluster_resources()
    place = placement(config, resources)
    # Read no further ahead of the model than keeps it fed: the driver holds every queued block (backpressure.py).
    bound_read_ahead(
        context, read=read_stage.__name__, model=UnclipPredictorOnBlocks.__name__, blocks=blocks_for(place.workers)
    )
    logger.info(
        "Ray: %s; %d model worker(s) on %s",
        resources,
        place.workers,
        "one GPU each" if place.device == "cuda" else f"CPU, {place.threads} threads each",
    )
    policy = SourcePolicy(work.stores, work.max_source_bytes, config.storage_retry_s)
    # One input block per shard: a read task's blocks reach the model as soon as its shard is read.
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Sources are fetched in a stage of their own, so that the model never waits on storage. A job whose rows
    # all generate has none to fetch: its read adds the (empty) source columns itself and hands its blocks to
    # the model directly, a task and a transfer per block fewer (benchmarks/README.md, "Pipeline ceiling,
    # 2026-12-02").
    fetch = any(task != "generate" for task in tasks)
    fn_kwargs = {"work": work, "format": config.format, "sources": not fetch}
    ds = ds.map_batches(read_stage, fn_kwargs=fn_kwargs, batch_size=1, **READ_TASK)
    ds = _a_block_per_row(ds, READ_TASK)
    if fetch:
        # Room to decode the largest source a row may give (RGBA); like the read's, the ask keeps the stage out
        # of the model actor (READ_TASK).
        ds = ds.map_batches(
            _packed(load_sources),
            fn_kwargs={"policy": policy},
            batch_size=None,
            num_cpus=IO_TASK_CPUS,
            memory=4 * MAX_PIXELS,
            batch_format="numpy",
        )
    ds = ds.map_batches(
        UnclipPredictorOnBlocks,
        fn_constructor_kwargs=dict(
            model=config.model,
            tasks=tasks,
            batch_size=config.batch_size,
            device=place.device,
            dtype=config.dtype,
            scheduler=config.scheduler,
            compile=config.compile,
            threads=place.threads,
            stores=work.stores,
            embeddings=config.embeddings,
        ),
        compute=ActorPoolStrategy(size=place.workers),
        batch_size=None,
        batch_format="numpy",  # see model_blocks
        num_gpus=1 if place.device == "cuda" else 0,
        num_cpus=place.worker_cpus,
    )
    return ds.map_batches(
        write_stage,
        fn_kwargs={"output": work.output, "format": config.format, "retry_for_s": config.storage_retry_s},
        batch_size=None,
        num_cpus=IO_TASK_CPUS,
        batch_format="numpy",
    )


def _a_block_per_row(ds, remote_args: dict):
    """Split each block into a block per row (a model block each: module docstring), in the task that made it.

    Ray Data fuses the split into the map before it only when both ask for the same resources, and its split
    asks for a whole CPU, with no public way to ask less: the read had to take a whole CPU too. On 2 cores,
    with the model actor's reservation, a read then left room for one write task beside it, and the writes
    fell behind the model all through the run (benchmarks/README.md, "The read on half a CPU"). So the split
    asks for what the read asks for, through Ray Data 2.60's logical plan; where that is gone, the split keeps
    its whole CPU, slower but the same output, and a test says so."""
    ds = ds.repartition(target_num_rows_per_block=1)
    split = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if isinstance(getattr(split, "ray_remote_args", None), dict):
        split.ray_remote_args.update(remote_args)
    return ds


def read_stage(batch: dict, work: plan.Work, format: str, sources: bool = False) -> dict:
    """Shards in, their model blocks out (a packed row each; an empty one for a shard with nothing to do, so
    the driver still hears of it). Rows that fail validation are stored as a part of their shard here.
    ``sources``: add the blocks' source columns here (a job with none to fetch, see ``_dataset``)."""
    out = {"shard": [], "block": [], "blocks": [], "report": [], "payload": []}
    for text in batch["shard"]:
        shard = plan.Shard(**json.loads(text))
        blocks, errors, report = plan.read_shard(shard, work)
        if errors:
            rows = [{**e, "k": -1, "num_images": 0} for e in errors]
            report["invalid_codes"] = writer.write_part(
                rows,
                shard=shard.name,
                first=shard.first,
                offset=shard.offset,
                block="invalid",
                output=work.output,
                format=format,
                retry_for_s=work.retry_for_s,
            )["codes"]
        policy = SourcePolicy(work.stores, work.max_source_bytes, work.retry_for_s)
        payloads = [pack(load_sources(b.to_pydict(), policy) if sources else b.to_pydict()) for b in blocks]
        payloads = payloads or [pack({})]
        for i, payload in enumerate(payloads):
            out["shard"].append(text)
            out["block"].append(i)
            out["blocks"].append(len(payloads))
            out["report"].append(json.dumps(report) if i == 0 else "")
            out["payload"].append(payload)
    return {k: np.array(v, dtype=object) if k != "block" and k != "blocks" else np.array(v) for k, v in out.items()}


def _packed(stage):
    """A stage on plain batches, run on each packed model block of a Ray batch."""

    def run(batch: dict, **kwargs) -> dict:
        out = dict(batch)
        out["payload"] = _objects([pack(stage(unpack(p), **kwargs)) for p in batch["payload"]])
        return out

    run.__name__ = getattr(stage, "__name__", type(stage).__name__)
    return run


class UnclipPredictorOnBlocks:
    """UnclipPredictor on each packed model block (a Ray batch holds one)."""

    def __init__(self, **kwargs):
        from unclip_batch.predict import UnclipPredictor

        self.run = _packed(UnclipPredictor(**kwargs))

    def __call__(self, batch: dict) -> dict:
        return self.run(batch)


def write_stage(batch: dict, output: storage.Location, format: str, retry_for_s: float = storage.RETRY_FOR_S) -> dict:
    """Each block's images stored and its rows stored as a part; only its numbers go on to the driver."""
    counts = []
    for text, block, payload in zip(batch["shard"], batch["block"], batch["payload"]):
        shard = json.loads(text)
        rows = rows_of(unpack(payload))
        found = writer.write_part(
            rows,
            shard=shard["name"],
            first=shard["first"],
            offset=shard["offset"],
            block=int(block),
            output=output,
            format=format,
            retry_for_s=retry_for_s,
        )
        counts.append(json.dumps({**found, "part": bool(rows)}))
    out = {k: batch[k] for k in ("shard", "block", "blocks", "report")}
    out["counts"] = _objects(counts)
    return out


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


class _ExpectedFailures(logging.Filter):
    """Ray Data logs a failed task's exception, whole traceback and "please open an issue on the Ray
    project" included, before the driver sees it. A failure the job expects and explains (JobFailed, e.g.
    a storage outage) reaches the user once, as its own message; Ray Data's log file keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Data logs from inside its `except` block: the exception is the one being handled.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return record.levelno < logging.ERROR or caused_by(exc, JobFailed) is None


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _quiet_console(verbose: bool) -> None:
    """Filter Ray Data's console handlers (not its log file): expected failures out (_ExpectedFailures), and
    its INFO lines (the execution plan, "Starting execution ...") unless ``verbose``: the job's own progress
    says what a user needs. Ray's log folder keeps every record."""
    for handler in logging.getLogger("ray.data").handlers:
        # Ray's own console handler only: a test runner's capture handler can sit here too, and is not ours to filter.
        ours = type(handler).__module__.startswith("ray.")
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if not (ours and console):
            continue
        handler.filters = [f for f in handler.filters if f is not _warnings_only]
        if not any(isinstance(f, _ExpectedFailures) for f in handler.filters):
            handler.addFilter(_ExpectedFailures())
        if not verbose:
            handler.addFilter(_warnings_only)


# -- curation: curate.py's stages as Ray Data tasks ------------------------------------------------------------


def ensure_ray_for(address: str | None, verbose: bool = False) -> None:
    """A Ray for curation, with Ray Data told as for a job: original exceptions, no bars, a quiet console."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        start_ray(address)
    import ray
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    context.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    _quiet_console(verbose)


def each(stage, items: list[int], plan, **kwargs) -> list[dict]:
    """``stage(plan, item, **kwargs)`` for each item, a Ray Data task each (the stage writes its own file);
    the stages' results. A CurationError in a task is raised here as itself."""
    if not items:
        return []
    import ray

    from unclip_batch.curation import CurationError

    def run(batch: dict) -> dict:
        import resource

        results = []
        for item in batch["item"]:
            result = stage(plan, int(item), **kwargs)
            result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker's; KiB on Linux
            results.append(json.dumps(result))
        return {"result": np.array(results, object)}

    run.__name__ = getattr(stage, "__name__", "stage")
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=len(items))
    ds = ds.map_batches(run, batch_size=1, num_cpus=1, batch_format="numpy")
    try:
        return [json.loads(r["result"]) for r in ds.take_all()]
    except Exception as exc:
        known = caused_by(exc, CurationError)
        if known is not None:
            raise CurationError(str(known)) from None
        raise


@dataclass(frozen=True)
class _EmbedAsks:
    device: str
    workers: int | None = None
    cpus_per_worker: float | None = None


class Embedder:
    """A model actor computing the CLIP image embeddings of a part's images (curate.embed_part)."""

    def __init__(self, plan, model: str, device: str, threads: int | None, stores: storage.Stores):
        from unclip_batch.models import ModelSpec

        self.plan, self.threads = plan, threads
        self.model = ModelSpec.parse(model).load(tasks=("variation",), device=device, stores=stores)

    def __call__(self, batch: dict) -> dict:
        from unclip_batch.curation import embed_part

        torch = sys.modules.get("torch")
        if torch and self.threads:  # in the calling thread: see UnclipPredictor._use_threads
            torch.set_num_threads(self.threads)
        return {
            "result": np.array([json.dumps(embed_part(self.plan, int(i), self.model)) for i in batch["item"]], object)
        }


def embed_parts(plan, items: list[int], model: str, device: str, stores: storage.Stores) -> None:
    """The embeddings an output lacks, computed from its images on model actors placed as a job's are."""
    if not items:
        return
    import ray
    from ray.data import ActorPoolStrategy

    place = placement(_EmbedAsks(device), ray.cluster_resources())
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=len(items))
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(plan=plan, model=model, device=place.device, threads=place.threads, stores=stores),
        compute=ActorPoolStrategy(size=min(place.workers, len(items))),
        batch_size=1,
        batch_format="numpy",
        num_gpus=1 if place.device == "cuda" else 0,
        num_cpus=place.worker_cpus,
    )
    ds.take_all()
