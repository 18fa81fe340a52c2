"""The job: plain-Python stages wired into one Ray Data pipeline. The only library module importing Ray.

    manifest -> plan/resume -> validate (driver)
      -> load_sources (CPU tasks) -> UnclipPredictor (actor pool, GPU) -> write_images (CPU tasks)
      -> driver: metadata/ and errors/ shards, then _SUCCESS
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from unclip_batch import __version__, plan, storage
from unclip_batch.batches import NO_ERROR, rows_of
from unclip_batch.config import JobConfig
from unclip_batch.errors import Interrupted, JobFailed, SetupError, StorageUnavailable
from unclip_batch.manifest import (MANIFEST, MANIFEST_ROW, ROW_FIELDS, SizeRule, extra_columns,
                                   read_manifests, validate)
from unclip_batch.models import ModelSpec, describe_model
from unclip_batch.sources import load_sources
from unclip_batch.writer import (ERROR_SCHEMA, METADATA_SCHEMA, ShardWriter, metadata_record, write_images,
                                 write_json)

logger = logging.getLogger(__name__)

IO_TASK_CPUS = 0.25  # load and write tasks mostly wait on storage; on 2 cores whole CPUs would starve them
PROGRESS_EVERY_S = 10.0
VERSIONED = ("ray", "torch", "diffusers", "transformers")  # recorded in the summary


def run_job(config: JobConfig) -> dict:
    """Run a job to completion (or resume it); return the summary also written to ``_SUCCESS``."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    so = config.storage_options
    # 1. Model config (no weights) and manifests: every whole-job problem surfaces here.
    ray_address(config.address)  # a Ray Client address is refused before anything else
    spec, info = describe_model(config.model, so)
    defaults = {**info.defaults, **config.defaults}
    size = SizeRule.of(info)
    table = read_manifests(config.manifests, so, config.limit)
    # 2. Output: refuse to mix jobs; writing the job record proves the output is writable.
    # The batch size is part of it: model calls have exactly batch_size images, and the call shape
    # decides the last bits of every pixel (see predict.py).
    record = {"model": spec.spec, "defaults": defaults, "batch_size": config.batch_size,
              "scheduler": config.scheduler, "unclip_batch": __version__}
    settings = [spec.spec, defaults, config.batch_size]
    if config.scheduler != "default":  # jobs from before the option keep their fingerprint
        settings.append(config.scheduler)
    settings = json.dumps(settings, sort_keys=True)
    record["fingerprint"] = hashlib.sha256(settings.encode()).hexdigest()[:16]
    try:
        if config.overwrite:
            plan.clear_output(config.output, so)
        resuming = plan.check_job_record(config.output, record, so)
        write_json(config.output, plan.JOB_RECORD, record, so)
        fs, root = storage.filesystem(config.output, so)
        storage.clear_partial(fs, root)
        if fs.exists(storage.join(root, plan.SUCCESS)):  # an earlier run's summary; this run writes its own
            fs.rm(storage.join(root, plan.SUCCESS))
    except SetupError:
        raise
    except PermissionError as exc:
        raise SetupError(f"cannot write to output {config.output}: access denied ({exc}); the credentials "
                         "need write access there (nothing was computed)") from exc
    except Exception as exc:
        raise SetupError(f"cannot write to output {config.output}: {type(exc).__name__}: {exc}") from exc
    # 3. What is left to do.
    if resuming and config.retry_errors:
        plan.discard_errors(config.output, so)
    done = plan.load_done(config.output, so) if resuming else plan.Done.nothing()
    changed = plan.changed_rows(table, done)
    if changed.num_rows:
        first = ", ".join(changed["id"].to_pylist()[:5])
        if not config.redo_changed:
            raise SetupError(f"{changed.num_rows} manifest rows changed since an earlier run recorded them under "
                             f"the same id (first: {first}); their old results would be kept. Rerun with "
                             "--redo-changed to redo them, or use a new --output (nothing was computed)")
        logger.warning("%d rows changed since they were recorded (first: %s): redoing them", changed.num_rows, first)
        plan.forget(config.output, changed, so)
        done = plan.load_done(config.output, so)
    todo = plan.pending(table, done)
    skipped_errors = plan.skipped_errors(table, done)
    if skipped_errors:
        logger.info("%d rows recorded as errors by earlier runs are skipped (--retry-errors redoes them)",
                    skipped_errors)
    logger.info("%d manifest rows, %d done earlier, %d to do", table.num_rows, table.num_rows - todo.num_rows,
                todo.num_rows)
    # 4. Validate in the driver; invalid rows are recorded at once, valid ones become Ray blocks.
    lookup = table.select([MANIFEST, MANIFEST_ROW] + extra_columns(table))
    sinks = _Sinks(config, lookup, spec.spec, total=todo.num_rows)
    batches = None
    try:
        # One block is one model batch: a Ray Data task hands its outputs on as one block, so an actor given
        # a bigger block would hold every image of it until the last one is made. Small blocks are written
        # as they are made (first images sooner; a crash loses only the batches in flight).
        blocks, tasks = [], set()
        for rows, errors in validate(todo, defaults, size):
            sinks.errors(errors)
            for block in plan.model_blocks(rows, config.batch_size):
                tasks.update(row.task for row in block)
                blocks.append(_put(config, _rows_table(block)))  # the driver keeps a reference, not the rows
        # 5. Run the pipeline.
        if blocks:
            batches = iter(_dataset(config, blocks, tuple(sorted(tasks))).iter_batches(batch_size=None,
                                                                                        batch_format="numpy"))
            for batch in batches:
                sinks.add(rows_of(batch))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted): keep the finished rows, then stop
        _save_what_finished(sinks)
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), saved=sinks.done) from None
    except Exception as exc:
        _save_what_finished(sinks)
        if isinstance(exc, SetupError):  # found once Ray told what the cluster has (e.g. no GPU)
            raise
        outage = _caused_by(exc, StorageUnavailable)
        if outage is not None:
            raise StorageUnavailable(str(outage)) from exc
        raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if batches is not None:
            batches.close()  # stop the execution now, not when the iterator is garbage-collected
    sinks.close()
    # 6. The summary, written last: its presence means every row is accounted for.
    summary = _summary(config, spec, table.num_rows, done, sinks, started, time.perf_counter() - clock)
    summary["rows"].update(skipped_errors=skipped_errors, changed_redone=changed.num_rows)
    write_json(config.output, plan.SUCCESS, summary, so)
    storage.clear_partial(*storage.filesystem(config.output, so))  # the empty staging folder
    return summary


