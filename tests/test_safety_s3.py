"""The trust boundary (SECURITY.md) on a real S3 server and a real Ray: buckets an unset variable would have
named, glob characters in an output, and a canary secret searched for in everything Ray keeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli, cli_flags, job, write_manifest
from test_cluster import cluster  # noqa: F401 (the fixture, asked for by name)

from unclip_batch import plan
from unclip_batch.cli import main
from unclip_batch.job import run_job
from unclip_batch.storage import Location, Stores

pytestmark = pytest.mark.slow
CANARY = "canary-secret-0d9e71a4-never-print"


@pytest.fixture
def options_file(s3, tmp_path):
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(s3.storage_options))
    return f"@{path}"


def test_an_output_at_a_stores_root_removes_no_bucket(s3, options_file, tmp_path, capsys):
    """Item 2: `--output s3://` (an unset variable in "s3://${BUCKET}/run") with --overwrite removed the buckets
    named images, data, metadata ..."""
    fs = s3.filesystem()
    for bucket in ("images", "data"):
        fs.mkdir(bucket)
        fs.pipe(f"{bucket}/keep.png", b"someone's")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    for output in ("s3://", "s3:///", "s3://images/.."):
        assert main(["run", manifest, "--output", output, "--overwrite", "--model", "null"]) == 2
        assert "names no folder" in capsys.readouterr().err
    fs.invalidate_cache()
    assert fs.cat("images/keep.png") == b"someone's" and fs.cat("data/keep.png") == b"someone's"


def test_glob_characters_in_an_s3_output_touch_only_that_folder(ray_local, s3, tmp_path):
    """Item 3: --overwrite of s3://b/exp[1] deleted all of s3://b/exp1; a job into run[1] read run1's stats."""
    fs = s3.filesystem()
    fs.mkdir("globs")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "red circle"} for i in range(3)])
    stores = Stores(s3.storage_options, ["s3://globs/"])
    first = run_job(job([manifest], "s3://globs/exp1", model="null", storage_options=s3.storage_options))
    assert first["rows"]["succeeded"] == 3
    fs.invalidate_cache()
    before = {p: fs.cat(p) for p in fs.find("globs/exp1")}
    literal = stores.location("s3://globs/exp[1]")
    assert plan.output_state(literal, "stats").stats == {}  # run1's stats are not this folder's
    summary = run_job(
        job([manifest], "s3://globs/exp[1]", model="null", overwrite=True, storage_options=s3.storage_options)
    )
    assert summary["rows"]["succeeded"] == 3 and summary["shards"]["finished_before"] == 0
    run_job(job([manifest], "s3://globs/exp[1]", model="null", overwrite=True, storage_options=s3.storage_options))
    fs.invalidate_cache()
    assert {p: fs.cat(p) for p in fs.find("globs/exp1")} == before
    assert sorted(p.split("exp[1]/", 1)[1] for p in fs.find("globs/exp[1]") if "/images/" in p) == [
        "images/r0/0.png",
        "images/r1/0.png",
        "images/r2/0.png",
    ]


def test_a_canary_secret_is_in_nothing_ray_keeps(s3, request, tmp_path, monkeypatch):
    """Item 5: a job on a real Ray cluster with Ray's export API on and the secret in the environment variable:
    the canary is in no file under the cluster's folder (logs, export events, session files), no output object,
    nothing the job printed, and no answer of Ray's state API."""
    monkeypatch.setenv("RAY_enable_export_api_write", "1")
    ray_cluster = request.getfixturevalue("cluster")
    fs = s3.filesystem()
    fs.mkdir("canary")
    fs.put(str(REPO / "manifests" / "demo.parquet"), "canary/in/demo.parquet")
    fs.put(str(REPO / "manifests" / "images") + "/", "canary/in/images/", recursive=True)
    options = {**s3.options("AKIACANARYKEY0001", CANARY), "token": CANARY}
    env = {
        **ray_cluster["env"],
        "UNCLIP_BATCH_STORAGE_OPTIONS": json.dumps(options),
        "RAY_ADDRESS": ray_cluster["address"],
    }
    run = ["run", "s3://canary/in/demo.parquet", "--output", "s3://canary/out", "--model", "null", *cli_flags()]
    result = cli(*run, env=env, timeout=600)
    assert result.returncode == 4, result.stderr[-3000:]  # the demo's last row fails on purpose
    fs.invalidate_cache()
    outputs = {p: fs.cat(p) for p in fs.find("canary/out")}
    assert len([p for p in outputs if p.endswith(".png")]) == 15
    files = {p: p.read_bytes() for p in Path(ray_cluster["temp"]).rglob("*") if p.is_file() and not p.is_symlink()}
    assert any("export_events" in str(p) for p in files), "Ray's export API wrote nothing to search"
    state = subprocess.run(
        [sys.executable, "-c", STATE_QUERY, ray_cluster["dashboard"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=ray_cluster["env"],
    )
    assert state.returncode == 0 and '"actors"' in state.stdout, state.stderr[-2000:]
    assert "UnclipPredictorOnBlocks" in state.stdout  # the answers cover the job's own actors and tasks
    searched = {**outputs, **{str(p): data for p, data in files.items()}}
    searched["stdout+stderr"] = (result.stdout + result.stderr).encode()
    searched["state API"] = state.stdout.encode()
    for needle in (CANARY, "AKIACANARYKEY0001"):
        for name, data in searched.items():
            assert needle.encode() not in data, f"{needle} found in {name}"


# Ray's state API, with every detail it gives, for the jobs, tasks and actors of the cluster.
STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_jobs, list_tasks
address = sys.argv[1]
answers = {
    "jobs": [str(j) for j in list_jobs(address=address, detail=True)],
    "tasks": [str(t) for t in list_tasks(address=address, detail=True, limit=10000)],
    "actors": [str(a) for a in list_actors(address=address, detail=True)],
}
print(json.dumps(answers))
"""


def test_legitimate_sources_still_work_with_the_jobs_credentials(ray_local, s3, tmp_path):
    """An s3:// source in another bucket of the job's store, with the job's credentials, and a relative one."""
    from helpers import png_bytes, scene

    fs = s3.filesystem()
    for bucket in ("src-a", "src-b"):
        fs.mkdir(bucket)
    fs.pipe("src-b/scene.png", png_bytes(scene()))
    fs.pipe("src-a/in/scene.png", png_bytes(scene()))
    rows = [
        {"id": "abs", "task": "variation", "image": "s3://src-b/scene.png"},
        {"id": "rel", "task": "variation", "image": "scene.png"},
        {"id": "local", "task": "variation", "image": "/etc/hostname"},  # a remote manifest naming a local file
    ]
    local = write_manifest(tmp_path / "m.parquet", rows)
    fs.put(local, "src-a/in/m.parquet")
    output = "s3://src-a/out"
    summary = run_job(job(["s3://src-a/in/m.parquet"], output, model="null", storage_options=s3.storage_options))
    assert summary["rows"]["succeeded"] == 2 and summary["errors_by_code"] == {"source_not_allowed": 1}
    assert Location("s3://src-a/out", s3.storage_options).files("images") == ["images/abs/0.png", "images/rel/0.png"]
