"""The job without Ray: the driver's progress from block reports, and run_job over the stages in this process."""

import datetime as dt
import json
import os
import platform
import signal

import pytest
from helpers import job

from unclip_batch.job import Progress

# A block's report (writer.write_part): one row with its image, one failed in the model.
BLOCK = {
    "succeeded": 1,
    "images": 1,
    "candidates": 1,
    "codes": {"model_error": 1},
    "warm_ups": 0,
    "warm_up_s": 0.0,
    "part": True,
}


def test_progress_says_rows_failures_rate_and_time_left(tmp_path, caplog, monkeypatch):
    import logging

    from unclip_batch import job as job_module

    progress = Progress(job(["m"], tmp_path), total=4)
    clock = iter([110.0])  # the first two rows arrive 10 s after the job started
    monkeypatch.setattr(job_module.time, "perf_counter", lambda: next(clock, 110.0))
    progress.clock = progress.last_report = 100.0
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        progress.block(BLOCK)
    assert "progress: 2/4 rows done (1 failed), 1 images, 0.10 images/s, about 10s left" in caplog.text
    assert [job_module._duration(s) for s in (42, 200, 3900)] == ["42s", "3m20s", "1h05m"]


def test_a_terminal_gets_one_bar_with_rows_images_rate_and_failures(tmp_path, caplog):
    import io
    import logging

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress(job(["m"], tmp_path), total=4, bar_file=screen)
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        progress.block(BLOCK)
        assert "2/4" in screen.getvalue() and "1 images" in screen.getvalue() and "1 failed" in screen.getvalue()
        assert "progress:" not in caplog.text  # on a terminal the bar replaces the periodic lines
        progress.close()
    assert "progress: 2/4 rows done (1 failed)" in caplog.text  # the last word also goes to the log
    quiet = Terminal()
    Progress(job(["m"], tmp_path, progress_bar=False), total=4, bar_file=quiet).close()
    assert quiet.getvalue() == ""  # --quiet: no bar even on a terminal


# -- the whole job in this process (helpers.inline_pipeline: the stages without Ray), the null model ---------


ROWS = [{"id": f"r{i}", "prompt": "a red circle", "num_images": 1 + i % 2, "tag": i} for i in range(7)]
ROWS += [{"id": "bad id", "prompt": "p"}, {"id": "var", "task": "variation", "image": "img/scene.png"}]


def run_inline(monkeypatch, output, manifest, **options):
    from helpers import inline_pipeline

    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    return run_job(job([manifest], output, model="null", rows_per_shard=4, **options))


