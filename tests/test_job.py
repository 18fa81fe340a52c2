"""The driver's sink (job.Sinks) on plain rows, without Ray: each row recorded exactly once."""

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import job

from unclip_batch.job import Sinks


def image_row(row_id, k, n, row=0, code=""):
    return dict(
        id=row_id,
        k=k,
        num_images=n,
        row=row,
        task="generate",
        image_key=f"images/{row_id}/{k}.png",
        prompt="p",
        negative_prompt="",
        image="",
        mask="",
        seed=7 + k,
        width=8,
        height=8,
        sha256="s",
        clip_score=0.25 if k else float("nan"),  # NaN between stages = no score
        embedding=b"",
        num_inference_steps=4,
        guidance_scale=4.0,
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
        load_s=0.0,
        model_s=0.0,
        write_s=0.0,
        input_hash="h",
        code=code,
        stage="predict" if code else "",
        message="boom" if code else "",
    )


def test_a_block_delivered_twice_records_each_row_once(tmp_path):
    lookup = pa.table({"_manifest": ["m"] * 3, "_manifest_row": [0, 1, 2]})
    sinks = Sinks(job(["m"], tmp_path), lookup, "tiny", total=3)
    block = [image_row("a", 0, 2), image_row("a", 1, 2), image_row("b", -1, 1, row=1, code="model_error")]
    sinks.add(block)
    sinks.add(block)  # Ray retried the task that made it and delivered its block again
    # A row whose first image arrives twice before its second: recorded once, with both images.
    sinks.add([image_row("c", 0, 2, row=2)])
    sinks.add([image_row("c", 0, 2, row=2), image_row("c", 1, 2, row=2)])
    sinks.add([image_row("c", 1, 2, row=2)])
    sinks.close()
    metadata = pq.read_table(tmp_path / "metadata")
    assert set(zip(metadata["k"].to_pylist(), metadata["clip_score"].to_pylist())) == {(0, None), (1, 0.25)}
    assert set(metadata["embedding"].to_pylist()) == {None}  # not asked for
    assert sorted(zip(metadata["id"].to_pylist(), metadata["k"].to_pylist())) == [
        ("a", 0),
        ("a", 1),
        ("c", 0),
        ("c", 1),
    ]
    assert pq.read_table(tmp_path / "errors")["id"].to_pylist() == ["b"]
    assert (sinks.succeeded, sinks.images, dict(sinks.codes)) == (2, 4, {"model_error": 1})


def test_progress_says_rows_failures_rate_and_time_left(tmp_path, caplog, monkeypatch):
    import logging

    from unclip_batch import job as job_module

    lookup = pa.table({"_manifest": ["m"] * 4, "_manifest_row": [0, 1, 2, 3]})
    sinks = Sinks(job(["m"], tmp_path), lookup, "tiny", total=4)
    clock = iter([110.0])  # the first two rows arrive 10 s after the sink started
    monkeypatch.setattr(job_module.time, "perf_counter", lambda: next(clock, 110.0))
    sinks.clock = sinks.last_report = 100.0
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        sinks.add([image_row("a", 0, 1), image_row("b", -1, 1, row=1, code="model_error")])
    assert "progress: 2/4 rows done (1 failed), 1 images, 0.10 images/s, about 10s left" in caplog.text
    assert [job_module._duration(s) for s in (42, 200, 3900)] == ["42s", "3m20s", "1h05m"]


def test_a_terminal_gets_one_bar_with_rows_images_rate_and_failures(tmp_path, caplog):
    import io
    import logging

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lookup = pa.table({"_manifest": ["m"] * 4, "_manifest_row": [0, 1, 2, 3]})
    screen = Terminal()
    sinks = Sinks(job(["m"], tmp_path), lookup, "tiny", total=4, bar_file=screen)
    with caplog.at_level(logging.INFO, logger="unclip_batch.job"):
        sinks.add([image_row("a", 0, 1), image_row("b", -1, 1, row=1, code="model_error")])
        assert "2/4" in screen.getvalue() and "1 images" in screen.getvalue() and "1 failed" in screen.getvalue()
        assert "progress:" not in caplog.text  # on a terminal the bar replaces the periodic lines
        sinks.close()
    assert "progress: 2/4 rows done (1 failed)" in caplog.text  # the last word also goes to the log
    quiet = Terminal()
    Sinks(job(["m"], tmp_path, progress_bar=False), lookup, "tiny", total=4, bar_file=quiet).close()
    assert quiet.getvalue() == ""  # --quiet: no bar even on a terminal
