"""Faults mid-job: a killed driver, a killed model actor, an S3 outage. Every row ends up exactly once,
and the images are the bytes an uninterrupted run makes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import cli_flags, images_of, job, kill_processes, make_sources, read_output, write_manifest

from unclip_batch.job import run_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# More steps than the other tests: the job must last long enough to be killed in the middle.
STEPS = {"num_inference_steps": 6, "prior_num_inference_steps": 3}
WEBDATASET = ["--format", "webdataset", "--rows-per-shard", "12"]  # the reference's layout


@pytest.fixture(scope="module")
def workload(tmp_path_factory, ray_local):
    """A 36-row mixed manifest and the output of one uninterrupted run of it, in WebDataset shards of 12
    rows (the driver kill compares shard bytes; images_of reads a tar's images as any output's)."""
    folder = make_sources(tmp_path_factory.mktemp("faults"))
    kinds = [
        {"task": "generate", "prompt": "a red circle", "num_images": 2},
        {"task": "variation", "image": "img/scene.png"},
        {"task": "inpaint", "image": "img/scene2.png", "mask": "img/mask.png", "prompt": "blue"},
    ]
    rows = [{"id": f"row-{i:02d}", "seed": i, **kinds[i % 3]} for i in range(36)]
    manifest = write_manifest(folder / "m.parquet", rows)
    reference = folder / "reference"
    run_job(job([manifest], reference, defaults=STEPS, batch_size=4, format="webdataset", rows_per_shard=12))
    return manifest, reference


def assert_same_result(output: Path, reference: Path) -> None:
    metadata, errors = read_output(output)
    expected, _ = read_output(reference)
    assert errors is None
    keys = sorted(zip(metadata.column("id").to_pylist(), metadata.column("k").to_pylist()))
    assert keys == sorted(zip(expected.column("id").to_pylist(), expected.column("k").to_pylist()))
    assert len(set(keys)) == len(keys), "a row was recorded twice"
    assert images_of(output) == images_of(reference)
    for tar in sorted(output.glob("shards/*.tar")):  # the shards of a webdataset output, byte for byte
        assert tar.read_bytes() == (reference / "shards" / tar.name).read_bytes(), tar.name
    assert not (output / "_partial").exists(), "a half-written file was left behind"


def cli_run(manifest, output, env, extra=(), **popen):
    flags = cli_flags(STEPS)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unclip_batch.cli",
            "run",
            manifest,
            "--output",
            str(output),
            "--model",
            "tiny",
            "--batch-size",
            "4",
            "--flush-seconds",
            "1",
            "--quiet",
            *flags,
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )


def wait_for_first_shard(driver: subprocess.Popen, output: Path) -> None:
    """Until the running job has recorded its first rows (a metadata shard): the middle of the job."""
    deadline = time.monotonic() + 300
    while not list(output.glob("metadata/*.parquet")):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_driver_killed_mid_job_resumes_to_the_same_result(workload, tmp_path):
    manifest, reference = workload
    output = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # this run's own Ray, found again to clean up
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    driver = cli_run(manifest, output, env, extra=WEBDATASET, start_new_session=True)
    try:
        wait_for_first_shard(driver, output)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        kill_processes((ray_tmp,))
    assert not (output / "_SUCCESS").exists(), "the job finished before it could be killed"
    metadata, errors = read_output(output)
    assert errors is None
    recorded_before = len(set(metadata.column("id").to_pylist()))
    assert 0 < recorded_before < 36

    shutil.rmtree(ray_tmp, ignore_errors=True)
    # The rerun in this process, on the session's Ray (a Ray start less than another command: the suite's
    # time); the killed run's Ray is gone, as a killed driver's Ray is gone on a laptop.
    summary = run_job(
        job([manifest], output, defaults=STEPS, batch_size=4, format="webdataset", rows_per_shard=12, flush_every_s=1)
    )
    # Exactly the rows recorded before the kill were skipped, and only the rest computed.
    assert summary["rows"]["done_before"] == recorded_before
    assert summary["rows"]["succeeded"] == 36 - recorded_before
    assert summary["rows"]["total_succeeded"] == 36
    keys = [name.split(".")[0] for tar in sorted(output.glob("shards/*.tar")) for name in tarfile.open(tar).getnames()]
    assert len(keys) == 3 * 48 and len(set(keys)) == 48  # every sample once: png, json, txt
    assert_same_result(output, reference)


def test_sigterm_saves_finished_rows_and_says_how_to_resume(workload, tmp_path):
    """`kill`, `ray job stop` and Kubernetes stop a job with SIGTERM: one clear line, exit 143, rows kept.
    And a --quiet run says nothing else a user did not cause (no bar, no progress lines, no notices)."""
    manifest, _ = workload
    output = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # As on a fresh shell: the session's own Ray set RAY_AUTH_MODE in this process's environment.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_TMPDIR=ray_tmp, HF_HUB_OFFLINE="1")
    driver = cli_run(manifest, output, env)
    try:
        wait_for_first_shard(driver, output)
        driver.send_signal(signal.SIGTERM)
        log = driver.communicate(timeout=120)[0].decode()
    finally:
        kill_processes((ray_tmp,))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 128 + signal.SIGTERM, log[-3000:]
    saved = len(set(read_output(output)[0].column("id").to_pylist()))
    assert 0 < saved < 36 and not (output / "_SUCCESS").exists()
    assert f"interrupted (SIGTERM): {saved} rows saved by this run; rerun the same command to resume" in log
    assert "Traceback" not in log and "core_worker" not in log.split("interrupted")[-1]
    for noise in (
        "Token authentication is enabled",
        "requires torchvision",
        "Progress bars disabled",
        "progress:",
        "%|",
    ):
        assert noise not in log, f"{noise!r} reached the user:\n{log[-3000:]}"


def own_actors() -> list[psutil.Process]:
    """This test session's model actors: processes of the Ray this process started (its children), never
    another job's on the same machine."""
    return [p for p in psutil.Process().children(recursive=True) if "UnclipPredictor" in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_model_actor_killed_mid_batch(workload, tmp_path):
    manifest, reference = workload
    output = tmp_path / "out"
    killed, after = {}, []

    def kill_the_actor_once():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            images = len(list((output / "images").rglob("*.png"))) if (output / "images").exists() else 0
            if images >= 6:
                for actor in own_actors():
                    killed.update(pid=actor.pid, images=images)
                    actor.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.1)
        while time.monotonic() < deadline and not after:  # the actor that takes over
            after.extend(p.pid for p in own_actors() if p.pid != killed.get("pid"))
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_actor_once, daemon=True)
    killer.start()
    summary = run_job(job([manifest], output, defaults=STEPS, batch_size=4))
    killer.join(timeout=30)
    assert killed, "the actor finished before it could be killed"
    total = len(images_of(reference))
    assert killed["images"] < total, "the kill came after the last image"
    assert after, "no model actor took over after the kill"
    assert summary["rows"]["succeeded"] == 36 and summary["rows"]["failed"] == 0
    assert_same_result(output, reference)


