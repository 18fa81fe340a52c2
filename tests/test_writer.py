import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_manifest
from PIL import Image

from unclip_batch import plan, writer
from unclip_batch.manifest import manifest_files
from unclip_batch.storage import Location, Stores
from unclip_batch.writer import ERROR_SCHEMA, METADATA_SCHEMA, commit_shard, image_key, write_json, write_part


def image_row(i, k=0, n=1, code="", **kw):
    """A row as the model stage hands it on: image k of manifest row i (of n images)."""
    return dict(
        id=kw.pop("id", f"r{i}"),
        k=k,
        num_images=n,
        row=i,
        task="generate",
        prompt=f"prompt {i}",
        negative_prompt="",
        image="",
        mask="",
        seed=7 + k,
        candidate=0,
        best_of=1,
        width=8,
        height=8,
        pixels=b"" if code else np.full((8, 8, 3), 10 * i + k, np.uint8).tobytes(),
        clip_score=0.25 if k else float("nan"),  # NaN between stages = no score
        embedding=kw.pop("embedding", b""),
        num_inference_steps=4,
        guidance_scale=4.0,
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
        variation_strength=0.3,
        load_s=0.0,
        model_s=0.0,
        input_hash=f"h{i}",
        code=code,
        stage="predict" if code else "",
        message="boom" if code else "",
        **kw,
    )


def write_images(rows, output, block=0, format="files"):
    """The write stage on one block of shard 00000 (manifest rows = job rows here)."""
    write_part(rows, shard="00000", first=0, offset=0, block=block, output=Location(str(output)), format=format)
    return rows