def stop_at_the_third_write(monkeypatch, stop: BaseException | type[BaseException]):
    """The job's write stage raises ``stop`` on its third block; returns the real stage."""
    from unclip_batch import pipeline

    real, calls = pipeline.write_stage, []

    def stops(batch, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise stop
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_stage", stops)
    return real


@pytest.fixture
def manifest(tmp_path):
    from helpers import make_sources, write_manifest

    folder = make_sources(tmp_path / "in")
    return write_manifest(folder / "m.parquet", ROWS)


def test_every_row_once_as_images_or_an_error_and_the_summary_last(tmp_path, monkeypatch, manifest, caplog):
    from helpers import FAST, read_output

    from unclip_batch import plan

    with caplog.at_level("INFO", logger="unclip_batch.job"):
        summary = run_inline(monkeypatch, tmp_path / "out", manifest)
    assert "progress: 9/9 rows done (1 failed), 11 images" in caplog.text  # the last line counts every row
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record == plan.job_record("null", {**record["defaults"], **FAST}, 16, rows_per_shard=4)
    assert record["defaults"]["guidance_scale"] == 4.0  # the model's defaults under the job's own
    metadata, errors = read_output(tmp_path / "out")
    assert sorted(set(metadata["id"].to_pylist())) == sorted(r["id"] for r in ROWS if r["id"] != "bad id")
    assert set(metadata["model"].to_pylist()) == {"null"}
    assert metadata.num_rows == 11 == summary["images"] == summary["images_total"]
    assert errors.to_pylist()[0]["code"] == "invalid_id" and errors.num_rows == 1
    assert summary["rows"] == {
        "manifest": 9,
        "done_before": 0,
        "succeeded": 8,
        "failed": 1,
        "total_succeeded": 8,
        "total_failed": 1,
        "skipped_errors": 0,
        "changed_redone": 0,
    }
    assert summary["shards"] == {"planned": 3, "finished_before": 0, "written": 3}
    assert summary["errors_by_code"] == {"invalid_id": 1} and summary["status"] == "complete"
    assert summary["model"] == "null" and summary["format"] == "files" and summary["candidates"] == 11
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text()) == summary
    stats = sorted(p.name for p in (tmp_path / "out" / "stats").iterdir())
    assert stats == ["00000_stats.json", "00001_stats.json", "00002_stats.json"]
    last = json.loads((tmp_path / "out" / "stats" / "00002_stats.json").read_text())
    version = last.pop("version")
    assert (
        last
        == {
            "shard": "00002",
            "manifest": manifest,
            "path": manifest,
            "start": 8,
            "stop": 9,
            "rows": 1,
            "succeeded": 1,
            "failed": 0,
            "images": 1,
            "failures_by_code": {},
            "complete": True,
        }
        and version
    )
    second = json.loads((tmp_path / "out" / "stats" / "00001_stats.json").read_text())
    assert (second["rows"], second["succeeded"], second["failed"], second["images"]) == (4, 3, 1, 4)
    assert second["failures_by_code"] == {"invalid_id": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "_SUCCESS",
        "_job.json",
        "errors",
        "images",
        "metadata",
        "stats",
    ]  # no parts, no staging folder left
    assert summary["images_per_s"] == pytest.approx(11 / summary["wall_s"], rel=0.02)
    assert list(summary) == [
        "status",
        "output",
        "manifests",
        "model",
        "format",
        "rows",
        "shards",
        "images",
        "images_total",
        "candidates",
        "errors_by_code",
        "warm_up",
        "started",
        "finished",
        "wall_s",
        "images_per_s",
        "versions",
        "host",
    ]
    assert summary["output"] == str(tmp_path / "out") and summary["manifests"] == [manifest]
    assert summary["warm_up"] == {"compile": "off", "calls": 0, "s": 0.0}
    assert list(summary["versions"]) == ["unclip_batch", "ray", "torch", "diffusers", "transformers", "python"]
    assert summary["versions"]["python"] == platform.python_version() and summary["host"] == os.uname().nodename
    started, finished = (dt.datetime.fromisoformat(summary[k]) for k in ("started", "finished"))
    assert started.tzinfo is not None and 0 <= (finished - started).total_seconds() <= summary["wall_s"] + 1
    assert summary["wall_s"] == round(summary["wall_s"], 3) and summary["images_per_s"] == round(
        summary["images_per_s"], 3
    )


def test_a_limited_run_then_the_rest_resumes_after_what_was_done(tmp_path, monkeypatch, manifest):
    from helpers import images_of

    run_inline(monkeypatch, tmp_path / "whole", manifest)
    first = run_inline(monkeypatch, tmp_path / "out", manifest, limit=5)
    assert first["rows"]["manifest"] == 5 and first["rows"]["succeeded"] == 5
    rest = run_inline(monkeypatch, tmp_path / "out", manifest)
    assert rest["rows"]["done_before"] == 5 and rest["rows"]["succeeded"] + rest["rows"]["failed"] == 4
    assert rest["rows"]["total_succeeded"] == 8 and rest["shards"]["finished_before"] == 1
    assert images_of(tmp_path / "out") == images_of(tmp_path / "whole")
    again = run_inline(monkeypatch, tmp_path / "out", manifest)
    assert again["rows"]["succeeded"] == 0 and again["rows"]["done_before"] == 9 and again["images"] == 0
    assert again["images_total"] == 11 and again["shards"]["written"] == 0
    assert again["rows"]["skipped_errors"] == 1 and again["rows"]["total_failed"] == 1  # bad id, kept as recorded


