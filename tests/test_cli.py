"""The command line as a user runs it: separate processes, exit codes, printed summaries."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST, write_manifest

REPO = Path(__file__).resolve().parent.parent


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "unclip_batch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def fast_flags():
    return ["--num-inference-steps", str(FAST["num_inference_steps"]),
            "--prior-num-inference-steps", str(FAST["prior_num_inference_steps"])]


def test_validate_reports_bad_rows(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "ok", "prompt": "p"}, {"id": "bad id", "prompt": "p"}, {"id": "n", "prompt": "p", "num_images": 0}])
    result = cli("validate", manifest)
    assert result.returncode == 1
    assert "3 rows: 1 valid, 2 invalid" in result.stdout
    assert "invalid_id: 1" in result.stdout and "invalid_num_images: 1" in result.stdout
    assert "row 1 id='bad id'" in result.stdout


def test_validate_demo_manifest_is_clean():
    result = cli("validate", "manifests/demo.parquet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 invalid" in result.stdout


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "no id"}], "no 'id' column"),
    ([{"id": "a", "num_images": "many"}], "'num_images' has type string"),
])
def test_bad_manifest_fails_fast_without_a_model(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    start = time.monotonic()
    result = cli("run", manifest, "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr
    assert time.monotonic() - start < 30  # no Ray, no model: seconds, not a job
    assert not (tmp_path / "out").exists()


def test_unknown_model_fails_fast(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    result = cli("run", manifest, "--output", str(tmp_path / "out"), "--model", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "could not be read" in result.stderr


@pytest.mark.slow
def test_run_on_s3_with_aws_environment(s3, tmp_path):
    """The README's S3 recipe: credentials and endpoint from the usual AWS variables, summary printed."""
    fs = s3.filesystem()
    fs.mkdir("cli-env")
    fs.put(str(REPO / "manifests" / "demo.parquet"), "cli-env/demo/demo.parquet")
    fs.put(str(REPO / "manifests" / "images") + "/", "cli-env/demo/images/", recursive=True)
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": s3.endpoint_url,
           "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}
    result = cli("run", "s3://cli-env/demo/demo.parquet", "--output", "s3://cli-env/out", "--quiet",
                 "--model", "tiny", *fast_flags(), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "succeeded              9" in result.stdout and "image_unreadable" in result.stdout
    summary = json.loads(fs.cat("cli-env/out/_SUCCESS"))
    assert (summary["rows"]["succeeded"], summary["rows"]["failed"], summary["images"]) == (9, 1, 15)
    assert len(fs.glob("cli-env/out/images/*/*.png")) == 15


def test_pickle_weights_are_refused_before_any_work(tmp_path):
    import shutil

    from unclip_batch.models import WEIGHTS

    shutil.copytree(WEIGHTS / "tiny", tmp_path / "model")
    unet = tmp_path / "model" / "kandinsky-2-2-decoder" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    result = cli("run", manifest, "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model"))
    assert result.returncode == 2
    assert "safetensors only" in result.stderr and "diffusion_pytorch_model.bin" in result.stderr
    assert not (tmp_path / "out").exists()