def _save_what_finished(sinks: "_Sinks") -> None:
    """Keep every finished row of a stopped run: the rerun resumes after them."""
    try:
        sinks.close(finished=False)
    except Exception as exc:  # storage may be what failed; the rows are redone on resume
        logger.warning("could not save the last finished rows: %s", exc)


class _ExpectedFailures(logging.Filter):
    """Ray Data logs a failed task's exception, whole traceback and "please open an issue on the Ray
    project" included, before the driver sees it. A failure the job expects and explains (JobFailed, e.g.
    a storage outage) reaches the user once, as its own message; Ray Data's log file keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Data logs from inside its `except` block: the exception is the one being handled.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return record.levelno < logging.ERROR or _caused_by(exc, JobFailed) is None


def _quiet_expected_failures() -> None:
    """Filter Ray Data's console handlers (not its log file) with _ExpectedFailures."""
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(
                isinstance(f, _ExpectedFailures) for f in handler.filters):
            handler.addFilter(_ExpectedFailures())


def _caused_by(exc: BaseException, kind: type) -> BaseException | None:
    """The innermost exception of ``kind`` in a chain. Ray wraps a task's error in a RayTaskError that is
    also an instance of the error's class, whose message is the whole remote traceback: the innermost
    one is the error as our code raised it."""
    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            found = exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found


def _rows_table(rows) -> pa.Table:
    return pa.table({f: [getattr(r, f) for r in rows] for f in ROW_FIELDS}).append_column(
        "code", pa.array([NO_ERROR] * len(rows), pa.string())).append_column(
        "message", pa.array([""] * len(rows), pa.string())).append_column(
        "stage", pa.array([""] * len(rows), pa.string()))