def test_a_stopped_job_keeps_its_finished_blocks_and_the_rerun_finishes_the_rest(tmp_path, monkeypatch, manifest):
    from helpers import images_of

    from unclip_batch import pipeline
    from unclip_batch.errors import Interrupted, JobFailed

    run_inline(monkeypatch, tmp_path / "whole", manifest)
    real = stop_at_the_third_write(monkeypatch, KeyboardInterrupt)  # a Ctrl-C
    from helpers import inline_pipeline

    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    config = job([manifest], tmp_path / "out", model="null", rows_per_shard=4)
    with pytest.raises(Interrupted) as stopped:
        run_job(config)
    assert stopped.value.saved == 8 and not (tmp_path / "out" / "_SUCCESS").exists()
    assert stopped.value.signum == signal.SIGINT  # Ctrl-C; a SIGTERM's Interrupted keeps its own number

    def fails(batch, *args, **kwargs):
        raise RuntimeError("a broken actor")

    monkeypatch.setattr(pipeline, "write_stage", fails)
    with pytest.raises(JobFailed, match="RuntimeError: a broken actor"):
        run_job(config)
    monkeypatch.setattr(pipeline, "write_stage", real)
    summary = run_job(config)
    assert summary["rows"]["done_before"] == 8 and summary["rows"]["total_succeeded"] == 8
    assert images_of(tmp_path / "out") == images_of(tmp_path / "whole")


def test_a_row_changed_under_its_id_is_refused_or_redone(tmp_path, monkeypatch, manifest):
    from helpers import write_manifest

    from unclip_batch.errors import SetupError

    run_inline(monkeypatch, tmp_path / "out", manifest)
    changed = write_manifest(tmp_path / "in" / "m.parquet", [{**ROWS[0], "prompt": "a blue circle"}, *ROWS[1:]])
    with pytest.raises(SetupError, match="1 manifest rows changed .*first: r0.*--redo-changed"):
        run_inline(monkeypatch, tmp_path / "out", changed)
    summary = run_inline(monkeypatch, tmp_path / "out", changed, redo_changed=True)
    assert summary["rows"]["changed_redone"] == 1 and summary["rows"]["succeeded"] == 1


def test_unfinished_shards_are_committed_every_flush_and_each_finished_one_once_more(tmp_path, monkeypatch, manifest):
    """Blocks of 4 images (batch size 1): a shard of 4 rows is 2 blocks. Flushing after every block commits a
    shard's first block alone, then the shard whole; flushing rarely commits each shard once, when whole."""
    from helpers import inline_pipeline

    from unclip_batch import pipeline
    from unclip_batch.job import run_job

    original = pipeline.commit
    # Shard 00001 is one block (4 images) and its invalid row's part: one commit of both either way.
    for flush, expected in ((1e-9, {"00000": [1, 2], "00001": [2], "00002": [1]}), (1000.0, None)):
        inline_pipeline(monkeypatch)
        commits = {}

        def counting(config, work, shard, parts, model, commits=commits):
            commits.setdefault(shard.name, []).append(len(parts))
            return original(config, work, shard, parts, model)

        monkeypatch.setattr(pipeline, "commit", counting)
        output = tmp_path / f"out-{flush}"
        config = job([manifest], output, model="null", rows_per_shard=4, batch_size=1, flush_every_s=flush)
        summary = run_job(config)
        assert summary["rows"]["total_succeeded"] == 8
        assert commits == (expected or {"00000": [2], "00001": [2], "00002": [1]}), flush


