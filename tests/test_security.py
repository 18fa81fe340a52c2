"""Hostile manifests cannot write outside --output; credentials never leak; S3 auth failures stop a
job before any work."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import cli, cli_flags, job, kill_processes, write_manifest

from unclip_batch.errors import ManifestError, SetupError
from unclip_batch.job import run_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
HOSTILE_IDS = [
    "..",
    ".",
    "../escape",
    "../../etc/passwd",
    "a/../../b",
    "..\\..\\win",
    "a\\b",
    "~root",
    "x\x00y",
    "line\nbreak",
    "$(touch pwned)",
    "a b",
    "%2e%2e",
    "images/../..",
    "",
    "\u2215etc",
    ".hidden",
    "a" * 129,
]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_no_manifest_writes_outside_the_output(ray_local, tmp_path):
    jail = tmp_path / "jail"
    hostile = HOSTILE_IDS + [str(tmp_path / "abs")]  # an absolute path of this test's own, checked below
    manifest = write_manifest(
        jail / "m.parquet",
        [{"id": i, "prompt": "p"} for i in hostile] + [{"id": "a..b", "prompt": "p"}, {"id": "ok", "prompt": "p"}],
    )
    before = files_under(tmp_path)
    summary = run_job(job([manifest], jail / "out"))
    new = files_under(tmp_path) - before
    assert new and all(f.startswith("jail/out/") for f in new), sorted(new)
    assert summary["errors_by_code"] == {"invalid_id": len(hostile)}
    assert {f for f in new if f.startswith("jail/out/images/")} == {
        "jail/out/images/a..b/0.png",
        "jail/out/images/ok/0.png",
    }
    assert not (tmp_path / "abs").exists() and not (tmp_path / "escape").exists()


def test_credentials_never_appear_in_output_or_logs(s3, tmp_path):
    key, secret = "AKIACANARY7731KEY", "canary-secret-5f1e9c2b-never-print"
    fs = s3.filesystem()
    fs.mkdir("creds")
    fs.put(str(REPO / "manifests" / "demo.parquet"), "creds/in/demo.parquet")
    fs.put(str(REPO / "manifests" / "images") + "/", "creds/in/images/", recursive=True)
    options = tmp_path / "storage.json"  # the options file: secrets never on a command line
    options.write_text(json.dumps(s3.options(key, secret)))
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    try:
        result = cli(
            "run",
            "s3://creds/in/demo.parquet",
            "--output",
            "s3://creds/out",
            "--model",
            "null",
            "--storage-options",
            f"@{options}",
            *cli_flags(),
            env={"RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        assert result.returncode == 4, result.stderr[-3000:]  # the demo's last row fails on purpose
        outputs = {p: fs.cat(p) for p in fs.find("creds/out")}
        assert len([p for p in outputs if p.endswith(".png")]) == 15
        logs = {
            p: p.read_bytes()
            for p in Path(ray_tmp).rglob("*")
            if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")
        }
        assert logs, "no Ray logs were found to search"
        for needle in (key, secret):
            assert needle not in result.stdout + result.stderr
            for name, data in {**outputs, **{str(k): v for k, v in logs.items()}}.items():
                assert needle.encode() not in data, f"{needle} found in {name}"
    finally:
        kill_processes((ray_tmp,))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def locked_s3(tmp_path_factory):
    """S3 with identities: an admin, and a reader that may read the 'inbox' bucket and nothing else."""
    from seaweedfs import SeaweedFS

    identities = [
        {
            "name": "admin",
            "credentials": [{"accessKey": "admin-key", "secretKey": "admin-secret"}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "reader",
            "credentials": [{"accessKey": "reader-key", "secretKey": "reader-secret"}],
            "actions": ["Read:inbox", "List:inbox"],
        },
    ]
    with SeaweedFS(tmp_path_factory.mktemp("locked"), identities=identities) as server:
        fs = server.filesystem(server.admin_options())
        fs.mkdir("inbox")
        fs.mkdir("outbox")
        fs.put(str(REPO / "manifests" / "demo.parquet"), "inbox/demo.parquet")
        yield server


def test_wrong_secret_fails_at_start_and_writes_nothing(ray_local, locked_s3):
    wrong = locked_s3.options("admin-key", "not-the-secret")
    with pytest.raises(ManifestError, match="access denied|could not be read"):
        run_job(job(["s3://inbox/demo.parquet"], "s3://outbox/wrong", storage_options=wrong))
    assert locked_s3.filesystem(locked_s3.admin_options()).find("outbox") == []


def test_read_only_identity_is_refused_before_model_work(ray_local, locked_s3):
    reader = locked_s3.options("reader-key", "reader-secret")
    with pytest.raises(SetupError, match="cannot write to output s3://outbox/denied"):
        run_job(job(["s3://inbox/demo.parquet"], "s3://outbox/denied", storage_options=reader))
    assert locked_s3.filesystem(locked_s3.admin_options()).find("outbox") == []


def test_image_puts_sign_with_the_jobs_credentials(locked_s3):
    """obstore signs the image PUTs itself: with the admin's keys they land; with the reader's they are
    refused at once as PermissionError (a job stops), not retried as an outage."""
    from unclip_batch import storage

    admin = locked_s3.filesystem(locked_s3.admin_options())
    storage.write_many(admin, {"outbox/signed/0.png": b"png"}, "outbox/signed", retry_for_s=5)
    assert admin.cat("outbox/signed/0.png") == b"png"
    reader = locked_s3.filesystem(locked_s3.options("reader-key", "reader-secret"))
    assert storage.s3_store(reader, "outbox") is not None
    with pytest.raises(PermissionError):
        storage.write_many(reader, {"outbox/denied/0.png": b"png"}, "outbox/denied", retry_for_s=60)
    assert admin.find("outbox/denied") == []