def test_images_are_written_whole_with_checksums(tmp_path):
    out = write_images([image_row(1), image_row(2, k=3, n=4)], tmp_path)
    assert [r["image_key"] for r in out] == ["images/r1/0.png", "images/r2/3.png"]
    for r in out:
        data = (tmp_path / r["image_key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and "pixels" not in r
    # Staged files are renamed into place: nothing is left in the staging folder, and nothing else exists.
    assert not list((tmp_path / "_partial").iterdir())
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["_parts/00000/0.parquet", "images/r1/0.png", "images/r2/3.png"]


def test_a_storage_failure_stops_the_job_instead_of_recording_rows(tmp_path):
    (tmp_path / "images").write_text("a file where a folder should be")
    with pytest.raises(OSError):
        write_images([image_row(1)], tmp_path)


def test_unencodable_pixels_are_a_row_error(tmp_path):
    row = image_row(1)
    row["pixels"] = b"short"
    (out,) = write_images([row], tmp_path)
    assert (out["code"], out["stage"]) == ("write_failed", "write")


def test_storage_outage_is_retried_with_backoff_then_reported(monkeypatch):
    """Transient failures are retried after 0.5, 1, 2, 4 s, then every 8 s, for the retry window; past it the
    job stops saying what failed and how to resume. (A clock of the test's own: no real waiting.)"""
    from helpers import fake_storage_clock

    from unclip_batch import storage
    from unclip_batch.errors import StorageUnavailable

    clock = fake_storage_clock(monkeypatch)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 7:
            raise ConnectionError("endpoint down")
        return "ok"

    assert storage.retrying(flaky, "writing x", retry_for_s=60) == "ok" and len(calls) == 7
    assert clock.slept == [0.5, 1, 2, 4, 8, 8]
    clock.slept.clear()
    with pytest.raises(StorageUnavailable) as stopped:
        storage.retrying(lambda: (_ for _ in ()).throw(ConnectionError("down")), "writing y", retry_for_s=10)
    assert clock.slept == [0.5, 1, 2, 4]  # the next wait, 8 s, would end past the window
    assert (
        str(stopped.value) == "writing y kept failing for 10s (ConnectionError: down); rerun the same command to resume"
    )
    assert isinstance(stopped.value.__cause__, ConnectionError)
    clock.slept.clear()
    with pytest.raises(FileNotFoundError):  # permanent: no retry
        storage.retrying(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "reading z", retry_for_s=10)
    assert clock.slept == []


def test_a_removal_rides_out_an_outage_and_a_missing_file_is_removed_already(monkeypatch):
    """A commit removes a shard's emptied error file, and the job its parts folder: through an outage as
    writes go (a resumed job's commit once failed here when S3 blinked)."""
    from helpers import fake_storage_clock

    from unclip_batch import storage

    slept = fake_storage_clock(monkeypatch).slept  # the retry's wait, without waiting

    class Blinking:  # a store that is away for its first call, then has nothing at the path
        def __init__(self):
            self.calls = 0

        def invalidate_cache(self, path):
            pass

        def isfile(self, path):
            self.calls += 1
            if self.calls < 2:
                raise ConnectionError("endpoint down")
            return False

        def exists(self, path):
            return False

    output = Location("/bucket/out")
    output._fs, output._root = Blinking(), "bucket/out"
    output.remove("errors", "x.parquet", retry_for_s=10)
    assert output.fs.calls == 2 and slept == [0.5]
    assert storage.permanent(FileNotFoundError()) and not storage.permanent(ConnectionError())


def test_error_rows_are_not_written(tmp_path):
    (out,) = write_images([image_row(1, code="model_error")], tmp_path)
    assert out["image_key"] == "" and not (tmp_path / "images").exists()


def test_a_killed_write_leaves_nothing_under_a_final_name(tmp_path):
    from unclip_batch import storage

    output = Location(str(tmp_path))
    output.write("images/a/0.png", b"whole")
    (tmp_path / "_partial" / "half-written").write_bytes(b"half")  # what SIGKILL mid-write leaves
    storage.clear_partial(output)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["images/a/0.png"]


def test_keys_stay_inside_the_output():
    assert image_key("a.b-c_d", 2) == "images/a.b-c_d/2.png"


def commit(manifest, output, parts, rows_per_shard=10, format="files"):
    (shard, *_) = plan.plan_shards(manifest_files([manifest]), rows_per_shard)
    return commit_shard(shard, parts, output=Location(str(output)), stores=Stores(None), format=format, model="tiny")


def test_a_commit_records_each_row_once_in_manifest_order_with_its_manifest_columns(tmp_path):
    tags = pa.array([[1, 2], None, [3], None], pa.list_(pa.int16()))
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "tags": tags[i].as_py()} for i in range(4)])
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(4)], "tags": tags}), manifest)
    out = tmp_path / "out"
    write_images([image_row(2), image_row(0, k=1, n=2), image_row(0, k=0, n=2)], out, block=0)
    write_images([image_row(1, code="model_error")], out, block=1)
    parts = ["_parts/00000/0.parquet", "_parts/00000/1.parquet"]
    # Ray retried the task of block 0 and delivered it twice: each row still once. Row 3 not done yet.
    stats = commit(manifest, out, parts + parts[:1])
    metadata = pq.read_table(out / "metadata/00000.parquet")
    assert list(zip(metadata["id"].to_pylist(), metadata["k"].to_pylist())) == [("r0", 0), ("r0", 1), ("r2", 0)]
    assert metadata["clip_score"].to_pylist() == [None, 0.25, None] and set(metadata["embedding"].to_pylist()) == {None}
    assert metadata.schema.field("tags").type == pa.list_(pa.int16())
    assert metadata["tags"].to_pylist() == [[1, 2], [1, 2], [3]] and metadata["manifest_row"].to_pylist() == [0, 0, 2]
    assert metadata.to_pylist()[0]["parameters"]["num_inference_steps"] == 4
    errors = pq.read_table(out / "errors/00000.parquet").to_pylist()
    assert [(e["id"], e["code"], e["manifest_row"], e["tags"]) for e in errors] == [("r1", "model_error", 1, None)]
    assert (stats["complete"], stats["succeeded"], stats["failed"]) == (False, 2, 1)
    assert not (out / "stats/00000_stats.json").exists()
    # The next commit of the shard: row 3 done, row 1 redone (--retry-errors) and now fine; the rest kept.
    write_images([image_row(3), image_row(1)], out, block=2)
    stats = commit(manifest, out, ["_parts/00000/2.parquet"])
    metadata = pq.read_table(out / "metadata/00000.parquet")
    assert metadata["id"].to_pylist() == ["r0", "r0", "r1", "r2", "r3"] and not (out / "errors/00000.parquet").exists()
    assert (stats["complete"], stats["rows"], stats["images"]) == (True, 4, 5)
    assert json.loads((out / "stats/00000_stats.json").read_text())["succeeded"] == 4