def _put(config: JobConfig, block: pa.Table):
    """A validated block into Ray's object store as soon as it is made (Ray starts with the first one):
    the driver holds references, not also an Arrow copy of every validated row until the job ends."""
    import ray

    if not ray.is_initialized():
        start_ray(config.address)
    return ray.put(block)


def ray_address(address: str | None) -> str | None:
    """The cluster a job joins (``--address``, else $RAY_ADDRESS), or None for a Ray of its own.

    Ray Client (``ray://``) cannot run Ray Data (its executor runs in the driver and needs the object
    store), so it is refused before anything starts, with the two ways that work instead."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        host = address.removeprefix("ray://").rsplit(":", 1)[0]
        raise SetupError(f"--address {address}: Ray Client (ray://) does not work with Ray Data. Submit the job "
                         f"to the cluster instead: ray job submit --address http://{host}:8265 --working-dir . -- "
                         "python jobs/run_job.py ... (see README, 'On a Ray cluster'), or run unclip-batch on a "
                         "node of the cluster with --address auto")
    return address


def start_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), or start a Ray for this job alone."""
    import ray

    address = ray_address(address)
    if address:  # a cluster's settings are its own
        ray.init(address=address, logging_level=logging.WARNING)
        logger.info("joined the Ray cluster at %s", address)
    else:
        # address="local": a new Ray for certain. A bare ray.init() would join a Ray that `ray start` left on
        # this machine (found in Ray's temp folder) and then refuse our settings.
        # No dashboard: its processes start beside the model actor, ~1.5 s of a 10-row job's first image on
        # 2 cores, measured side by side (benchmarks/README.md). `ray start --head` + --address keeps one.
        # Ray keeps only as many idle workers as there are CPUs and kills the rest after a second idle; our
        # I/O tasks take a quarter CPU each, so it kept killing workers and starting new ones, each importing
        # Ray Data, pandas and the stage's libraries again (18 worker processes in a 10,000-row job on 2
        # cores). Keep one per I/O task slot: 10,000 rows to S3 212 -> 256 images/s, side by side.
        ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False,
                 _system_config={"num_workers_soft_limit": int((os.cpu_count() or 1) / IO_TASK_CPUS) + 2})
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
    # stopped by a failure can leave its model actor holding its CPUs for a while (seen in our tests:
    # a rerun in the same process, on 2 CPUs with two 1-CPU actors, waited forever for its I/O tasks).
    worker_cpus = config.cpus_per_worker or max(0.25, min(1.0, cpus / (4 * workers)))
    return Placement("cpu", workers, worker_cpus, max(1, int(cpus // workers)))


def _dataset(config: JobConfig, blocks: list, tasks: tuple[str, ...]):
    import ray
    from ray.data import ActorPoolStrategy

    from unclip_batch.predict import UnclipPredictor

    # Our stages raise typed errors (StorageUnavailable) that the driver acts on: keep their type instead
    # of Ray Data's generic UserCodeException, whose cause does not survive pickling.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    _quiet_expected_failures()
    resources = ray.cluster_resources()
    place = placement(config, resources)
    logger.info("Ray: %s; %d model worker(s) on %s", resources, place.workers,
                "one GPU each" if place.device == "cuda" else f"CPU, {place.threads} threads each")
    so = config.storage_options
    ds = ray.data.from_arrow_refs(blocks)
    io_kwargs = {"storage_options": so, "retry_for_s": config.storage_retry_s}
    ds = ds.map_batches(load_sources, fn_kwargs=io_kwargs, batch_size=None, num_cpus=IO_TASK_CPUS,
                        batch_format="numpy")
    ds = ds.map_batches(
        UnclipPredictor,
        fn_constructor_kwargs=dict(model=config.model, tasks=tasks, batch_size=config.batch_size, device=place.device,
                                   dtype=config.dtype, scheduler=config.scheduler, threads=place.threads,
                                   storage_options=so),
        compute=ActorPoolStrategy(size=place.workers), batch_size=None, batch_format="numpy",  # see model_blocks
        num_gpus=1 if place.device == "cuda" else 0, num_cpus=place.worker_cpus,
    )
    return ds.map_batches(write_images, fn_kwargs={"output": config.output, **io_kwargs}, batch_size=None,
                          num_cpus=IO_TASK_CPUS, batch_format="numpy")


def _duration(seconds: float) -> str:
    """1h05m, 3m20s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class _Sinks:
    """Turns finished image rows into metadata and failed rows into errors, each row exactly once."""

    def __init__(self, config: JobConfig, lookup: pa.Table, model: str, total: int):
        self.model, self.total = model, total
        shards = dict(output=config.output, lookup=lookup, storage_options=config.storage_options,
                      flush_every_s=config.flush_every_s, retry_for_s=config.storage_retry_s)
        self.metadata = ShardWriter(folder="metadata", schema=METADATA_SCHEMA, **shards)
        self.failed = ShardWriter(folder="errors", schema=ERROR_SCHEMA, **shards)
        self.partial: dict[str, list[dict]] = {}  # images of rows not yet complete
        # Rows already recorded: a block that Ray re-delivers after a retry must not record a row twice.
        self.recorded: set[str] = set()
        self.succeeded = self.images = 0
        self.codes: Counter = Counter()
        self.clock = self.last_report = time.perf_counter()
        self.last_counts = None

    @property
    def done(self) -> int:
        """Rows this run recorded, as output or as error."""
        return self.succeeded + sum(self.codes.values())

    def errors(self, records: list[dict]) -> None:
        self.codes.update(r["code"] for r in records)
        self.failed.add(records)

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            if row["id"] in self.recorded:
                continue
            if row["code"]:
                self.partial.pop(row["id"], None)
                self.recorded.add(row["id"])
                self.errors([{k: row[k] for k in ("id", "task", "stage", "code", "message", "row", "input_hash")}])
                continue
            images = self.partial.setdefault(row["id"], {})
            images[int(row["k"])] = row  # keyed by k: a re-delivered image replaces, never adds
            if len(images) == int(row["num_images"]):
                del self.partial[row["id"]]
                self.recorded.add(row["id"])
                images = list(images.values())
                self.metadata.add([metadata_record(r, self.model) for r in sorted(images, key=lambda r: r["k"])])
                self.succeeded += 1
                self.images += len(images)
        self._report()

    def _report(self, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            failed = sum(self.codes.values())
            counts = (self.succeeded, failed, self.images)
            if counts != self.last_counts:  # the final report repeats nothing already said
                done, elapsed = self.succeeded + failed, max(now - self.clock, 1e-9)
                left = self.total - done
                eta = f", about {_duration(left * elapsed / done)} left" if done and left else ""
                logger.info("progress: %d/%d rows done (%d failed), %d images, %.2f images/s%s", done, self.total,
                            failed, self.images, self.images / elapsed, eta)
                self.last_counts = counts

    def close(self, finished: bool = True) -> None:
        """Flush the shards. After a finished run, a row still missing images (a stage dropped some:
        a bug) is recorded rather than lost; after a failed run it is simply redone on resume."""
        for row_id, images in self.partial.items() if finished else ():
            first = next(iter(images.values()))
            self.errors([{"id": row_id, "task": first["task"], "stage": "write", "code": "write_failed",
                          "message": f"only {len(images)} of {first['num_images']} images arrived",
                          "row": first["row"], "input_hash": first["input_hash"]}])
        self.metadata.flush()
        self.failed.flush()
        self._report(final=True)


def _summary(config: JobConfig, spec: ModelSpec, manifest_rows: int, done: plan.Done, sinks: _Sinks,
             started: dt.datetime, wall_s: float) -> dict:
    from importlib.metadata import version  # not `import torch`: that alone takes seconds in the driver

    failed = sum(sinks.codes.values())
    return {
        "status": "complete",
        "output": config.output,
        "manifests": list(config.manifests),
        "model": spec.spec,
        "rows": {
            "manifest": manifest_rows,
            "done_before": manifest_rows - sinks.total,
            "succeeded": sinks.succeeded,
            "failed": failed,
            "total_succeeded": done.succeeded + sinks.succeeded,
            "total_failed": done.failed + failed,
        },
        "images": sinks.images,
        "errors_by_code": dict(sorted(sinks.codes.items())),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(sinks.images / wall_s, 3) if wall_s > 0 else None,
        "versions": {"unclip_batch": __version__, **{name: version(name) for name in VERSIONED},
                     "python": platform.python_version()},
        "host": os.uname().nodename,
    }
