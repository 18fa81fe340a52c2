"""A real Ray cluster started with ``ray start --head``: the jobs/ entry point submitted to it, and the
CLI joining it with --address."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import cli_flags, images_of, kill_processes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
STEPS = cli_flags()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    # A short temp dir of its own: Unix socket paths are limited to ~107 bytes, and this cluster's
    # address file must not be found by other tests' ray.init().
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    ray_temp = os.path.join(temp, "ray")  # where a bare ray.init() with RAY_TMPDIR=temp looks for a cluster
    # Token authentication, as Ray 2.60 clusters have by default: clients present the cluster's token.
    # Only subprocesses get it: Ray caches auth settings per process, and this one runs a local Ray too.
    # The venv's bin goes first on PATH, as a cluster image has its own python first.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for _attempt in range(3):  # a port found free may be taken before Ray binds it: try other ports
        # Every listening port Ray would otherwise take at a fixed default (6379, 8265, 10001 ...) is ours.
        port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
        started = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}",
                f"--temp-dir={ray_temp}",
                "--disable-usage-stats",
            ],
            timeout=180,
            env=env,
            capture_output=True,
            text=True,
        )
        if started.returncode == 0:
            break
        kill_processes((temp,))
    else:
        pytest.fail(f"ray start failed three times: {started.stderr[-2000:]}")
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "temp": temp}
    finally:  # this cluster's processes only (all name its temp dir): `ray stop` would stop every Ray here
        kill_processes((temp,))
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submission_cli_address_and_a_ray_of_its_own(cluster, tmp_path):
    output = tmp_path / "submitted"
    # As the README says: ship this repository as the working dir, run the jobs/ entry point.
    submitted = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster["dashboard"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": ["tests", "out"], "env_vars": {"HF_HUB_OFFLINE": "1"}}),
            "--",
            "python",
            "jobs/run_job.py",
            "manifests/demo.parquet",
            "--output",
            str(output),
            "--model",
            "tiny",
            "--quiet",
            "--allow-failures",
            *STEPS,
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env=cluster["env"],
    )
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and re.search(r"Job '\S+' succeeded", logs), logs[-3000:]
    assert "succeeded              9" in logs
    summary = json.loads((output / "_SUCCESS").read_text())
    assert (summary["rows"]["succeeded"], summary["rows"]["failed"], summary["images"]) == (9, 1, 15)
    # The manifest and its relative image paths resolved inside the shipped working dir.
    manifests = pq.read_table(output / "metadata", columns=["manifest"]).column("manifest").unique().to_pylist()
    assert len(manifests) == 1 and "working_dir_files" in manifests[0]
    assert len(list((output / "images").rglob("*.png"))) == 15

    # Two CLI runs at once (the suite's time; neither waits on the other): one joins the cluster with
    # --address; one, a plain run beside the running cluster (where a bare ray.init() finds it, in Ray's
    # temp folder), must still get a Ray of its own, as the README promises.
    env = {**cluster["env"], "RAY_TMPDIR": cluster["temp"]}
    found = subprocess.run(
        [sys.executable, "-c", "import ray._private.utils as u; print(u.read_ray_address())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert cluster["address"].split(":")[1] in found.stdout, found.stdout + found.stderr  # there to be joined
    cli_output, own = tmp_path / "cli", tmp_path / "own"
    joined = cli(cli_output, ["--address", cluster["address"], "--model", "tiny"], cluster["env"])
    alone = cli(own, ["--model", "null"], env)  # about Ray, not pixels: no model cost
    for run in (joined, alone):
        log = run.communicate(timeout=400)[0]
        assert run.returncode == 0, log[-3000:]
    assert json.loads((cli_output / "_SUCCESS").read_text())["images"] == 15
    # Both runs on the cluster made the same images: the cluster changes where, not what.
    for png in (output / "images").rglob("*.png"):
        assert png.read_bytes() == (cli_output / png.relative_to(output)).read_bytes()
    assert len(images_of(own)) == 15


def cli(output, flags: list[str], env: dict) -> subprocess.Popen:
    """The demo manifest through the CLI, started (the caller waits)."""
    command = ["run", "manifests/demo.parquet", "--output", str(output), "--quiet", "--allow-failures"]
    return subprocess.Popen(
        [sys.executable, "-m", "unclip_batch.cli", *command, *flags, *STEPS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
    )