def test_webdataset_and_parquet_shards_repeat_byte_for_byte(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}.x", "prompt": f"p{i}"} for i in range(3)])
    rows = lambda: [image_row(i, id=f"r{i}.x") for i in range(3)]  # noqa: E731 (ids with dots: never keys)
    for format, data in (("webdataset", "shards/00000.tar"), ("parquet", "data/00000.parquet")):
        one, two = tmp_path / f"{format}-one", tmp_path / f"{format}-two"
        write_images(rows(), one, format=format)
        commit(manifest, one, ["_parts/00000/0.parquet"], format=format)
        # The same rows in two runs: the first commits two rows, the second the third.
        (first, second, third) = rows()
        write_images([first, second], two, block=0, format=format)
        commit(manifest, two, ["_parts/00000/0.parquet"], format=format)
        write_images([third], two, block=1, format=format)
        commit(manifest, two, ["_parts/00000/1.parquet"], format=format)
        assert (one / data).read_bytes() == (two / data).read_bytes(), format
        assert (one / ("shards" if format == "webdataset" else "stats") / "00000_stats.json").exists()
    import tarfile

    names = tarfile.open(tmp_path / "webdataset-one/shards/00000.tar").getnames()
    assert names[:3] == ["00000_000000_00.png", "00000_000000_00.json", "00000_000000_00.txt"]