def test_an_output_that_cannot_be_written_or_named_fails_before_any_work(tmp_path, monkeypatch, manifest):
    import os

    from unclip_batch.errors import SetupError

    with pytest.raises(SetupError, match="^--output '/' names no folder of its own"):
        run_inline(monkeypatch, "/", manifest)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a file where the folder should be instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file")
            with pytest.raises(SetupError, match=f"^cannot write to output {locked}: "):
                run_inline(monkeypatch, locked, manifest)
        else:
            with pytest.raises(SetupError, match=f"^cannot write to output {locked}: access denied"):
                run_inline(monkeypatch, locked, manifest)
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_progress_adds_up_reads_and_blocks_and_the_bar_counts_every_recorded_row(tmp_path, monkeypatch):
    import io

    from unclip_batch import job as job_module

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([100.0, 101.0, 102.0, 104.0, 104.0, 104.0])
    monkeypatch.setattr(job_module.time, "perf_counter", lambda: next(clock, 104.0))
    screen = Terminal()
    progress = Progress(job(["m"], tmp_path), total=10, bar_file=screen)
    read = {"kept": 2, "kept_failed": 1, "changed": 1, "retried": 1, "words": {"rows": 0, "words": {}, "first_ids": []}}
    progress.read(read)
    progress.read({**read, "invalid_codes": {"invalid_id": 1}})
    assert (progress.kept, progress.kept_failed, progress.changed, progress.retried) == (4, 2, 2, 2)
    progress.block({**BLOCK, "warm_ups": 1, "warm_up_s": 2.5})
    progress.block({**BLOCK, "warm_ups": 1, "warm_up_s": 0.5, "codes": {}})
    assert (progress.warm_ups, progress.warm_up_s, progress.images, progress.candidates) == (2, 3.0, 2, 2)
    assert progress.codes == {"invalid_id": 1, "model_error": 1} and progress.done == 4
    assert progress.bar.n == 8  # 4 kept + 2 made + 2 failed
    # 2 images in the 4 s since the start: the bar's rate.
    assert "2 images, 0.50 images/s, 2 failed" in screen.getvalue()


def test_a_block_delivered_twice_is_counted_once(tmp_path, monkeypatch, manifest):
    """Ray may deliver a block's report again after a retry: the job counts it once, and the reports after it."""
    import numpy as np
    from helpers import inline_pipeline, read_output

    from unclip_batch import pipeline
    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    inline = pipeline.run

    def again(config, shards, work, tasks):
        batches = list(inline(config, shards, work, tasks))
        batches.insert(1, batches[0])  # the first block's report twice, in one batch with the rest
        yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    monkeypatch.setattr(pipeline, "run", again)
    summary = run_job(job([manifest], tmp_path / "out", model="null", rows_per_shard=4))
    assert summary["images"] == 11 and summary["rows"]["succeeded"] == 8 and summary["rows"]["failed"] == 1
    metadata, _ = read_output(tmp_path / "out")
    assert metadata.num_rows == 11


@pytest.mark.parametrize("format", ["files", "webdataset", "parquet"])
def test_every_storage_call_of_a_job_retries_for_its_storage_retry_window(tmp_path, monkeypatch, manifest, format):
    """--storage-retry-s reaches every retried call on an object store (fsspec's memory store stands in): a
    first run, a rerun that redoes its failed row over the shard's kept images, and an --overwrite run."""
    import uuid

    import fsspec

    from unclip_batch import storage

    calls = []
    retrying = storage.retrying

    def spy(action, what, retry_for_s=storage.RETRY_FOR_S):
        calls.append((what, retry_for_s))
        return retrying(action, what, retry_for_s)

    monkeypatch.setattr(storage, "retrying", spy)
    output = f"memory://retry-{uuid.uuid4().hex}/out"
    try:
        first = run_inline(monkeypatch, output, manifest, storage_retry_s=37.0, format=format)
        again = run_inline(monkeypatch, output, manifest, storage_retry_s=37.0, format=format, retry_errors=True)
        over = run_inline(monkeypatch, output, manifest, storage_retry_s=37.0, format=format, overwrite=True)
    finally:
        fsspec.filesystem("memory").rm(output.removeprefix("memory://").split("/")[0], recursive=True)
    assert first["images"] == over["images"] == 11 and again["rows"]["done_before"] == 8
    kinds = {what.split(" ")[0] for what, _ in calls}
    assert kinds == {"writing", "reading", "listing", "removing"}
    assert {window for _, window in calls} == {37.0}


