"""The job, start to end: every whole-job check first, then the shards left to do through the pipeline, each
shard committed whole as its blocks come in (and now and then before), and the summary written last. Plain
Python: the Ray wiring is pipeline.py's. The driver holds shards and a few numbers per shard, never rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from unclip_batch import __version__, pipeline, plan, storage
from unclip_batch.batches import rows_of
from unclip_batch.config import JobConfig
from unclip_batch.errors import Interrupted, JobFailed, SetupError, storage_outage
from unclip_batch.manifest import SizeRule, UnknownWords, manifest_files
from unclip_batch.models import ModelSpec, describe_model
from unclip_batch.writer import FORMATS, part_path, write_json

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
VERSIONED = ("ray", "torch", "diffusers", "transformers")  # recorded in the summary
SAVE_TIMEOUT_S = 120.0  # how long a stopped job waits for its last commits


def run_job(config: JobConfig) -> dict:
    """Run a job to completion (or resume it); return the summary also written to ``_SUCCESS``."""
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    # 1. Where things are, model config (no weights) and manifests (footers, no rows): every whole-job
    # problem surfaces here. The options go to the job's own stores, and to no other.
    pipeline.ray_address(config.address)  # a Ray Client address is refused before anything else
    stores = storage.Stores(config.storage_options, [config.output, *config.manifests, ModelSpec.url_of(config.model)])
    output = _output(config, stores)
    spec, info = describe_model(config.model, stores)
    defaults = {**info.defaults, **config.defaults}
    files = manifest_files(config.manifests, stores)
    shards = plan.plan_shards(files, config.rows_per_shard, config.limit)
    # 2. Output: refuse to mix jobs; writing the job record proves the output is writable.
    record = plan.job_record(
        spec.spec,
        defaults,
        config.batch_size,
        config.scheduler,
        config.embeddings,
        config.format,
        config.rows_per_shard,
        info.weights,
    )
    _prepare_output(config, output, record)
    # 3. What the output holds (listings and stats files): the shards to read, and those finished.
    state = plan.output_state(output, FORMATS[config.format].stats_folder)
    plan.check_layout(shards, state, output)
    visit, skipped = plan.to_visit(shards, state, config.retry_errors)
    # 4. The ids of every row, in tasks: duplicates (the first occurrence runs), and the tasks asked for.
    duplicates, tasks = pipeline.scan_ids(config, files, stores)
    # 5. Rows changed under their records since an earlier run: refused (or redone) before any compute.
    checked = [s for s in visit if s.name in state.recorded or s.name in state.stats]
    changed = pipeline.changed_rows(config, output, stores, checked, duplicates) if checked else []
    if changed:
        first = ", ".join(str(c) for c in changed[:5])
        if not config.redo_changed:
            raise SetupError(
                f"{len(changed)} manifest rows changed since an earlier run recorded them under "
                f"the same id (first: {first}); their old results would be kept. Rerun with "
                "--redo-changed to redo them, or use a new --output (nothing was computed)"
            )
        logger.warning("%d rows changed since they were recorded (first: %s): redoing them", len(changed), first)
    logger.info(
        "%d manifest rows in %d shards: %d shards finished earlier, %d to read",
        sum(s.limit - s.start for s in shards),
        len(shards),
        len(skipped),
        len(visit),
    )
    # 6. Run the pipeline; commit each shard as its blocks come in.
    work = plan.Work(
        output=output,
        stores=stores,
        defaults=defaults,
        size=SizeRule.of(info),
        batch_size=config.batch_size,
        retry_errors=config.retry_errors,
        vocabulary=info.vocabulary,
        duplicates=duplicates,
        max_source_bytes=config.max_source_bytes,
        retry_for_s=config.storage_retry_s,
    )
    progress = Progress(config, total=sum(s.limit - s.start for s in visit), vocabulary=info.vocabulary)
    commits = Commits(config, work, visit, spec.spec, progress)
    batches = None
    try:
        if visit:
            batches = pipeline.run(config, visit, work, tasks)
            for batch in batches:
                commits.add(rows_of(batch))
        commits.finish()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted): keep the finished rows, then stop
        _save_what_finished(commits)
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), saved=progress.done) from None
    except Exception as exc:
        _save_what_finished(commits)
        if isinstance(exc, SetupError):  # found once Ray told what the cluster has (e.g. no GPU)
            raise
        outage = storage_outage(exc)
        if outage is not None:
            raise outage from exc
        raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if batches is not None:
            batches.close()  # stop the execution now, not when the iterator is garbage-collected
    progress.close()
    if progress.words.rows:  # a warning, not an error: the rows ran, and say what the model makes of them
        logger.warning(progress.words.message(spec.spec))
    # 7. The summary, written last: its presence means every row is accounted for.
    summary = _summary(config, spec, shards, skipped, commits, progress, started, time.perf_counter() - clock)
    output.remove(plan.PARTS, retry_for_s=config.storage_retry_s)
    write_json(output, plan.SUCCESS, summary, config.storage_retry_s)
    storage.clear_partial(output)  # the empty staging folder
    return summary


def _output(config: JobConfig, stores: storage.Stores) -> storage.Location:
    try:
        return stores.location(config.output)
    except ValueError as exc:
        raise SetupError(f"--output {exc}") from exc


def _prepare_output(config: JobConfig, output: storage.Location, record: dict) -> None:
    """--overwrite, the job record check and write, and what a killed run left half-done."""
    shown = storage.redact(config.output)
    try:
        if config.overwrite:
            plan.clear_output(output, config.storage_retry_s)
        plan.check_job_record(output, record)
        write_json(output, plan.JOB_RECORD, record, config.storage_retry_s)
        storage.clear_partial(output)
        for name in (plan.SUCCESS, plan.PARTS):  # an earlier run's summary (this run writes its own), parts
            output.remove(name, retry_for_s=config.storage_retry_s)
    except SetupError:
        raise
    except PermissionError as exc:
        raise SetupError(
            f"cannot write to output {shown}: access denied ({exc}); the credentials "
            "need write access there (nothing was computed)"
        ) from exc
    except Exception as exc:
        raise SetupError(f"cannot write to output {shown}: {type(exc).__name__}: {exc}") from exc


def _save_what_finished(commits: Commits) -> None:
    """Commit every finished block of a stopped run: the rerun resumes after them."""
    try:
        commits.save()
    except Exception as exc:  # storage may be what failed; the rows are redone on resume
        logger.warning("could not save the last finished rows: %s", exc)


@dataclass
class _Shard:
    """A shard in flight: the parts of its blocks in so far, and its commit."""

    shard: plan.Shard
    blocks: int | None = None  # how many blocks it has (known from its first report)
    seen: set = field(default_factory=set)
    parts: list = field(default_factory=list)
    committed: int = -1  # parts in its last commit
    commit: object = None  # the commit in flight

    @property
    def all_in(self) -> bool:
        return self.blocks is not None and len(self.seen) == self.blocks


class Commits:
    """Each visited shard's blocks as they are reported; a shard is committed once all are in, and its
    finished blocks every flush_every_s before that (a killed driver loses at most that much work)."""

    def __init__(self, config: JobConfig, work: plan.Work, shards: list[plan.Shard], model: str, progress: Progress):
        self.config, self.work, self.model, self.progress = config, work, model, progress
        self.shards = {s.name: _Shard(s) for s in shards}
        self.results: dict[str, dict] = {}  # stats of each shard's final commit
        self.last_flush = time.monotonic()

    def add(self, reports: list[dict]) -> None:
        for report in reports:
            name = json.loads(report["shard"])["name"]
            state = self.shards[name]
            block = int(report["block"])
            if block in state.seen:
                continue  # a block Ray delivered again after a retry: its part is the same file
            state.seen.add(block)
            state.blocks = int(report["blocks"])
            if report["report"]:
                read = json.loads(report["report"])
                self.progress.read(read)
                if read.get("invalid_codes"):
                    state.parts.append(part_path(name, "invalid"))
            counts = json.loads(report["counts"])
            if counts["part"]:
                state.parts.append(part_path(name, block))
            self.progress.block(counts)
        self.poll()

    def poll(self, flush: bool = False) -> None:
        """Take in the commits that finished; start those now due: a shard's last, once all its blocks are
        in; every unfinished shard's with new parts, every flush_every_s (or now, with ``flush``)."""
        for state in self.shards.values():
            if state.commit is not None and pipeline.finished([state.commit]):
                stats = pipeline.result(state.commit)  # raises the commit's error
                state.commit = None
                if state.all_in and state.committed == len(state.parts):
                    self.results[state.shard.name] = stats
        for name in list(self.results):
            self.shards.pop(name, None)
        flush = flush or time.monotonic() - self.last_flush >= self.config.flush_every_s
        for state in self.shards.values():
            if state.commit is None and (state.all_in or flush and len(state.parts) > max(state.committed, 0)):
                self._commit(state)
        if flush:
            self.last_flush = time.monotonic()

    def _commit(self, state: _Shard) -> None:
        state.committed = len(state.parts)
        state.commit = pipeline.commit(self.config, self.work, state.shard, list(state.parts), self.model)

    def finish(self) -> None:
        """Wait until every shard is committed whole."""
        while self.shards:
            self.poll()
            pending = [s.commit for s in self.shards.values() if s.commit is not None]
            pipeline.finished(pending, timeout=1.0)

    def save(self) -> None:
        """A stopped run: commit what each shard has, and wait (a while) for it."""
        deadline = time.monotonic() + SAVE_TIMEOUT_S
        while time.monotonic() < deadline:
            self.poll(flush=True)
            pending = [s.commit for s in self.shards.values() if s.commit is not None]
            if not pending:
                return
            pipeline.finished(pending, timeout=1.0)