def test_webdataset_samples_carry_their_embedding_as_npy(tmp_path):
    import webdataset as wds

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(2)])
    vectors = [np.arange(4, dtype=np.float32) / (i + 1) for i in range(2)]
    rows = [image_row(i, embedding=vectors[i].tobytes()) for i in range(2)]
    write_images(rows, tmp_path / "out", format="webdataset")
    commit(manifest, tmp_path / "out", ["_parts/00000/0.parquet"], format="webdataset")
    samples = list(wds.WebDataset(str(tmp_path / "out/shards/00000.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["00000_000000_00", "00000_000001_00"]
    for sample, vector in zip(samples, vectors):
        assert sample["npy"].dtype == np.float32 and np.array_equal(sample["npy"], vector)
        assert "embedding" not in sample["json"] and sample["txt"] == sample["json"]["prompt"]
    metadata = pq.read_table(tmp_path / "out/metadata/00000.parquet")
    assert metadata["embedding"].to_pylist() == [v.tolist() for v in vectors]  # and in the metadata as ever


def test_json(tmp_path):
    write_json(Location(str(tmp_path)), "_SUCCESS", {"a": 1})
    assert json.loads((tmp_path / "_SUCCESS").read_text()) == {"a": 1}


def test_the_docs_list_the_output_schemas():
    from helpers import doc_columns

    assert doc_columns("## Metadata") == METADATA_SCHEMA.names + ["manifest", "manifest_row"]
    assert doc_columns("## Errors") == ERROR_SCHEMA.names + ["manifest", "manifest_row"]


def test_pngs_are_lossless_and_as_small_as_pillows_default():
    """The job's PNG settings (zlib 1 + run-length, for speed) give back the pixels, and no more bytes than
    Pillow's default (zlib 6) within 2% on pictures like the model's: a blurred, noisy shape."""
    from PIL import ImageFilter

    from unclip_lab import world

    rng = np.random.default_rng(0)
    for _ in range(5):
        picture = Image.fromarray(world.render(world.random_scene(rng))).filter(ImageFilter.GaussianBlur(1))
        pixels = np.clip(np.asarray(picture, np.int16) + rng.normal(0, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
        png = writer.encode_png(pixels)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
        default = io.BytesIO()
        Image.fromarray(pixels).save(default, format="PNG")
        assert len(png) <= 1.02 * len(default.getvalue()), (len(png), len(default.getvalue()))


def test_the_output_schemas_field_by_field():
    """What readers of our outputs rely on: each column's name, order and Arrow type, and each stats field."""
    from unclip_batch.writer import ERROR_SCHEMA, METADATA_SCHEMA, STATS_DOCS

    assert [(f.name, str(f.type)) for f in METADATA_SCHEMA] == [
        ("id", "string"),
        ("k", "int32"),
        ("task", "string"),
        ("image_key", "string"),
        ("prompt", "string"),
        ("negative_prompt", "string"),
        ("image", "string"),
        ("mask", "string"),
        ("seed", "int64"),
        ("candidate", "int32"),
        ("width", "int32"),
        ("height", "int32"),
        ("sha256", "string"),
        ("clip_score", "double"),
        ("embedding", "list<item: float>"),
        ("model", "string"),
        (
            "parameters",
            "struct<num_inference_steps: int32, guidance_scale: double, prior_num_inference_steps: int32, "
            "prior_guidance_scale: double, variation_strength: double, best_of: int32>",
        ),
        ("timings", "struct<load_s: double, model_s: double, write_s: double>"),
        ("input_hash", "string"),
    ]
    assert [(f.name, str(f.type)) for f in ERROR_SCHEMA] == [
        ("id", "string"),
        ("task", "string"),
        ("stage", "string"),
        ("code", "string"),
        ("message", "string"),
        ("input_hash", "string"),
    ]
    assert list(STATS_DOCS) == [
        "shard",
        "manifest",
        "path",
        "start",
        "stop",
        "version",
        "rows",
        "succeeded",
        "failed",
        "images",
        "failures_by_code",
        "complete",
    ]


def test_a_webdataset_samples_json_is_utf8_with_carried_values_as_text_and_a_parquet_images_path_its_key(tmp_path):
    """A sample's .json keeps the prompt's characters as they are (not \\u escapes) and writes carried values
    JSON has no type for (a date) as text; the parquet format's image path is the sample's key."""
    import datetime
    import tarfile

    when = datetime.date(2026, 12, 7)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["r0", "r1"], "prompt": ["café ☕", "p"], "day": [when, when]}), manifest)
    rows = [image_row(0) | {"prompt": "café ☕"}, image_row(1)]
    for format in ("webdataset", "parquet"):
        write_images([dict(r) for r in rows], tmp_path / format, format=format)
        commit(str(manifest), tmp_path / format, ["_parts/00000/0.parquet"], format=format)
    with tarfile.open(tmp_path / "webdataset/shards/00000.tar") as tar:
        text = tar.extractfile("00000_000000_00.json").read()
        assert "café ☕".encode() in text and b"\\u" not in text
        assert (
            json.loads(text)["day"] == "2026-12-07"
            and tar.extractfile("00000_000000_00.txt").read() == "café ☕".encode()
        )
    with tarfile.open(tmp_path / "webdataset/shards/00000.tar") as tar:
        assert tar.extractfile("00000_000001_00.txt").read() == b"prompt 1"
    table = pq.read_table(tmp_path / "parquet/data/00000.parquet")
    assert [r["path"] for r in table["image"].to_pylist()] == ["00000_000000_00.png", "00000_000001_00.png"]
    assert table["image_key"].to_pylist()[0] == "data/00000.parquet#00000_000000_00.png"


def test_a_shard_tar_is_ustar_with_fixed_headers_and_a_two_block_end():
    from unclip_batch.writer import tar_bytes

    data = tar_bytes([("00000_000000_00.png", b"x" * 700), ("00000_000000_00.txt", b"")])
    assert len(data) == 512 + 1024 + 512 + 1024  # header, 700 bytes in two blocks, header, the end
    header = data[:512]
    assert header[:19] == b"00000_000000_00.png" and header[19:100] == b"\0" * 81
    assert header[100:108] == b"0000644\0" and header[108:116] == header[116:124] == b"0000000\0"
    assert header[124:136] == b"%011o\0" % 700 and header[136:148] == b"00000000000\0" and header[156:157] == b"0"
    assert header[257:265] == b"ustar\x0000"
    assert int(header[148:154], 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum
    assert data[-1024:] == b"\0" * 1024 and data[512 + 700 : 1536] == b"\0" * (1024 - 700)


def test_a_sample_without_a_prompt_has_an_empty_txt_and_a_writer_retries_for_the_jobs_window(tmp_path, monkeypatch):
    import tarfile

    from unclip_batch import storage
    from unclip_batch.writer import WebDatasetWriter

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "v", "task": "variation", "image": "x.png"}])
    row = image_row(0, id="v") | {"task": "variation", "prompt": "", "image": "x.png"}
    write_images([row], tmp_path / "out", format="webdataset")
    commit(manifest, tmp_path / "out", ["_parts/00000/0.parquet"], format="webdataset")
    with tarfile.open(tmp_path / "out/shards/00000.tar") as tar:
        assert tar.extractfile("00000_000000_00.txt").read() == b""
    windows = []
    real = storage.write_whole
    monkeypatch.setattr(
        storage,
        "write_whole",
        lambda fs, path, data, root, retry_for_s: (
            windows.append(retry_for_s) or real(fs, path, data, root, retry_for_s)
        ),
    )
    WebDatasetWriter(output=Location(str(tmp_path / "w")), retry_for_s=7.5)._write("shards/x.tar", b"x")
    assert windows == [7.5]