def test_a_row_whose_images_did_not_all_arrive_is_an_error_not_a_short_record(tmp_path, monkeypatch, manifest):
    """A stage that dropped one of a row's images (a bug) leaves the row a write_failed error saying how many
    came, never metadata with fewer images than the row asked for."""
    from helpers import read_output

    from unclip_batch import writer

    write_part = writer.write_part

    def dropping(rows, **options):
        return write_part([r for r in rows if (r.get("id"), r.get("k")) != ("r1", 1)], **options)

    monkeypatch.setattr(writer, "write_part", dropping)
    summary = run_inline(monkeypatch, tmp_path / "out", manifest)
    metadata, errors = read_output(tmp_path / "out")
    assert "r1" not in metadata["id"].to_pylist() and metadata.num_rows == 9
    failed = {r["id"]: r for r in errors.to_pylist()}
    assert set(failed) == {"bad id", "r1"} and summary["images_total"] == 9  # the records' counts
    assert (summary["rows"]["total_succeeded"], summary["rows"]["total_failed"]) == (7, 2)
    assert (failed["r1"]["stage"], failed["r1"]["code"]) == ("write", "write_failed")
    assert failed["r1"]["message"] == "only 1 of 2 images arrived" and failed["r1"]["manifest_row"] == 1


def test_a_ray_client_address_is_refused_before_anything_is_written(tmp_path, monkeypatch, manifest):
    from unclip_batch.errors import SetupError

    with pytest.raises(SetupError, match="Ray Client"):
        run_inline(monkeypatch, tmp_path / "out", manifest, address="ray://head:10001")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("format", ["files", "webdataset"])
def test_a_shard_committed_again_keeps_its_earlier_error_records_and_images(tmp_path, monkeypatch, manifest, format):
    """A rerun that redoes one changed row of a shard rewrites the shard whole: the rows it did not redo keep
    their records, an error record included, and their images (from the shard as written, for shard formats)."""
    from helpers import images_of, read_output, write_manifest

    run_inline(monkeypatch, tmp_path / "out", manifest, format=format)
    before = images_of(tmp_path / "out")
    changed = write_manifest(
        tmp_path / "in" / "m.parquet", [*ROWS[:4], {**ROWS[4], "prompt": "a blue square"}, *ROWS[5:]]
    )
    summary = run_inline(monkeypatch, tmp_path / "out", changed, format=format, redo_changed=True)
    assert summary["rows"]["changed_redone"] == 1 and summary["rows"]["total_failed"] == 1
    metadata, errors = read_output(tmp_path / "out")
    assert [(r["id"], r["code"]) for r in errors.to_pylist()] == [("bad id", "invalid_id")]
    after = images_of(tmp_path / "out")
    assert after == before  # the null model draws the same picture for any prompt
    prompts = dict(zip(metadata["id"].to_pylist(), metadata["prompt"].to_pylist()))
    assert prompts["r4"] == "a blue square" and prompts["r3"] == "a red circle" and metadata.num_rows == 11


def test_a_stop_commits_the_blocks_an_unfinished_shard_has(tmp_path, monkeypatch, manifest):
    """One shard of every row, a block per model call: stopped at its third block, the job commits the two
    it has before it stops (their rows are not made again), though the shard never finished."""
    from helpers import inline_pipeline, read_output

    from unclip_batch import pipeline
    from unclip_batch.errors import Interrupted
    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    real = stop_at_the_third_write(monkeypatch, Interrupted(signal.SIGTERM))  # as the job's SIGTERM handler raises it
    config = job([manifest], tmp_path / "out", model="null", rows_per_shard=100, batch_size=1)
    with pytest.raises(Interrupted) as stopped:
        run_job(config)
    assert stopped.value.signum == signal.SIGTERM
    saved, failed = read_output(tmp_path / "out")
    assert saved is not None and 0 < saved.num_rows < 11 and not (tmp_path / "out" / "stats").exists()
    recorded = len(set(saved["id"].to_pylist())) + (failed.num_rows if failed is not None else 0)
    monkeypatch.setattr(pipeline, "write_stage", real)
    summary = run_job(config)
    assert summary["rows"]["done_before"] == recorded and summary["images_total"] == 11