def _duration(seconds: float) -> str:
    """1h05m, 3m20s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Rows done, images, failures, rate and time left, from the read and block reports: one bar on a
    terminal (stderr), replacing Ray Data's per-operator bars; in a log, a line every PROGRESS_EVERY_S
    seconds with the same facts."""

    def __init__(self, config: JobConfig, total: int, vocabulary: frozenset | None = None, bar_file=None):
        self.total = total
        self.kept = self.kept_failed = self.changed = self.retried = 0  # from the read reports
        self.succeeded = self.images = self.candidates = self.warm_ups = 0
        self.warm_up_s = 0.0
        self.codes: Counter = Counter()
        self.words = UnknownWords(vocabulary)  # what the shards' reports found
        self.clock = self.last_report = time.perf_counter()
        self.last_counts = None
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

    def read(self, report: dict) -> None:
        """A shard's read report: rows kept from earlier runs, rows that failed validation."""
        self.kept += report["kept"]
        self.kept_failed += report["kept_failed"]
        self.changed += report["changed"]
        self.retried += report["retried"]
        self.codes.update(report.get("invalid_codes") or {})
        self.words.add(report["words"])
        self._report()

    def block(self, counts: dict) -> None:
        self.succeeded += counts["succeeded"]
        self.images += counts["images"]
        self.candidates += counts["candidates"]
        self.warm_ups += counts["warm_ups"]
        self.warm_up_s += counts["warm_up_s"]
        self.codes.update(counts["codes"])
        self._report()

    def _report(self, final: bool = False) -> None:
        now = time.perf_counter()
        failed = sum(self.codes.values())
        if not self.bar.disable:
            self.bar.update(self.kept + self.succeeded + failed - self.bar.n)
            rate = self.images / max(now - self.clock, 1e-9)
            self.bar.set_postfix_str(f"{self.images} images, {rate:.2f} images/s, {failed} failed")  # redraws
            if not final:
                return  # the bar says it all; the last line goes to the log as well
            self.bar.close()
        counts = (self.succeeded, failed, self.images)
        if final or now - self.last_report >= PROGRESS_EVERY_S:
            # Nothing new, or nothing yet (a shard's read report before any row is done): no line.
            if counts != self.last_counts and (final or any(counts)):
                self.last_report = now
                done, elapsed = self.kept + self.succeeded + failed, max(now - self.clock, 1e-9)
                left = self.total - done
                made = self.succeeded + failed  # the rate of this run's rows, not of rows kept from earlier ones
                eta = f", about {_duration(left * elapsed / made)} left" if made and left else ""
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

    def close(self) -> None:
        self._report(final=True)


