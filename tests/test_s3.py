"""Manifests, sources and outputs on a real S3 server (SeaweedFS), through s3fs (image PUTs: obstore)."""

import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import box_mask, job, png_bytes, scene

from unclip_batch.job import run_job
from unclip_batch.storage import Stores

pytestmark = pytest.mark.slow


def put_manifest(fs, url, rows):
    buffer = io.BytesIO()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), buffer)
    fs.pipe(url, buffer.getvalue())


@pytest.fixture
def bucket(s3, request):
    fs = s3.filesystem()
    name = f"t-{request.node.name.lower().replace('_', '-')[:40]}"
    fs.mkdir(name)
    fs.pipe(f"{name}/in/img/scene.png", png_bytes(scene()))
    fs.pipe(f"{name}/in/img/mask.png", png_bytes(box_mask()))
    return fs, name


def test_s3_round_trip(ray_local, s3, bucket):
    fs, name = bucket
    put_manifest(
        fs,
        f"{name}/in/manifest.parquet",
        [
            {"id": "gen", "prompt": "a red circle", "num_images": 2},
            {"id": "var", "task": "variation", "image": "img/scene.png"},
            {
                "id": "inp",
                "task": "inpaint",
                "image": f"s3://{name}/in/img/scene.png",
                "mask": "img/mask.png",
                "prompt": "a blue square",
            },
            {"id": "gone", "task": "variation", "image": "img/missing.png"},
        ],
    )
    output = f"s3://{name}/out/run1"
    summary = run_job(job([f"s3://{name}/in/manifest.parquet"], output, storage_options=s3.storage_options))
    assert (summary["rows"]["succeeded"], summary["rows"]["failed"], summary["images"]) == (3, 1, 4)
    keys = sorted(p.split("/out/run1/", 1)[1] for p in fs.find(f"{name}/out/run1"))
    images = [k for k in keys if k.startswith("images/")]
    assert images == ["images/gen/0.png", "images/gen/1.png", "images/inp/0.png", "images/var/0.png"]
    assert "_SUCCESS" in keys and "_job.json" in keys
    assert json.loads(fs.cat(f"{name}/out/run1/_SUCCESS"))["status"] == "complete"
    metadata = pq.read_table(f"{name}/out/run1/metadata", filesystem=fs)
    errors = pq.read_table(f"{name}/out/run1/errors", filesystem=fs)
    assert sorted(metadata.column("id").to_pylist()) == ["gen", "gen", "inp", "var"]
    assert errors.column("code").to_pylist() == ["image_unreadable"]
    assert f"s3://{name}/in/img/missing.png" in errors.column("message")[0].as_py()
    # Resume on S3: nothing left, nothing rewritten.
    again = run_job(job([f"s3://{name}/in/manifest.parquet"], output, storage_options=s3.storage_options))
    assert again["rows"]["done_before"] == 4 and again["images"] == 0


def test_missing_bucket_fails_before_any_work(ray_local, s3):
    from unclip_batch.errors import ManifestError

    with pytest.raises(ManifestError, match="does not exist"):
        run_job(job(["s3://no-such-bucket/m.parquet"], "s3://no-such-bucket/out", storage_options=s3.storage_options))


