import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_manifest
from unclip_batch import plan
from unclip_batch.errors import SetupError
from unclip_batch.manifest import read_manifests


def shard(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{len(list(folder.iterdir()))}.parquet")


def test_pending_skips_done_ids_and_positions(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i} for i in ["a", "b", "c", "a", "bad id", "d"]])
    table = read_manifests([manifest])
    out = tmp_path / "out"
    shard(out / "metadata", [{"id": "a", "k": 0}, {"id": "a", "k": 1}])
    shard(out / "errors", [{"id": "b", "code": "image_invalid", "manifest": manifest, "manifest_row": 1}])
    shard(out / "errors", [{"id": "bad id", "code": "invalid_id", "manifest": manifest, "manifest_row": 4},
                           {"id": "a", "code": "duplicate_id", "manifest": manifest, "manifest_row": 3}])
    (out / "metadata" / "part-broken.parquet").write_bytes(b"PAR1 truncated")
    done = plan.load_done(str(out))
    assert (done.succeeded, done.failed) == (1, 3)
    assert plan.pending(table, done)["id"].to_pylist() == ["c", "d"]


def test_a_duplicate_is_not_done_when_its_first_row_is(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a"}, {"id": "a"}])
    out = tmp_path / "out"
    shard(out / "metadata", [{"id": "a", "k": 0}])
    assert plan.pending(read_manifests([manifest]), plan.load_done(str(out)))["_manifest_row"].to_pylist() == [1]


def test_another_job_on_the_same_output_is_refused(tmp_path):
    from unclip_batch.writer import write_json

    record = {"model": "tiny", "fingerprint": "abc"}
    assert plan.check_job_record(str(tmp_path), record) is False
    write_json(str(tmp_path), plan.JOB_RECORD, record)
    assert plan.check_job_record(str(tmp_path), record) is True
    with pytest.raises(SetupError, match="--overwrite"):
        plan.check_job_record(str(tmp_path), {"model": "other", "fingerprint": "def"})


def test_overwrite_removes_only_our_names(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "_SUCCESS").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    plan.clear_output(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