def test_json_files_are_indented_with_dates_as_text_and_files_images_leave_their_rows(tmp_path):
    import datetime

    from unclip_batch.writer import FilesWriter

    write_json(Location(str(tmp_path)), "_SUCCESS", {"a": 1, "day": datetime.date(2026, 12, 7)})
    assert (tmp_path / "_SUCCESS").read_text() == '{\n  "a": 1,\n  "day": "2026-12-07"\n}\n'
    rows = [{"image_key": "images/a/0.png", "png": b"one"}, {"image_key": "", "png": b""}]
    FilesWriter(output=Location(str(tmp_path)), retry_for_s=1.0).store(rows)
    assert (tmp_path / "images/a/0.png").read_bytes() == b"one"
    assert rows == [{"image_key": "images/a/0.png", "png": b""}, {"image_key": "", "png": b""}]


@pytest.mark.parametrize("format", ["files", "webdataset"])
def test_a_blocks_part_holds_each_rows_outcome_and_its_share_of_the_write_time(tmp_path, monkeypatch, format):
    """write_part on a block of three rows: one made, one failed before (no image), one whose pixels cannot
    be a PNG (a write_failed error). The part keeps keys, checksums (and, for shard formats, PNG bytes) of the
    made one only, no pixels, and each row's share of the stage's time; the counts go to the driver."""
    from unclip_batch import writer as writer_module

    clock = iter([10.0, 16.0])
    monkeypatch.setattr(writer_module.time, "perf_counter", lambda: next(clock))
    made = image_row(0, warm_up_s=1.5, repaint=b"r")
    broken = image_row(2, warm_up_s=0.25)
    broken["pixels"] = b"\0" * 5  # not 8 x 8 x 3 bytes
    rows = [made, image_row(1, code="model_error"), broken]
    counts = write_part(rows, shard="00000", first=10, offset=0, block=3, output=Location(str(tmp_path)), format=format)
    assert counts == {
        "succeeded": 1,
        "images": 1,
        "candidates": 1,
        "codes": {"model_error": 1, "write_failed": 1},
        "warm_ups": 2,
        "warm_up_s": 1.75,
    }
    part = pq.read_table(tmp_path / "_parts" / "00000" / "3.parquet").to_pylist()
    assert [r["position"] for r in part] == [10, 11, 12] and [r["write_s"] for r in part] == [2.0, 2.0, 2.0]
    assert "pixels" not in part[0] and "repaint" not in part[0]
    assert [(r["code"], r["image_key"], r["sha256"], r["png"]) for r in part[1:]] == [
        ("model_error", "", "", b""),
        ("write_failed", "", "", b""),
    ]
    assert part[2]["stage"] == "write" and part[2]["message"].startswith("ValueError: ")
    png = (tmp_path / part[0]["image_key"]).read_bytes() if format == "files" else part[0]["png"]
    assert part[0]["sha256"] == hashlib.sha256(png).hexdigest() and png.startswith(b"\x89PNG")
    assert (part[0]["png"] == b"") == (format == "files")  # the files format wrote it already