def test_model_from_object_storage_is_copied_once_per_node(s3, tmp_path, monkeypatch):
    from unclip_batch.models import WEIGHTS, ModelSpec
    from unclip_batch.models.kandinsky22 import Kandinsky22

    fs = s3.filesystem()
    fs.mkdir("models")
    fs.put(str(WEIGHTS / "tiny") + "/", "models/tiny/", recursive=True)
    fs.pipe("models/tiny/kandinsky-2-2-decoder/unet/stray.bin", b"a pickle must never be copied")
    monkeypatch.setenv("UNCLIP_BATCH_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec.parse("s3://models/tiny")
    stores = Stores(s3.storage_options, ["s3://models/tiny"])
    local = spec.local_location(stores)
    assert local.startswith(str(tmp_path / "cache"))
    assert spec.describe(stores).default_size == 64
    assert not list((tmp_path / "cache").rglob("*.bin"))
    # The second look-up lists the store (its sizes and ETags key the copy) and copies nothing again.
    copied = (Path(local) / "kandinsky-2-2-prior" / "model_index.json").stat().st_mtime_ns
    assert spec.local_location(stores) == local
    assert (Path(local) / "kandinsky-2-2-prior" / "model_index.json").stat().st_mtime_ns == copied
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1
    model = Kandinsky22(local, tasks=frozenset({"generate"}), device="cpu")
    assert model.inpainter is None


def test_image_writes_go_through_obstore_where_the_options_allow(s3, bucket):
    from unclip_batch import storage

    fs, name = bucket
    objects = {f"{name}/w/images/r{i}/0.png": png_bytes(scene()) for i in range(40)}
    assert storage.s3_store(fs, name) is not None
    storage.write_many(fs, objects, f"{name}/w", retry_for_s=5)
    assert fs.cat(list(objects)) == objects
    assert fs.info(f"{name}/w/images/r0/0.png")["ContentType"] == "image/png"
    # An option obstore would not honour (here: extra PUT arguments, object metadata) keeps the s3fs path.
    sse = s3.filesystem({**s3.storage_options, "s3_additional_kwargs": {"Metadata": {"by": "s3fs"}}})
    assert storage.s3_store(sse, name) is None
    storage.write_many(sse, {f"{name}/w/other.png": b"x"}, f"{name}/w", retry_for_s=5)
    assert fs.cat(f"{name}/w/other.png") == b"x"


def test_whole_objects_go_and_come_back_through_obstore_where_the_options_allow(s3, bucket, monkeypatch):
    """Parts, shards and records are single objects written and read whole: through obstore on S3 (one
    request each, signed in Rust), through s3fs where an option asks for it; a missing one is
    FileNotFoundError either way, which a commit reads as "not written yet"."""
    import fsspec

    from unclip_batch import storage

    fs, name = bucket
    root = f"{name}/whole"

    def s3fs_asked(*args, **kwargs):
        raise TypeError("s3fs asked")  # permanent: not retried

    # obstore's path: s3fs fails here if it is asked to send or fetch these bytes.
    for method in ("pipe_file", "pipe", "cat_file", "cat", "open"):
        monkeypatch.setattr(fs, method, s3fs_asked)
    storage.write_whole(fs, f"{root}/shards/00000.tar", b"tar bytes", root, retry_for_s=5)
    assert storage.read_whole(fs, f"{root}/shards/00000.tar") == b"tar bytes"
    with pytest.raises(FileNotFoundError):
        storage.read_whole(fs, f"{root}/metadata/00000.parquet")
    monkeypatch.undo()
    assert fs.cat(f"{root}/shards/00000.tar") == b"tar bytes"
    # An option obstore would not honour keeps s3fs, both ways; and a local output reads from disk.
    sse = s3.filesystem({**s3.storage_options, "s3_additional_kwargs": {"Metadata": {"by": "s3fs"}}})
    storage.write_whole(sse, f"{root}/other.json", b"{}", root, retry_for_s=5)
    assert storage.read_whole(sse, f"{root}/other.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.read_whole(sse, f"{root}/none.json")
    assert fs.metadata(f"{root}/other.json") == {"by": "s3fs"}  # s3fs sent it
    local = fsspec.filesystem("file")
    with pytest.raises(FileNotFoundError):
        storage.read_whole(local, "/nonexistent/part.parquet")


def test_removed_images_go_in_bulk_without_a_listing(s3, bucket, monkeypatch):
    """A commit removes the images of records redone with fewer images (files format): one bulk DELETE,
    through obstore or s3fs, with no LIST per key (s3fs's recursive rm lists before it deletes); a key
    already gone is no error."""
    import s3fs

    from unclip_batch import storage

    fs, name = bucket
    sse = s3.filesystem({**s3.storage_options, "s3_additional_kwargs": {"Metadata": {"by": "s3fs"}}})
    for client in (fs, sse):  # obstore's path, s3fs's path
        keys = [f"{name}/d/images/r{i}/0.png" for i in range(5)]
        storage.write_many(fs, dict.fromkeys(keys, b"x"), f"{name}/d", retry_for_s=5)
        with monkeypatch.context() as m:
            for listing in ("_find", "_ls", "_lsdir", "_info", "_exists"):
                m.setattr(s3fs.S3FileSystem, listing, lambda *a, **k: pytest.fail("listed"))
            storage.remove_files(client, [*keys[:3], f"{name}/d/images/never/0.png"], retry_for_s=5)
        fs.invalidate_cache()
        assert sorted(fs.find(f"{name}/d")) == keys[3:]
        fs.rm(keys[3:])


def test_obstore_writes_stop_on_an_outage_with_a_short_message(tmp_path):
    """The image PUTs (obstore) retry like every other storage call, up to retry_for_s, then raise
    StorageUnavailable (riding out a short outage: test_faults, through a whole job)."""
    from seaweedfs import SeaweedFS

    from unclip_batch import storage
    from unclip_batch.errors import StorageUnavailable

    with SeaweedFS(tmp_path / "weed") as server:
        fs = server.filesystem()
        fs.mkdir("out")
        storage.write_many(fs, {"out/a.png": b"a"}, "out", retry_for_s=5)
        server.kill()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="writing 1 objects under out kept failing for 3s") as failed:
            storage.write_many(fs, {"out/b.png": b"b"}, "out", retry_for_s=3)
        assert time.monotonic() - started < 20  # obstore's own retries stay short
        assert "\n" not in str(failed.value)  # one line, not obstore's debug dump


def test_obstore_finds_endpoint_and_keys_in_the_environment_as_s3fs_does(s3, monkeypatch):
    """README: credentials and an S3-compatible endpoint may come from the environment alone."""
    import s3fs

    from unclip_batch import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.storage_options["secret"])
    bare = s3fs.S3FileSystem(skip_instance_cache=True)
    bare.mkdir("from-env")
    assert storage.s3_store(bare, "from-env") is not None
    storage.write_many(bare, {"from-env/x/0.png": b"png"}, "from-env/x", retry_for_s=5)
    assert s3.filesystem().cat("from-env/x/0.png") == b"png"