def _summary(
    config: JobConfig,
    spec: ModelSpec,
    shards: list[plan.Shard],
    skipped: list[dict],
    commits: Commits,
    progress: Progress,
    started: dt.datetime,
    wall_s: float,
) -> dict:
    from importlib.metadata import version  # not `import torch`: that alone takes seconds in the driver

    failed = sum(progress.codes.values())
    finished = skipped + list(commits.results.values())
    return {
        "status": "complete",
        "output": storage.redact(config.output),
        "manifests": [storage.redact(m) for m in config.manifests],
        "model": spec.spec,
        "format": config.format,
        "rows": {
            "manifest": sum(s.limit - s.start for s in shards),
            "done_before": progress.kept + sum(s["rows"] for s in skipped),
            "succeeded": progress.succeeded,
            "failed": failed,
            "total_succeeded": sum(s["succeeded"] for s in finished),
            "total_failed": sum(s["failed"] for s in finished),
            "skipped_errors": progress.kept_failed + sum(s["failed"] for s in skipped),
            "changed_redone": progress.changed,
        },
        "shards": {"planned": len(shards), "finished_before": len(skipped), "written": len(commits.results)},
        "images": progress.images,
        "images_total": sum(s["images"] for s in finished),  # in the output, by this run and earlier ones
        # Images the model made, best_of candidates each: its work (equal to images without best_of).
        "candidates": progress.candidates,
        "errors_by_code": dict(sorted(progress.codes.items())),
        # A compiled model's kernels are built in the first call of each call shape in each actor: those
        # calls, and their seconds (compile and the call's own work).
        "warm_up": {"compile": config.compile, "calls": progress.warm_ups, "s": round(progress.warm_up_s, 3)},
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(progress.images / wall_s, 3) if wall_s > 0 else None,
        "versions": {
            "unclip_batch": __version__,
            **{name: version(name) for name in VERSIONED},
            "python": platform.python_version(),
        },
        "host": os.uname().nodename,
    }
