"""The job, start to end: every whole-job check first, then the rows left to do through the pipeline, each
row recorded exactly once (metadata or error record), and the summary written last. Plain Python: the
Ray wiring is pipeline.py's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections import Counter

import pyarrow as pa
from tqdm import tqdm

from unclip_batch import __version__, pipeline, plan, storage
from unclip_batch.batches import NO_ERROR, rows_of
from unclip_batch.config import JobConfig
from unclip_batch.errors import Interrupted, JobFailed, SetupError, StorageUnavailable, caused_by
from unclip_batch.manifest import (
    MANIFEST,
    MANIFEST_ROW,
    ROW_FIELDS,
    SizeRule,
    UnknownWords,
    extra_columns,
    read_manifests,
    validate,
)
from unclip_batch.models import ModelSpec, describe_model
from unclip_batch.writer import ERROR_SCHEMA, METADATA_SCHEMA, ShardWriter, metadata_record, write_json

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
VERSIONED = ("ray", "torch", "diffusers", "transformers")  # recorded in the summary


def run_job(config: JobConfig) -> dict:
    """Run a job to completion (or resume it); return the summary also written to ``_SUCCESS``."""
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    so = config.storage_options
    # 1. Model config (no weights) and manifests: every whole-job problem surfaces here.
    pipeline.ray_address(config.address)  # a Ray Client address is refused before anything else
    spec, info = describe_model(config.model, so)
    defaults = {**info.defaults, **config.defaults}
    size = SizeRule.of(info)
    table = read_manifests(config.manifests, so, config.limit)
    # 2. Output: refuse to mix jobs; writing the job record proves the output is writable.
    record = plan.job_record(spec.spec, defaults, config.batch_size, config.scheduler, config.embeddings)
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
        raise SetupError(
            f"cannot write to output {config.output}: access denied ({exc}); the credentials "
            "need write access there (nothing was computed)"
        ) from exc
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
            raise SetupError(
                f"{changed.num_rows} manifest rows changed since an earlier run recorded them under "
                f"the same id (first: {first}); their old results would be kept. Rerun with "
                "--redo-changed to redo them, or use a new --output (nothing was computed)"
            )
        logger.warning("%d rows changed since they were recorded (first: %s): redoing them", changed.num_rows, first)
        plan.forget(config.output, changed, so)
        done = plan.load_done(config.output, so)
    todo = plan.pending(table, done)
    skipped_errors = plan.skipped_errors(table, done)
    if skipped_errors:
        logger.info(
            "%d rows recorded as errors by earlier runs are skipped (--retry-errors redoes them)", skipped_errors
        )
    logger.info(
        "%d manifest rows, %d done earlier, %d to do", table.num_rows, table.num_rows - todo.num_rows, todo.num_rows
    )
    # 4. Validate in the driver; invalid rows are recorded at once, valid ones become Ray blocks.
    lookup = table.select([MANIFEST, MANIFEST_ROW] + extra_columns(table))
    sinks = Sinks(config, lookup, spec.spec, total=todo.num_rows)
    batches = None
    try:
        # One block is one model batch: a Ray Data task hands its outputs on as one block, so an actor given
        # a bigger block would hold every image of it until the last one is made. Small blocks are written
        # as they are made (first images sooner; a crash loses only the batches in flight).
        blocks, tasks, words = [], set(), UnknownWords(info.vocabulary)
        for rows, errors in validate(todo, defaults, size):
            sinks.errors(errors)
            words.check(rows)
            for block in plan.model_blocks(rows, config.batch_size):
                tasks.update(row.task for row in block)
                blocks.append(pipeline.put(config, rows_table(block)))  # the driver keeps a reference, not the rows
        if words.rows:  # a warning, not an error: the rows run, and say what the model makes of them
            logger.warning(words.message(spec.spec))
        # 5. Run the pipeline.
        if blocks:
            batches = pipeline.run(config, blocks, tuple(sorted(tasks)))
            for batch in batches:
                sinks.add(rows_of(batch))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted): keep the finished rows, then stop
        _save_what_finished(sinks)
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), saved=sinks.done) from None
    except Exception as exc:
        _save_what_finished(sinks)
        if isinstance(exc, SetupError):  # found once Ray told what the cluster has (e.g. no GPU)
            raise
        outage = caused_by(exc, StorageUnavailable)
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


def _save_what_finished(sinks: Sinks) -> None:
    """Keep every finished row of a stopped run: the rerun resumes after them."""
    try:
        sinks.close(finished=False)
    except Exception as exc:  # storage may be what failed; the rows are redone on resume
        logger.warning("could not save the last finished rows: %s", exc)


def rows_table(rows) -> pa.Table:
    return (
        pa.table({f: [getattr(r, f) for r in rows] for f in ROW_FIELDS})
        .append_column("code", pa.array([NO_ERROR] * len(rows), pa.string()))
        .append_column("message", pa.array([""] * len(rows), pa.string()))
        .append_column("stage", pa.array([""] * len(rows), pa.string()))
    )


def _duration(seconds: float) -> str:
    """1h05m, 3m20s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Sinks:
    """Turns finished image rows into metadata and failed rows into errors, each row exactly once."""

    def __init__(self, config: JobConfig, lookup: pa.Table, model: str, total: int, bar_file=None):
        self.model, self.total = model, total
        shards = dict(
            output=config.output,
            lookup=lookup,
            storage_options=config.storage_options,
            flush_every_s=config.flush_every_s,
            retry_for_s=config.storage_retry_s,
        )
        self.metadata = ShardWriter(folder="metadata", schema=METADATA_SCHEMA, **shards)
        self.failed = ShardWriter(folder="errors", schema=ERROR_SCHEMA, **shards)
        self.partial: dict[str, list[dict]] = {}  # images of rows not yet complete
        # Rows already recorded: a block that Ray re-delivers after a retry must not record a row twice.
        self.recorded: set[str] = set()
        self.succeeded = self.images = 0
        self.codes: Counter = Counter()
        self.clock = self.last_report = time.perf_counter()
        self.last_counts = None
        # One bar on a terminal (stderr), replacing Ray Data's per-operator bars; in a log, a line every
        # PROGRESS_EVERY_S seconds with the same facts.
        bar_file = bar_file or sys.stderr
        show = config.progress_bar if config.progress_bar is not None else bar_file.isatty()
        self.bar = tqdm(
            total=total,
            unit="row",
            desc="unclip-batch",
            file=bar_file,
            disable=not show,
            # The terminal's size once; one that reports none (0 x 0, as some do) gets 100 x 20, where
            # tqdm would draw nothing at all.
            ncols=shutil.get_terminal_size((100, 20)).columns,
            nrows=shutil.get_terminal_size((100, 20)).lines,
            smoothing=0.1,
        )

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
        failed = sum(self.codes.values())
        if not self.bar.disable:
            self.bar.update(self.succeeded + failed - self.bar.n)
            rate = self.images / max(now - self.clock, 1e-9)
            self.bar.set_postfix_str(f"{self.images} images, {rate:.2f} images/s, {failed} failed")  # redraws
            if not final:
                return  # the bar says it all; the last line goes to the log as well
            self.bar.close()
        if final or now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            counts = (self.succeeded, failed, self.images)
            if counts != self.last_counts:  # the final report repeats nothing already said
                done, elapsed = self.succeeded + failed, max(now - self.clock, 1e-9)
                left = self.total - done
                eta = f", about {_duration(left * elapsed / done)} left" if done and left else ""
                logger.info(
                    "progress: %d/%d rows done (%d failed), %d images, %.2f images/s%s",
                    done,
                    self.total,
                    failed,
                    self.images,
                    self.images / elapsed,
                    eta,
                )
                self.last_counts = counts

    def close(self, finished: bool = True) -> None:
        """Flush the shards. After a finished run, a row still missing images (a stage dropped some:
        a bug) is recorded rather than lost; after a failed run it is simply redone on resume."""
        for row_id, images in self.partial.items() if finished else ():
            first = next(iter(images.values()))
            self.errors(
                [
                    {
                        "id": row_id,
                        "task": first["task"],
                        "stage": "write",
                        "code": "write_failed",
                        "message": f"only {len(images)} of {first['num_images']} images arrived",
                        "row": first["row"],
                        "input_hash": first["input_hash"],
                    }
                ]
            )
        self.metadata.flush()
        self.failed.flush()
        self._report(final=True)


def _summary(
    config: JobConfig,
    spec: ModelSpec,
    manifest_rows: int,
    done: plan.Done,
    sinks: Sinks,
    started: dt.datetime,
    wall_s: float,
) -> dict:
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
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(sinks.images / wall_s, 3) if wall_s > 0 else None,
        "versions": {
            "unclip_batch": __version__,
            **{name: version(name) for name in VERSIONED},
            "python": platform.python_version(),
        },
        "host": os.uname().nodename,
    }