@pytest.fixture
def own_s3(tmp_path, workload):
    """An S3 server of this test's own (to kill and restart), holding the workload's manifest and sources."""
    from seaweedfs import SeaweedFS

    manifest, _ = workload
    with SeaweedFS(tmp_path / "weed") as server:
        fs = server.filesystem()
        fs.mkdir("jobs")
        fs.put(manifest, "jobs/in/m.parquet")
        fs.put(str(Path(manifest).parent / "img") + "/", "jobs/in/img/", recursive=True)
        yield server


def kill_s3_after(server, images: int, down_s: float | None, metadata: bool = False):
    """In the background: once `images` PNGs (and, with ``metadata``, a metadata shard) are stored, kill
    the server; restart it after down_s. The thread's ``times`` records when each happened: "restarted" is
    when the new process was launched (the server cannot answer before it), not when start() saw it answer,
    which on a loaded machine can be many seconds after the job's own retries already got through."""
    fs = server.filesystem()
    times = {}

    def stored() -> bool:
        fs.invalidate_cache()  # s3fs caches listings: look again for real
        enough = len(fs.find("jobs/out/images")) >= images
        return enough and (not metadata or bool(fs.find("jobs/out/metadata")))

    def outage():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not stored():
            time.sleep(0.1)
        server.kill()
        times["killed"] = time.monotonic()
        if down_s is not None:
            time.sleep(down_s)
            times["restarted"] = time.monotonic()
            server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.times = times
    thread.start()
    return thread


