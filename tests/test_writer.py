import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip_batch.batches import rows_of, to_batch
from unclip_batch.writer import (
    ERROR_SCHEMA,
    METADATA_SCHEMA,
    ShardWriter,
    image_key,
    metadata_record,
    write_images,
    write_json,
)


def image_row(i, **kw):
    pixels = np.full((8, 8, 3), i, np.uint8).tobytes()
    return {
        "id": f"r{i}",
        "k": 0,
        "width": 8,
        "height": 8,
        "pixels": pixels,
        "code": "",
        "message": "",
        "stage": "",
        **kw,
    }


def test_images_are_written_whole_with_checksums(tmp_path):
    out = rows_of(write_images(to_batch([image_row(1), image_row(2, k=3)]), str(tmp_path)))
    assert [r["image_key"] for r in out] == ["images/r1/0.png", "images/r2/3.png"]
    for r in out:
        data = (tmp_path / r["image_key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and "pixels" not in r
    # Staged files are renamed into place: nothing is left in the staging folder, and nothing else exists.
    assert not list((tmp_path / "_partial").iterdir())
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["images/r1/0.png", "images/r2/3.png"]


def test_a_storage_failure_stops_the_job_instead_of_recording_rows(tmp_path):
    (tmp_path / "images").write_text("a file where a folder should be")
    with pytest.raises(OSError):
        write_images(to_batch([image_row(1)]), str(tmp_path))


def test_unencodable_pixels_are_a_row_error(tmp_path):
    (out,) = rows_of(write_images(to_batch([image_row(1, pixels=b"short")]), str(tmp_path)))
    assert (out["code"], out["stage"]) == ("write_failed", "write")


def test_storage_outage_is_retried_then_reported():
    from unclip_batch import storage
    from unclip_batch.errors import StorageUnavailable

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("endpoint down")
        return "ok"

    assert storage.retrying(flaky, "writing x", retry_for_s=10) == "ok" and len(calls) == 3
    with pytest.raises(StorageUnavailable, match="kept failing"):
        storage.retrying(lambda: (_ for _ in ()).throw(ConnectionError("down")), "writing y", retry_for_s=1)
    with pytest.raises(FileNotFoundError):  # permanent: no retry
        storage.retrying(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "reading z", retry_for_s=10)


def test_error_rows_are_not_written(tmp_path):
    (out,) = rows_of(write_images(to_batch([image_row(1, code="model_error", pixels=b"")]), str(tmp_path)))
    assert out["image_key"] == "" and not (tmp_path / "images").exists()


def test_a_killed_write_leaves_nothing_under_a_final_name(tmp_path):
    from unclip_batch import storage

    fs, root = storage.filesystem(str(tmp_path))
    storage.write_whole(fs, str(tmp_path / "images" / "a" / "0.png"), b"whole", str(tmp_path))
    (tmp_path / "_partial" / "half-written").write_bytes(b"half")  # what SIGKILL mid-write leaves
    storage.clear_partial(fs, root)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["images/a/0.png"]


def test_keys_stay_inside_the_output():
    assert image_key("a.b-c_d", 2) == "images/a.b-c_d/2.png"


def test_shards_carry_manifest_columns_with_their_types(tmp_path):
    lookup = pa.table(
        {
            "_manifest": ["m.parquet"] * 2,
            "_manifest_row": [0, 1],
            "tags": pa.array([[1, 2], None], pa.list_(pa.int16())),
            "score": pa.array([0.5, None], pa.float32()),
        }
    )
    writer = ShardWriter(
        output=str(tmp_path), folder="metadata", schema=METADATA_SCHEMA, lookup=lookup, rows_per_shard=1
    )
    row = dict(
        id="b",
        k=0,
        task="generate",
        image_key="images/b/0.png",
        prompt="p",
        negative_prompt="",
        image="",
        mask="",
        seed=3,
        width=8,
        height=8,
        sha256="x",
        clip_score=0.5,
        embedding=np.array([0.1, -2.5], np.float32).tobytes(),
        row=1,
        num_inference_steps=4,
        guidance_scale=4.0,
        prior_num_inference_steps=2,
        prior_guidance_scale=4.0,
        load_s=0.0,
        model_s=1.0,
        write_s=0.1,
        input_hash="0123456789abcdef",
    )
    writer.add([metadata_record(row, "tiny")])
    writer.flush()
    table = pq.read_table(tmp_path / "metadata")
    assert table["clip_score"].to_pylist() == [0.5]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert (np.array(table["embedding"].to_pylist()[0], np.float32) == np.array([0.1, -2.5], np.float32)).all()
    assert table.schema.field("tags").type == pa.list_(pa.int16())
    assert table.schema.field("score").type == pa.float32()
    assert table.to_pylist()[0]["manifest_row"] == 1 and table.to_pylist()[0]["tags"] is None
    assert table.to_pylist()[0]["parameters"]["num_inference_steps"] == 4


def test_errors_shard(tmp_path):
    lookup = pa.table({"_manifest": ["m"], "_manifest_row": [0]})
    writer = ShardWriter(output=str(tmp_path), folder="errors", schema=ERROR_SCHEMA, lookup=lookup)
    writer.add(
        [
            {
                "id": None,
                "task": "generate",
                "stage": "validate",
                "code": "invalid_id",
                "message": "m",
                "row": 0,
                "input_hash": "h",
            }
        ]
    )
    writer.flush()
    assert pq.read_table(tmp_path / "errors").to_pylist() == [
        {
            "id": None,
            "task": "generate",
            "stage": "validate",
            "code": "invalid_id",
            "message": "m",
            "input_hash": "h",
            "manifest": "m",
            "manifest_row": 0,
        }
    ]


def test_json(tmp_path):
    write_json(str(tmp_path), "_SUCCESS", {"a": 1})
    assert json.loads((tmp_path / "_SUCCESS").read_text()) == {"a": 1}


def test_the_readme_lists_the_output_schemas():
    from helpers import readme_columns

    assert readme_columns("Metadata columns:") == METADATA_SCHEMA.names + ["manifest", "manifest_row"]
    assert readme_columns("Error columns:") == ERROR_SCHEMA.names + ["manifest", "manifest_row"]
