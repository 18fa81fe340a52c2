"""The driver's progress (job.Progress) from block reports, without Ray."""

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
