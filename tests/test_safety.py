"""The trust boundary (SECURITY.md), fast half: hostile manifests, outputs and options, each as the review of
issue 37 tried it, against the code alone (no Ray; SeaweedFS in test_safety_s3.py). A local HTTP server that
records every request stands in for an attacker's host."""

import http.server
import io
import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import png_bytes, scene, write_manifest
from PIL import Image

from unclip_batch import plan, storage
from unclip_batch.batches import rows_of, to_batch
from unclip_batch.cli import main
from unclip_batch.config import JobConfig
from unclip_batch.errors import ManifestError, SetupError
from unclip_batch.manifest import RESERVED_COLUMNS, read_manifests, validate
from unclip_batch.sources import SourcePolicy, load_sources
from unclip_batch.storage import Location, Stores

CANARY = "canary-5f1e9c2b-never-print"
REPO = Path(__file__).resolve().parent.parent


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request line and its headers; answers by path: /png a picture, /endless a body that
    never ends, /to-metadata a redirect to the cloud metadata address, anything else 404."""

    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(f"{self.requestline}\n{self.headers}")
        if self.path == "/png":
            data = png_bytes(scene())
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):  # 640 MB at most: bounded, and far past any cap the test sets
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def attacker():
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", Recorder.seen
    server.shutdown()
    server.server_close()


def load(policy, **row):
    base = {"id": "r", "task": "variation", "image": "", "mask": "", "width": 64, "height": 64}
    (out,) = rows_of(load_sources(to_batch([{**base, "code": "", "message": "", "stage": "", **row}]), policy))
    return out["code"], out["message"]


def job_policy(**more):
    """The job's options, with a token, bound to its own S3 store."""
    options = {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": CANARY, "token": CANARY}
    return SourcePolicy(Stores(options, ["s3://bucket/out"]), retry_for_s=5, **more)


# -- 1-3: nothing deleted or read outside the output ---------------------------------------------
def test_overwrite_refuses_a_folder_no_job_wrote_and_removes_nothing(tmp_path, capsys):
    """Item 1: `--output manifests --overwrite` and a user's folder holding images/, data/, metadata/, stats/."""
    mine = tmp_path / "mine"
    for name in ("images/a.png", "data/d.parquet", "metadata/m.parquet", "stats/s.json"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes(b"the user's")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    before = sorted(p for p in mine.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert main(["run", manifest, "--output", str(mine), "--model", "null", *extra]) == 2
        assert "no unclip-batch job wrote them" in capsys.readouterr().err
        assert sorted(p for p in mine.rglob("*")) == before
    # The project's own demo folder: its source images stay.
    demo = tmp_path / "manifests"
    (demo / "images").mkdir(parents=True)
    (demo / "images" / "red.png").write_bytes(png_bytes(scene()))
    assert main(["run", manifest, "--output", str(demo), "--model", "null", "--overwrite"]) == 2
    assert (demo / "images" / "red.png").exists()


@pytest.mark.parametrize("root", ["", "/", "s3://", "gs://", "s3:///", "file:///", "filecache::s3://b/x"])
def test_a_root_that_names_no_folder_is_refused(root, tmp_path, capsys):
    """Item 2: `--output /` worked in the current folder, `--output s3://` (an unset variable) removed buckets."""
    with pytest.raises(ValueError, match="names no folder"):
        Location(root)
    if root:
        manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
        assert main(["run", manifest, "--output", root, "--model", "null", "--overwrite"]) == 2
        assert "names no folder" in capsys.readouterr().err


@pytest.mark.parametrize("root", ["/data/../etc", "s3://b/./x", "s3://b/x/..", "s3://b/x://..", "s3://../x://b"])
def test_a_root_with_a_dot_part_is_refused_wherever_it_stands(root):
    with pytest.raises(ValueError, match="names no folder"):
        Location(root)


@pytest.mark.parametrize(
    ("root", "url"),
    [("run1", os.path.abspath("run1")), ("/XX/", "/XX"), ("s3://b/run/", "s3://b/run"), ("s3://b/x.y", "s3://b/x.y")],
)
def test_a_root_is_kept_absolute_and_without_its_trailing_slash(root, url):
    assert Location(root).url == url


def test_a_local_root_takes_no_storage_options():
    assert Location("/data/run", {"key": "k"}) == Location("/data/run")
    assert Location("s3://b/run", {"key": "k"}) != Location("s3://b/run")


@pytest.mark.parametrize("part", ["..", ".", "", "/etc/passwd", "a/../../b", "..\\x", "a\x00b"])
def test_paths_are_joined_only_below_the_root(part, tmp_path):
    with pytest.raises(ValueError, match="would not stay below"):
        Location(str(tmp_path)).path(part)


def test_glob_characters_in_an_output_are_literal(tmp_path):
    """Item 3: a job into run[1] read run1's stats and skipped its shards; --overwrite of exp[1] deleted exp1."""
    run1 = tmp_path / "run1"
    for name in ("shards/00000_stats.json", "metadata/00000.parquet", "images/a/0.png", "_job.json"):
        (run1 / name).parent.mkdir(parents=True, exist_ok=True)
        (run1 / name).write_text("{}")
    before = sorted(run1.rglob("*"))
    literal = Location(str(tmp_path / "run[1]"))
    assert plan.output_state(literal, "shards").stats == {} and literal.files("images") == []
    plan.clear_output(literal)
    literal.remove("images")
    literal.remove_files(["_job.json", "metadata/00000.parquet"])
    assert sorted(run1.rglob("*")) == before
    # and a folder really named run[1] is the job's own
    (tmp_path / "run[1]" / "images").mkdir(parents=True)
    (tmp_path / "run[1]" / "images" / "x.png").write_bytes(b"x")
    assert literal.files("images") == ["images/x.png"]
    literal.remove("images")
    assert not (tmp_path / "run[1]" / "images").exists() and sorted(run1.rglob("*")) == before


def test_replaced_images_are_deleted_only_under_the_outputs_images(tmp_path):
    """Item 3: deleting replaced images trusted `image_key` values read back from metadata."""
    from test_writer import image_row

    from unclip_batch.manifest import manifest_files
    from unclip_batch.writer import commit_shard, write_part

    victim = tmp_path / "home" / "x"
    victim.parent.mkdir()
    victim.write_text("keep me")
    out = tmp_path / "out"
    (out / "images" / "a").mkdir(parents=True)
    (out / "images" / "a" / "1.png").write_bytes(b"an image of ours")
    (out / "metadata").mkdir()
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    keys = [str(victim), "../home/x", "images/../../home/x", "images/a/1.png"]
    old = [{"id": "a", "manifest": manifest, "manifest_row": 0, "image_key": k, "k": i} for i, k in enumerate(keys)]
    pq.write_table(pa.Table.from_pylist(old), out / "metadata" / "00000.parquet")
    (shard,) = plan.plan_shards(manifest_files([manifest]), 10)
    # The row is redone with one image: its earlier images 1-3 are replaced, and their keys deleted.
    write_part([image_row(0, id="a")], shard="00000", first=0, offset=0, block=0, output=Location(str(out)))
    parts = ["_parts/00000/0.parquet"]
    commit_shard(shard, parts, output=Location(str(out)), stores=Stores(None), format="files", model="tiny")
    assert victim.read_text() == "keep me"
    assert not (out / "images" / "a" / "1.png").exists()  # a key a job writes, replaced: removed
    assert (out / "images" / "a" / "0.png").exists()


# -- 4, 6: credentials go only to the job's own stores; URLs redacted ----------------------------
@pytest.mark.parametrize(
    "url",
    [
        "webhdfs://{host}/x.png",
        "ftp://{host}/x.png",
        "hf://datasets/x/y.png",
        "filecache::s3://bucket/x.png",
        "memory://x.png",
        "sftp://{host}/x.png",
    ],
)
def test_other_protocols_are_the_rows_error_and_reach_nothing(url, attacker):
    host, seen = attacker
    code, message = load(job_policy(), image=url.format(host=host))
    assert code == "source_not_allowed" and CANARY not in message
    assert seen == []


def test_web_sources_get_no_credentials_and_no_metadata_address(attacker):
    host, seen = attacker
    assert load(job_policy(), image=f"http://{host}/png") == ("", "")
    assert len(seen) == 1 and CANARY not in seen[0] and "Authorization" not in seen[0]
    for url in ("http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/x", "http://[fe80::1]/x"):
        code, message = load(job_policy(), image=url)
        assert code == "source_not_allowed", message
    code, message = load(job_policy(), image=f"http://{host}/to-metadata")  # a redirect is checked like the first
    assert code == "source_not_allowed" and "169.254.169.254" in message
    code, message = load(job_policy(), image=f"http://user:{CANARY}@{host}/x.png?X-Amz-Signature={CANARY}")
    assert code == "image_unreadable" and CANARY not in message and "?..." in message


def test_the_jobs_options_go_to_its_own_store_alone():
    options = {"endpoint_url": "http://s3.internal:9000", "key": "k", "secret": CANARY}
    stores = Stores(options, ["s3://bucket/out", "/local/manifests"])
    assert stores.location("s3://other/x.png")._options == options  # the job's store: its credentials
    assert stores.location("s3a://other/x.png")._options == options
    for url in ("gs://b/x.png", "https://example.com/x.png", "/tmp/x.png", "memory://x"):
        assert stores.location(url)._options == {}
    for shown in (repr(stores), repr(stores.location("s3://bucket/out")), str(stores.location("s3://b/o"))):
        assert CANARY not in shown
    config = JobConfig(manifests=("m.parquet",), output="s3://b/out", storage_options=options)
    assert CANARY not in repr(config)


def test_urls_are_redacted():
    assert storage.redact("https://u:pw@h.example/a/b.png?X-Amz-Signature=s") == "https://***@h.example/a/b.png?..."
    assert storage.redact("s3://bucket/a b.png") == "s3://bucket/a b.png"
    assert storage.redact("/local/path?.png") == "/local/path?.png"
    # A password holding '@', a path of several folders, another URL inside the query: nothing of them shows.
    assert storage.redact("https://user:p@ss@host.example/a/b/c.png") == "https://***@host.example/a/b/c.png"
    assert storage.redact("https://h.example/a/b?next=https://u:pw@x/y") == "https://h.example/a/b?..."


def test_a_remote_manifest_may_not_name_local_files(tmp_path):
    from unclip_batch.errors import RowError
    from unclip_batch.manifest import FIRST, FOLDER, ROW, SizeRule, parse_row

    record = {"id": "a", "task": "variation", "image": "/etc/passwd", ROW: 0, FIRST: True, FOLDER: "s3://b/m"}
    with pytest.raises(RowError, match="is a local path, and this row's manifest is not on the local disk"):
        parse_row(record, {}, SizeRule(64, 8, 1024))
    relative = parse_row({**record, "image": "images/a.png"}, {}, SizeRule(64, 8, 1024))
    assert relative.image == "s3://b/m/images/a.png"
    local = parse_row({**record, FOLDER: str(tmp_path)}, {}, SizeRule(64, 8, 1024))  # a local manifest may
    assert local.image == "/etc/passwd"


# -- 5: secrets stay in their store --------------------------------------------------------------
def test_secrets_on_the_command_line_are_refused_and_never_echoed(tmp_path, capsys, monkeypatch):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    base = ["run", manifest, "--output", str(tmp_path / "out"), "--model", "null"]
    for options in (
        {"key": "AKIA", "secret": CANARY},
        {"token": CANARY},
        {"client_kwargs": {"aws_secret_access_key": CANARY}},
        {"account_key": CANARY},
    ):
        with pytest.raises(SystemExit) as exit:
            main([*base, "--storage-options", json.dumps(options)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "secrets are not taken on the command line" in err and CANARY not in err
    with pytest.raises(SystemExit) as exit:
        main([*base, "--storage-options", f'{{"secret": "{CANARY}"'])  # malformed: argparse echoed it
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "not valid JSON" in err and CANARY not in err
    monkeypatch.setenv("UNCLIP_BATCH_STORAGE_OPTIONS", f'{{"secret": "{CANARY}"')
    assert main(["validate", manifest, "--model", "null"]) == 2
    err = capsys.readouterr().err
    assert "UNCLIP_BATCH_STORAGE_OPTIONS is not valid JSON" in err and CANARY not in err


def test_options_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from unclip_batch.cli import build_parser, config_from_args

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    secret = tmp_path / "storage.json"
    secret.write_text(json.dumps({"endpoint_url": "http://h:1", "key": "k", "secret": CANARY}))
    args = build_parser().parse_args(["run", manifest, "-o", "s3://b/o", "--storage-options", f"@{secret}"])
    assert config_from_args(args).storage_options["secret"] == CANARY
    args = build_parser().parse_args(["run", manifest, "-o", "s3://b/o", "--storage-options", '{"anon": true}'])
    assert config_from_args(args).storage_options == {"anon": True}  # options without secrets: fine inline
    monkeypatch.setenv("UNCLIP_BATCH_STORAGE_OPTIONS", json.dumps({"secret": CANARY}))
    args = build_parser().parse_args(["run", manifest, "-o", "s3://b/o"])
    assert config_from_args(args).storage_options == {"secret": CANARY}


def test_no_operator_argument_exports_a_credential():
    """Ray Data exports its operators' arguments, dataclasses as dicts (sanitize_for_struct): the job's
    arguments hold Locations and Stores, which export as their redacted names."""
    from ray.data._internal.metadata_exporter import sanitize_for_struct

    from unclip_batch.manifest import SizeRule

    stores = Stores({"key": "k", "secret": CANARY}, ["s3://b/out"])
    work = plan.Work(
        output=stores.location("s3://b/out"), stores=stores, defaults={}, size=SizeRule(64, 8, 1024), batch_size=4
    )
    exported = json.dumps(
        sanitize_for_struct({"work": work, "policy": SourcePolicy(stores), "stores": stores}), default=str
    )
    assert CANARY not in exported and "s3://b/out" in exported


# -- 7, 8: rows that stop or exhaust the job ------------------------------------------------------
def test_a_permanent_store_error_is_the_rows_not_an_outage():
    """Item 7: an invalid bucket name (botocore's ParamValidationError) was retried, then exit 3 every rerun."""
    start = time.monotonic()
    code, message = load(job_policy(), image="s3://Bad_Bucket!/x.png")
    assert code == "image_unreadable" and "ParamValidationError" in message
    assert time.monotonic() - start < 5  # not retried for the policy's 5 s


def test_a_failure_after_decoding_is_the_rows_error(tmp_path, monkeypatch):
    from PIL import ImageOps

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(scene()))

    def broken(image):
        raise OSError("EXIF says nonsense")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert load(SourcePolicy(), image=str(path))[0] == "image_invalid"
    monkeypatch.undo()
    monkeypatch.setattr("unclip_batch.sources._rgb", lambda image, size: 1 / 0)
    assert load(SourcePolicy(), image=str(path))[0] == "image_invalid"


def test_sources_are_read_up_to_a_cap(tmp_path, attacker):
    """Item 8: an endless HTTP body, /dev/zero or a huge object exhausted the worker."""
    host, _ = attacker
    capped = SourcePolicy(max_bytes=1 << 20)
    start = time.monotonic()
    code, message = load(capped, image=f"http://{host}/endless")
    assert code == "image_too_large" and "--max-source-bytes" in message and time.monotonic() - start < 20
    assert load(capped, image="/dev/zero")[0] == "image_unreadable"  # not a regular file
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(scene()) + b"\0" * (2 << 20))
    assert load(capped, image=str(big))[0] == "image_too_large"
    assert load(SourcePolicy(), image=str(big))[0] == ""  # under the default cap it is an image as ever


def test_only_allowed_image_formats_are_decoded(tmp_path):
    eps = tmp_path / "a.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    code, message = load(SourcePolicy(), image=str(eps))
    assert code == "image_invalid" and "PNG, JPEG" in message
    for fmt in ("JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        path = tmp_path / f"a.{fmt.lower()}"
        buffer = io.BytesIO()
        scene().save(buffer, format=fmt)
        path.write_bytes(buffer.getvalue())
        assert load(SourcePolicy(), image=str(path)) == ("", ""), fmt
    assert Image.open(io.BytesIO(png_bytes(scene()))).format == "PNG"


# -- 9: silent collisions -------------------------------------------------------------------------
def test_ids_equal_but_for_case_are_duplicates(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p"} for i in ("Apple", "apple", "APPLE", "b")])
    (valid, errors), *_ = list(validate(read_manifests([path]), {}, plan.SizeRule(64, 8, 1024)))
    assert [r.id for r in valid] == ["Apple", "b"]
    assert [(e["id"], e["code"]) for e in errors] == [("apple", "duplicate_id"), ("APPLE", "duplicate_id")]
    from unclip_batch.manifest import id_digests

    digests = id_digests(pa.array(["Apple", "apple", "b"]))
    assert digests[0] == digests[1] != digests[2]  # the job's scan, in tasks, agrees


@pytest.mark.parametrize("column", ["clip_score", "embedding", "candidate", "source_image", "sha256", "k"])
def test_output_columns_cannot_be_shadowed(column, tmp_path):
    assert column in RESERVED_COLUMNS
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", column: 1}])
    with pytest.raises(ManifestError, match="reserved for the output"):
        read_manifests([path])


def test_reserved_columns_are_every_output_column_that_is_not_a_manifest_column():
    from unclip_batch.manifest import KNOWN_COLUMNS
    from unclip_batch.writer import ERROR_SCHEMA, METADATA_SCHEMA

    written = set(METADATA_SCHEMA.names) | set(ERROR_SCHEMA.names) | {"manifest", "manifest_row", "source_image"}
    assert written - set(KNOWN_COLUMNS) <= set(RESERVED_COLUMNS)
    assert not set(RESERVED_COLUMNS) & set(KNOWN_COLUMNS)


# -- 10: model integrity --------------------------------------------------------------------------
def test_model_files_are_copied_only_into_the_cache(tmp_path, monkeypatch):
    import fsspec

    from unclip_batch.models import sync_to_cache

    monkeypatch.setenv("UNCLIP_BATCH_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.pipe("/models/k/unet/config.json", b"{}")
    first = sync_to_cache(Location("memory://models/k"))
    assert (Path(first) / "unet" / "config.json").read_bytes() == b"{}"
    memory.pipe("/models/k/unet/config.json", b'{"changed": 1}')  # new weights under the same URL: a new copy
    second = sync_to_cache(Location("memory://models/k"))
    assert second != first and (Path(second) / "unet" / "config.json").read_bytes() == b'{"changed": 1}'
    evil = Location("memory://models/evil")
    memory.pipe("/models/evil/unet/config.json", b"{}")
    monkeypatch.setattr(Location, "relative", lambda self, path: "../../outside.json")
    with pytest.raises(ValueError, match="outside the model's folder"):
        sync_to_cache(evil)
    assert not list(tmp_path.rglob("outside.json"))
    memory.rm("/models", recursive=True)


def test_a_resume_on_other_weights_is_refused(tmp_path, monkeypatch):
    import shutil

    from unclip_batch.job import run_job
    from unclip_batch.models import describe_model
    from unclip_batch.writer import write_json

    monkeypatch.setenv("UNCLIP_BATCH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "tiny"
    shutil.copytree(REPO / "unclip_batch" / "weights" / "tiny", model)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "red circle"}])
    config = JobConfig(manifests=(manifest,), output=str(tmp_path / "out"), model=str(model), device="cpu")
    spec, info = describe_model(str(model))
    assert info.weights and describe_model(str(model))[1].weights == info.weights
    record = plan.job_record(spec.spec, {**info.defaults}, 16, weights=info.weights)
    weights = next(model.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # retrained, same layout
    write_json(Location(config.output), plan.JOB_RECORD, record)
    with pytest.raises(SetupError, match="other weights"):
        run_job(config)


# -- deployment -----------------------------------------------------------------------------------
def test_the_report_page_forbids_scripts_and_remote_loads(tmp_path, attacker):
    from unclip_batch import report

    host, seen = attacker
    (tmp_path / "metadata").mkdir()
    row = {
        "id": "r0",
        "k": 0,
        "task": "variation",
        "prompt": "p",
        "mask": "",
        "seed": 1,
        "image_key": "images/r0/0.png",
    }
    hostile = [
        {**row, "image": f"webhdfs://{host}/x.png"},
        {**row, "id": "r1", "image": f"http://{host}/png?sig={CANARY}"},
        {**row, "id": "r2", "image": "/etc/hostname", "image_key": "../../../etc/hostname"},
    ]
    pq.write_table(pa.Table.from_pylist(hostile), tmp_path / "metadata" / "00000.parquet")
    report.write_report(Location(str(tmp_path)), Stores({"token": CANARY}, [str(tmp_path)]))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page and "script-src" not in page
    assert CANARY not in page and "../../../etc/hostname" not in page
    assert [line.split("\n")[0] for line in seen] == ["GET /png?sig=canary-5f1e9c2b-never-print HTTP/1.1"]
    assert CANARY not in seen[0].split("\n", 1)[1]  # the URL's own query is the user's, no credential is added


def test_the_rayjob_pods_run_without_privilege():
    import yaml

    spec = yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}


def test_security_md_names_what_is_trusted():
    text = (REPO / "SECURITY.md").read_text()
    for words in ("Trusted", "Not trusted", "manifest", "output folder", "Reporting"):
        assert words in text
    assert os.path.exists(REPO / "SECURITY.md")