def test_progress_lines_come_at_most_every_interval_and_only_with_news(tmp_path, caplog, monkeypatch):
    import logging

    from unclip_batch import job as job_module

    now = [100.0]
    monkeypatch.setattr(job_module.time, "perf_counter", lambda: now[0])
    every = job_module.PROGRESS_EVERY_S
    progress = Progress(job(["m"], tmp_path), total=8)
    progress.clock = progress.last_report = 100.0
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        for at, report in (
            (100.0 + every / 3, lambda: progress.block(BLOCK)),  # too soon after the start: no line
            (100.0 + every, lambda: progress.block(BLOCK)),  # a line
            (100.0 + every * 1.5, lambda: progress.block(BLOCK)),  # too soon after the last line
            (100.0 + every * 3, progress._report),  # a line: news since the last
            (100.0 + every * 5, progress._report),  # no news: no line
            (100.0 + every * 5, progress.close),  # no news, even at the end
        ):
            now[0] = at
            report()
    lines = [r.getMessage() for r in caplog.records]
    left = job_module._duration(every)
    assert lines == [
        f"progress: 4/8 rows done (2 failed), 2 images, {2 / every:.2f} images/s, about {left} left",
        f"progress: 6/8 rows done (3 failed), 3 images, {1 / every:.2f} images/s, about {left} left",
    ]
    caplog.clear()
    quick = Progress(job(["m"], tmp_path), total=2)
    quick.clock, quick.last_report, now[0] = 100.0, 100.0 - every, 100.5
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        quick.block(BLOCK)  # half a second in: the rate of that half second, and no time left to tell
    assert [r.getMessage() for r in caplog.records] == ["progress: 2/2 rows done (1 failed), 1 images, 2.00 images/s"]


def test_the_parquet_formats_shards_are_hugging_face_image_datasets(tmp_path, monkeypatch, manifest):
    """data/<shard>.parquet: the picture in `image` as Hugging Face's Image feature stores it (bytes and a
    path), the feature declared in the schema's metadata, a row's source URL as `source_image`."""
    import hashlib

    import pyarrow.parquet as pq

    from unclip_batch.writer import HF_FEATURES, HF_IMAGE

    run_inline(monkeypatch, tmp_path / "out", manifest, format="parquet")
    shards = sorted((tmp_path / "out" / "data").iterdir())
    assert [p.name for p in shards] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    last = pq.read_table(shards[-1])
    assert last.schema.metadata[b"huggingface"] == HF_FEATURES
    assert last.schema.field("image").type == HF_IMAGE and "timings" not in last.column_names
    row = last.to_pylist()[0]
    assert row["id"] == "var" and row["source_image"].endswith("img/scene.png")
    assert row["image"]["path"] == row["image_key"].split("#")[1] and row["image_key"].startswith("data/00002.parquet#")
    assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["sha256"]


def test_the_summary_adds_up_the_model_warm_ups_the_blocks_report(tmp_path, monkeypatch, manifest):
    """A compiled model's first calls of each shape are warm-ups: the blocks report them and the summary sums
    their count and seconds (to the millisecond)."""
    from unclip_batch import writer

    block_counts = writer.block_counts

    def warming(rows):
        return {**block_counts(rows), "warm_ups": 1, "warm_up_s": 0.1234567}

    monkeypatch.setattr(writer, "block_counts", warming)
    summary = run_inline(monkeypatch, tmp_path / "out", manifest, compile="default")
    blocks = summary["warm_up"]["calls"]
    assert blocks >= 3
    assert summary["warm_up"] == {"compile": "default", "calls": blocks, "s": round(blocks * 0.1234567, 3)}


