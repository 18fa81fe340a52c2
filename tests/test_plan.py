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
    shard(
        out / "errors",
        [
            {"id": "bad id", "code": "invalid_id", "manifest": manifest, "manifest_row": 4},
            {"id": "a", "code": "duplicate_id", "manifest": manifest, "manifest_row": 3},
        ],
    )
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


def test_model_blocks_end_only_where_a_call_ends():
    """Blocks of about CALLS_PER_BLOCK full calls; a group is never cut mid-call, so the actor pads each
    group once, not once per block it spans. Every row exactly once, grouped, manifest order within a group."""
    import math
    import random
    from collections import Counter
    from types import SimpleNamespace

    from unclip_batch.sampling import call_key

    random.seed(0)
    batch = 16
    rows = [
        SimpleNamespace(
            id=f"r{i}",
            task=random.choice(["generate", "variation", "inpaint"]),
            width=64,
            height=64,
            num_inference_steps=20,
            guidance_scale=2.0,
            prior_num_inference_steps=25,
            prior_guidance_scale=4.0,
            negative_prompt="",
            prompt="p",
            num_images=random.choice([1, 1, 1, 2, 4]),
        )
        for i in range(500)
    ]
    blocks = list(plan.model_blocks(rows, batch))
    flat = [row for block in blocks for row in block]
    assert sorted(r.id for r in flat) == sorted(r.id for r in rows)
    assert flat == sorted(rows, key=lambda row: call_key(vars(row)))  # stable: manifest order within a group
    per_group = Counter()
    for row in rows:
        per_group[call_key(vars(row))] += row.num_images
    calls = 0
    for block in blocks:
        in_block = Counter()
        for row in block:
            in_block[call_key(vars(row))] += row.num_images
        calls += sum(math.ceil(n / batch) for n in in_block.values())
        assert sum(in_block.values()) < 2 * batch * plan.CALLS_PER_BLOCK + max(r.num_images for r in rows)
    assert calls == sum(math.ceil(n / batch) for n in per_group.values())  # no call padded twice
    assert len(blocks) > 5  # and still small blocks, written as they are made


def test_rows_changed_under_their_id_are_found_and_forgotten(tmp_path):
    from unclip_batch.manifest import input_hash

    # A carried list column too: the comparison must not need to carry it through a join.
    rows = [
        {"id": "a", "prompt": "red", "tags": [1, 2]},
        {"id": "b", "prompt": "blue"},
        {"id": "bad id", "prompt": "x"},
        {"id": "c", "prompt": "green"},
    ]
    old = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    h = {r["id"]: input_hash(r) for r in rows}
    shard(
        out / "metadata",
        [
            {"id": "a", "k": 0, "input_hash": h["a"]},
            {"id": "a", "k": 1, "input_hash": h["a"]},
            {"id": "c", "k": 0, "input_hash": h["c"]},
        ],
    )
    shard(out / "metadata", [{"id": "old", "k": 0, "input_hash": None}])  # before fingerprints: never "changed"
    shard(
        out / "errors",
        [
            {"id": "b", "code": "image_invalid", "manifest": old, "manifest_row": 1, "input_hash": h["b"]},
            {"id": "bad id", "code": "invalid_id", "manifest": old, "manifest_row": 2, "input_hash": h["bad id"]},
        ],
    )
    for k in (0, 1):
        (out / "images" / "a").mkdir(parents=True, exist_ok=True)
        (out / "images" / "a" / f"{k}.png").write_bytes(b"png")
    assert plan.changed_rows(read_manifests([old]), plan.load_done(str(out))).num_rows == 0

    # Same ids, same file: a's prompt changed, b's seed set, the bad id fixed; c and old untouched.
    rows[0]["prompt"], rows[1]["seed"], rows[2]["id"] = "yellow", 3, "fixed"
    table = read_manifests([write_manifest(tmp_path / "m.parquet", rows)])
    done = plan.load_done(str(out))
    changed = plan.changed_rows(table, done)
    assert changed["key"].to_pylist() == ["a", "b", f"{old}#2"] and changed["tags"][0].as_py() == [1, 2]
    assert plan.pending(table, done)["id"].to_pylist() == []
    plan.forget(str(out), changed)
    assert not (out / "images" / "a").exists()
    done = plan.load_done(str(out))
    assert plan.pending(table, done)["id"].to_pylist() == ["a", "b", "fixed"]
    assert sorted(pq.read_table(out / "metadata")["id"].to_pylist()) == ["c", "old"]
    assert pq.read_table(out / "errors").num_rows == 0


def test_rows_recorded_as_errors_are_counted_and_can_be_redone(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i} for i in "abc"])
    out = tmp_path / "out"
    shard(out / "metadata", [{"id": "a", "k": 0}])
    shard(out / "errors", [{"id": "b", "code": "image_invalid", "manifest": manifest, "manifest_row": 1}])
    table = read_manifests([manifest])
    assert plan.skipped_errors(table, plan.load_done(str(out))) == 1
    plan.discard_errors(str(out))
    done = plan.load_done(str(out))
    assert plan.skipped_errors(table, done) == 0 and plan.pending(table, done)["id"].to_pylist() == ["b", "c"]