def s3_images(server) -> dict[str, bytes]:
    fs = server.filesystem()
    return {p.split("/images/", 1)[1]: fs.cat(p) for p in sorted(fs.glob("jobs/out/images/*/*.png"))}


def test_s3_down_for_good_stops_the_job_whose_rerun_rides_out_a_short_outage(workload, own_s3, caplog, capfd):
    """Through the CLI, as a user meets it: storage gone for good stops the job with exit 3, one clear
    message, and every row finished before the outage kept. The rerun skips exactly those, computes the
    rest, and rides out a short outage of its own (one job less than a test each: the suite's time)."""
    _, reference = workload
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "HF_HUB_OFFLINE": "1",
        "UNCLIP_BATCH_STORAGE_OPTIONS": json.dumps(own_s3.storage_options),
    }
    command = ["s3://jobs/in/m.parquet", "s3://jobs/out"]
    # At the first stored metadata shard: rows are kept, and most of the job's work is still ahead.
    kill_s3_after(own_s3, images=1, down_s=None, metadata=True)
    try:
        stopped = cli_run(*command, env, extra=["--storage-retry-seconds", "3"])
        log = stopped.communicate(timeout=600)[0].decode()
    finally:
        kill_processes((ray_tmp,))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert stopped.returncode == 3, log[-3000:]
    assert "job stopped: object storage unavailable:" in log and "rerun the same command to resume" in log
    assert "Traceback" not in log and "UserCodeException" not in log, log[-3000:]
    message = log[log.index("job stopped: object storage unavailable:") :]
    assert "ray::" not in message and "Debug source" not in message, message  # ours, one line
    own_s3.start()
    fs = own_s3.filesystem()
    kept = len(set(pq.read_table("jobs/out/metadata", filesystem=fs).column("id").to_pylist()))
    assert 0 < kept < 36
    # The rerun runs in this process, on the session's Ray: the stopped run's actor is gone with its Ray.
    # Once it has stored an image of its own, the server goes away for 12 s: longer than the S3 clients'
    # own retries ride out (obstore's 10 s; s3fs rode out an 8-s outage unseen), so the job's must act.
    outage = kill_s3_after(own_s3, images=len(fs.find("jobs/out/images")) + 1, down_s=12)
    started = time.monotonic()
    summary = run_job(
        job(
            ["s3://jobs/in/m.parquet"],
            "s3://jobs/out",
            defaults=STEPS,
            batch_size=4,
            storage_options=own_s3.storage_options,
            storage_retry_s=90,
            flush_every_s=1,
        )
    )
    ended = time.monotonic()
    outage.join(timeout=60)
    assert started < outage.times.get("killed", ended) < ended, "the outage did not happen while the rerun ran"
    assert outage.times.get("restarted", ended) < ended, "the rerun ended before the server came back"
    rerun_log = caplog.text + "".join(capfd.readouterr())
    assert "retrying in" in rerun_log, "nothing was retried: the outage never touched the rerun"
    assert summary["rows"]["done_before"] == kept and summary["rows"]["succeeded"] == 36 - kept
    assert summary["rows"]["total_succeeded"] == 36 and summary["rows"]["total_failed"] == 0
    fs = own_s3.filesystem()  # a new client: s3fs caches listings, and the rerun added shards
    metadata = pq.read_table("jobs/out/metadata", filesystem=fs)
    keys = list(zip(metadata.column("id").to_pylist(), metadata.column("k").to_pylist()))
    assert len(keys) == len(set(keys)) == len(images_of(reference))
    assert s3_images(own_s3) == images_of(reference)


def test_worker_node_killed_mid_job(workload, tmp_path):
    """A 3-node cluster (ray.cluster_utils) in its own process; the model actor's node dies mid-job."""
    manifest, reference = workload
    output = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "tests" / "node_kill_job.py"),
                manifest,
                str(output),
                str(STEPS["num_inference_steps"]),
                str(STEPS["prior_num_inference_steps"]),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env=env,
        )
    finally:
        kill_processes((ray_tmp,))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "node_kill_report.json").read_text())
    assert report["killed"], "the node was not killed before the job ended"
    assert report["summary"]["rows"]["succeeded"] == 36
    assert_same_result(output, reference)