def test_a_storage_outage_mid_job_stops_it_as_one_saying_how_to_resume(tmp_path, monkeypatch, manifest):
    from unclip_batch import pipeline
    from unclip_batch.errors import StorageUnavailable

    def outage(batch, *args, **kwargs):
        try:
            raise StorageUnavailable("writing 4 objects under out kept failing for 60s (OSError: down); rerun")
        except StorageUnavailable as exc:  # as Ray hands a task's error on: wrapped
            raise RuntimeError("ray.exceptions.RayTaskError: a long remote traceback") from exc

    monkeypatch.setattr(pipeline, "write_stage", outage)
    with pytest.raises(StorageUnavailable) as stopped:
        run_inline(monkeypatch, tmp_path / "out", manifest)
    assert str(stopped.value) == "writing 4 objects under out kept failing for 60s (OSError: down); rerun"


def test_a_rerun_takes_the_earlier_summary_away_first_so_a_stopped_rerun_is_not_complete(
    tmp_path, monkeypatch, manifest
):
    from helpers import write_manifest

    from unclip_batch import pipeline
    from unclip_batch.errors import Interrupted

    run_inline(monkeypatch, tmp_path / "out", manifest)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    changed = write_manifest(tmp_path / "in" / "m.parquet", [{**ROWS[0], "prompt": "a blue circle"}, *ROWS[1:]])

    def stops(batch, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_stage", stops)
    with pytest.raises(Interrupted):
        run_inline(monkeypatch, tmp_path / "out", changed, redo_changed=True)
    assert not (tmp_path / "out" / "_SUCCESS").exists()  # its rows are not all as the manifest says now


def test_the_jobs_storage_options_reach_its_manifests_and_output(tmp_path, monkeypatch):
    """A store that opens only with the job's options (a token, here): every read and write of the job,
    from the manifest's footer to the summary, is given them."""
    import io
    import uuid

    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.memory import MemoryFileSystem
    from helpers import inline_pipeline

    from unclip_batch.job import run_job
    from unclip_batch.storage import Location

    class Guarded(MemoryFileSystem):
        protocol = "guarded"
        store, pseudo_dirs = {}, [""]

        def __init__(self, *args, token=None, **kwargs):
            if token != "t0ken":
                raise PermissionError("this store wants its token")
            super().__init__(*args, **kwargs)

    fsspec.register_implementation("guarded", Guarded, clobber=True)  # a protocol of this test's own
    root, options = f"guarded://bucket-{uuid.uuid4().hex}", {"token": "t0ken"}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([r for r in ROWS if r["id"].startswith("r")]), buffer)
    Location(f"{root}/in", options).write("m.parquet", buffer.getvalue())
    inline_pipeline(monkeypatch)
    config = job([f"{root}/in/m.parquet"], f"{root}/out", model="null", rows_per_shard=4, storage_options=options)
    summary = run_job(config)
    assert summary["status"] == "complete" and summary["images_total"] == 10
    with pytest.raises(PermissionError):
        Location(f"{root}/out").files("metadata")  # without the token, nothing
    out = Location(f"{root}/out", options)
    assert out.files("metadata") == ["metadata/00000.parquet", "metadata/00001.parquet"]


def test_a_row_changed_in_a_shard_a_stopped_run_left_unfinished_is_refused_too(tmp_path, monkeypatch, manifest):
    """The check for changed rows covers every shard with records, finished (stats) or not."""
    from helpers import inline_pipeline, write_manifest

    from unclip_batch import pipeline
    from unclip_batch.errors import Interrupted, SetupError
    from unclip_batch.job import run_job

    inline_pipeline(monkeypatch)
    real = stop_at_the_third_write(monkeypatch, KeyboardInterrupt)
    with pytest.raises(Interrupted):
        run_job(job([manifest], tmp_path / "out", model="null", rows_per_shard=100, batch_size=1))
    assert not (tmp_path / "out" / "stats").exists() and (tmp_path / "out" / "metadata").exists()
    monkeypatch.setattr(pipeline, "write_stage", real)
    changed = write_manifest(tmp_path / "in" / "m.parquet", [{**ROWS[0], "prompt": "a blue circle"}, *ROWS[1:]])
    with pytest.raises(SetupError, match="1 manifest rows changed .*first: r0"):
        run_job(job([changed], tmp_path / "out", model="null", rows_per_shard=100, batch_size=1))
