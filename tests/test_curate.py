"""unclip-batch curate's stages on plain files, without Ray: the filter, exact and near-duplicates, the
records' contract, the checks before any work, resume and the export. (On S3 through a real Ray, with jobs'
outputs and a killed driver: tests/test_curate_s3.py.)"""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import png_bytes, scene

from unclip_batch import curation, export, pipeline
from unclip_batch.curation import CurateConfig, CurationError, curate
from unclip_batch.plan import job_record
from unclip_batch.storage import Location

DIMS = 8


def unit(*values) -> np.ndarray:
    vector = np.zeros(DIMS, np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


def write_output(folder, shards: list[list[dict]], embeddings: bool = True, dims: list[int] | None = None) -> str:
    """A finished job's output (files format): each row {"id", "k", "clip_score", "vector", "color"}; the
    PNG is a scene in that colour (same colour, same bytes, same sha256)."""
    (folder / "metadata").mkdir(parents=True)
    (folder / "_job.json").write_text(json.dumps(job_record("tiny", {}, 4, embeddings=embeddings)))
    for number, rows in enumerate(shards):
        records = []
        for row in rows:
            png = png_bytes(scene(color=row.get("color", (number, len(records), 7)), size=8))
            key = f"images/{row['id']}/{row['k']}.png"
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            (folder / key).write_bytes(png)
            vector = row["vector"][: (dims or [DIMS] * len(shards))[number]]
            records.append(
                {
                    "id": row["id"],
                    "k": row["k"],
                    "image_key": key,
                    "task": "generate",
                    "prompt": "a red circle",
                    "seed": 1,
                    "sha256": hashlib.sha256(png).hexdigest(),
                    "clip_score": row["clip_score"],
                    "embedding": [float(v) for v in vector] if embeddings else None,
                    "timings": {"load_s": 0.0, "model_s": 1.0, "write_s": 0.0},
                    "manifest_row": len(records),
                }
            )
        schema = pa.schema([("embedding", pa.list_(pa.float32()))])
        table = pa.Table.from_pylist(records)
        table = table.set_column(
            table.schema.get_field_index("embedding"),
            schema.field(0),
            pa.array([r["embedding"] for r in records], pa.list_(pa.float32())),
        )
        pq.write_table(table, folder / "metadata" / f"{number:05d}.parquet")
    images = sum(len(rows) for rows in shards)
    summary = {"status": "complete", "model": "tiny", "manifests": ["m.parquet"], "images": 0, "images_total": images}
    summary.update(started="2026-12-07T00:00:00+00:00", finished="2026-12-07T00:01:00+00:00", wall_s=60.0)
    (folder / "_SUCCESS").write_text(json.dumps({**summary, "images_per_s": 0.0}))
    return str(folder)


def inline(monkeypatch) -> list:
    """Run the stages in this process, in the order given (the Ray Data wiring's job); the calls made."""
    calls = []

    def each(stage, items, plan, **kwargs):
        calls.extend((stage.__name__, i) for i in items)
        return [stage(plan, i, **kwargs) for i in items]

    monkeypatch.setattr(pipeline, "each", each)
    monkeypatch.setattr(pipeline, "ensure_ray_for", lambda *a, **k: None)
    return calls


# The planted dataset: shard 0 and shard 1, images of rows a..h.
RED, BLUE = (200, 0, 0), (0, 0, 200)
SHARDS = [
    [
        {"id": "a", "k": 0, "clip_score": 0.30, "vector": unit(1, 0), "color": RED},
        {"id": "a", "k": 1, "clip_score": 0.20, "vector": unit(0, 1, 0.05)},
        {"id": "b", "k": 0, "clip_score": 0.35, "vector": unit(1, 0), "color": RED},  # exact dup of a/0, better
        {"id": "c", "k": 0, "clip_score": 0.25, "vector": unit(0, 1, 0.1)},  # near a/1 (0.9988), better
        {"id": "d", "k": 0, "clip_score": 0.05, "vector": unit(0, 0, 1)},  # under 0.1
    ],
    [
        {"id": "e", "k": 0, "clip_score": None, "vector": unit(0, 0, 0, 1), "color": BLUE},  # no score: last
        {"id": "f", "k": 0, "clip_score": 0.22, "vector": unit(0, 0, 0, 1), "color": BLUE},  # exact dup of e
        {"id": "g", "k": 0, "clip_score": 0.22, "vector": unit(0, 0, 0, 1, 0.095)},  # 0.9955 from f: two images
        {"id": "h", "k": 0, "clip_score": 0.30, "vector": unit(0, 1, 0.1)},  # c's twin in another shard, ties lose?
    ],
]


def records_of(output: str) -> list[dict]:
    return pq.read_table(f"{output}/curation/records").to_pylist()


def test_records_say_for_every_image_whether_it_is_kept_and_why(tmp_path, monkeypatch):
    inline(monkeypatch)
    output = write_output(tmp_path / "out", SHARDS)
    summary = curate(CurateConfig(output=output, min_clip_score=0.1))
    rows = {(r["id"], r["k"]): r for r in records_of(output)}
    assert [(r["id"], r["k"]) for r in records_of(output)] == [(r["id"], r["k"]) for s in SHARDS for r in s]
    assert pq.read_schema(f"{output}/curation/records/00000.parquet").names == curation.RECORD_SCHEMA.names
    expect = {
        ("a", 0): ("exact_duplicate", "images/b/0.png"),
        ("a", 1): ("near_duplicate", "images/h/0.png"),  # h: 0.30 beats c: 0.25 and a/1: 0.20
        ("b", 0): ("kept", None),
        ("c", 0): ("near_duplicate", "images/h/0.png"),
        ("d", 0): ("low_clip_score", None),
        ("e", 0): ("exact_duplicate", "images/f/0.png"),  # no clip_score ranks last
        ("f", 0): ("kept", None),
        ("g", 0): ("kept", None),  # 0.9955 < 0.996: two images
        ("h", 0): ("kept", None),
    }
    assert {key: (r["reason"], r["duplicate_of"]) for key, r in rows.items()} == expect
    assert all(r["keep"] == (r["reason"] == "kept") for r in rows.values())
    assert rows[("a", 0)]["similarity"] == 1.0 and rows[("a", 0)]["cluster"] is None
    assert rows[("d", 0)]["similarity"] is None and rows[("d", 0)]["duplicate_of"] is None
    assert rows[("c", 0)]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert rows[("a", 1)]["similarity"] == pytest.approx(float(unit(0, 1, 0.05) @ unit(0, 1, 0.1)), abs=1e-6)
    assert rows[("g", 0)]["similarity"] == pytest.approx(float(unit(0, 0, 0, 1) @ unit(0, 0, 0, 1, 0.095)), abs=1e-6)
    assert rows[("g", 0)]["clip_score"] == 0.22 and rows[("b", 0)]["cluster"] == 0
    assert summary["by_reason"] == {"kept": 4, "low_clip_score": 1, "exact_duplicate": 2, "near_duplicate": 2}
    assert summary["images"] == 9 and summary["kept"] == 4
    assert json.loads((tmp_path / "out/curation/_SUCCESS").read_text()) == summary
    assert sum(summary["clip_score_histogram"]["counts"]) == 8  # e has no score
    assert summary["clip_score_histogram"]["counts"][int((0.05 + 1) / 0.02)] == 1  # d's bin
    # Row a has two images: their cosine similarity (0) is the one prompt's mean; none collapsed.
    assert summary["diversity"] == {
        "prompts_with_several_images": 1,
        "mean_similarity_within_prompt": pytest.approx(0.0, abs=1e-6),
        "share_all_near_duplicates": 0.0,
    }
    assert not (tmp_path / "out/curation/_work").exists()


def test_without_a_threshold_nothing_is_filtered_and_ties_go_to_the_smaller_key(tmp_path, monkeypatch):
    inline(monkeypatch)
    twins = [
        {"id": "y", "k": 0, "clip_score": 0.3, "vector": unit(1, 1), "color": RED},
        {"id": "x", "k": 0, "clip_score": 0.3, "vector": unit(1, 1), "color": RED},
        {"id": "z", "k": 0, "clip_score": 0.3, "vector": unit(1, 1.01)},
        {"id": "w", "k": 0, "clip_score": -0.9, "vector": unit(0, 0, 1)},
    ]
    output = write_output(tmp_path / "out", [twins])
    curate(CurateConfig(output=output))
    rows = {r["id"]: r for r in records_of(output)}
    assert [rows[i]["reason"] for i in "yxzw"] == ["exact_duplicate", "kept", "near_duplicate", "kept"]
    assert rows["y"]["duplicate_of"] == rows["z"]["duplicate_of"] == "images/x/0.png"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"min_clip_score": 1.01}, "in \\[-1, 1\\]"),
        ({"min_clip_score": -1.5}, "in \\[-1, 1\\]"),
        ({"near_duplicate": 0.0}, "in \\(0, 1\\]"),
        ({"near_duplicate": 1.0001}, "in \\(0, 1\\]"),
        ({"clusters": 0}, "at least 1"),
        ({"format": "tar"}, "one of files, webdataset, parquet"),
        ({"format": "parquet"}, "give --export DEST too"),
    ],
)
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(CurationError, match=message):
        CurateConfig(output="/tmp/x", **settings)


def test_edges_of_the_ranges_are_accepted():
    CurateConfig(output="/x", min_clip_score=-1, near_duplicate=1, clusters=1)
    CurateConfig(output="/x", min_clip_score=1, near_duplicate=1e-9, export="/y", format="files")


def test_what_is_not_a_finished_output_is_refused_before_any_work(tmp_path, monkeypatch):
    calls = inline(monkeypatch)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurationError, match="not an unclip-batch output: it has no _job.json"):
        curate(CurateConfig(output=str(tmp_path / "empty")))
    output = write_output(tmp_path / "out", SHARDS)
    (tmp_path / "out/_SUCCESS").unlink()
    with pytest.raises(CurationError, match="unfinished job \\(no _SUCCESS\\): rerun the job"):
        curate(CurateConfig(output=output))
    assert calls == [] and not (tmp_path / "out/curation").exists()


def test_embeddings_of_mixed_dimensions_are_refused_before_any_records(tmp_path, monkeypatch):
    calls = inline(monkeypatch)
    monkeypatch.setattr(curation, "IMAGES_PER_PART", 5)  # a shard a part: each part alone is consistent
    output = write_output(tmp_path / "out", SHARDS, dims=[8, 6])
    with pytest.raises(CurationError, match="mixed dimensions across the output: \\[6, 8\\]"):
        curate(CurateConfig(output=output))
    assert {name for name, _ in calls} == {"scan"} and not (tmp_path / "out/curation/records").exists()
    one = [[{**SHARDS[0][0]}, {**SHARDS[0][1], "vector": unit(1)[:5]}]]
    output = write_output(tmp_path / "one", one)
    with pytest.raises(CurationError, match="mixed dimensions \\(5 to 8\\)"):
        curate(CurateConfig(output=output))


def test_an_output_of_a_model_without_clip_and_without_embeddings_is_refused(tmp_path, monkeypatch):
    inline(monkeypatch)
    output = write_output(tmp_path / "out", SHARDS, embeddings=False)
    record = json.loads((tmp_path / "out/_job.json").read_text())
    (tmp_path / "out/_job.json").write_text(json.dumps({**record, "model": "null"}))
    with pytest.raises(CurationError, match="no CLIP image encoder to compute them"):
        curate(CurateConfig(output=output))


def test_near_duplicates_are_the_same_tile_by_tile():
    rng = np.random.default_rng(0)
    vectors = curation.normalised(rng.standard_normal((50, 4)).astype(np.float32))
    vectors[17] = vectors[3]
    whole = curation.near_duplicates(vectors)
    for tile in (1, 3, 7, 49):  # BLAS rounds blocks of other shapes differently in the last bit: TILE is fixed
        tiled = curation.near_duplicates(vectors, tile=tile)
        assert np.array_equal(tiled[0], whole[0]) and np.allclose(tiled[1], whole[1], rtol=0, atol=1e-6)
    again = curation.near_duplicates(vectors.copy(), tile=7)
    assert np.array_equal(again[1], curation.near_duplicates(vectors, tile=7)[1])
    assert whole[0][0] == -1 and whole[1][0] == -np.inf
    assert whole[0][17] == 3 and whole[1][17] == pytest.approx(1.0)
    same = np.repeat(vectors[:1], 4, axis=0)  # equal similarities: the best-ranked image above wins
    assert curation.near_duplicates(same, tile=2)[0].tolist() == [-1, 0, 0, 0]


def test_clusters_are_packed_into_ranges_of_about_a_bucket():
    assert curation.pack_clusters({0: 3, 1: 3, 2: 3, 4: 9}, 6, per_bucket=6) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert curation.pack_clusters({}, 3, per_bucket=6) == [(0, 3)]
    assert curation.pack_clusters({0: 10}, 1, per_bucket=6) == [(0, 1)]


def test_a_cluster_too_large_is_split_and_every_image_still_has_one_record(tmp_path, monkeypatch):
    inline(monkeypatch)
    monkeypatch.setattr(curation, "MAX_CLUSTER", 3)
    monkeypatch.setattr(curation, "IMAGES_PER_CLUSTER", 2)
    output = write_output(tmp_path / "out", SHARDS)
    curate(CurateConfig(output=output, clusters=1))
    rows = records_of(output)
    assert len(rows) == 9 and len({(r["id"], r["k"]) for r in rows}) == 9
    reasons = {(r["id"], r["k"]): r["reason"] for r in rows}
    assert reasons[("a", 0)] == "exact_duplicate" and reasons[("c", 0)] == "near_duplicate"


def test_the_same_records_byte_for_byte_whatever_order_the_tasks_run_in(tmp_path, monkeypatch):
    monkeypatch.setattr(curation, "IMAGES_PER_PART", 5)  # two parts, two sha256 buckets
    inline(monkeypatch)
    first = write_output(tmp_path / "a", SHARDS)
    curate(CurateConfig(output=first, seed=3))

    def backwards(stage, items, plan, **kwargs):
        return [stage(plan, i, **kwargs) for i in reversed(items)][::-1]

    monkeypatch.setattr(pipeline, "each", backwards)
    second = write_output(tmp_path / "b", SHARDS)
    curate(CurateConfig(output=second, seed=3))
    for name in ("00000.parquet", "00001.parquet"):
        assert (tmp_path / "a/curation/records" / name).read_bytes() == (
            tmp_path / "b/curation/records" / name
        ).read_bytes()


def test_a_curation_stopped_mid_way_resumes_after_its_finished_tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(curation, "IMAGES_PER_PART", 5)
    calls = inline(monkeypatch)
    reference = write_output(tmp_path / "ref", SHARDS)
    curate(CurateConfig(output=reference, min_clip_score=0.1))
    output = write_output(tmp_path / "out", SHARDS)
    real = curation.dedup

    def dies(plan, index, ranges):
        raise KeyboardInterrupt("the driver is killed")

    monkeypatch.setattr(curation, "dedup", dies)
    with pytest.raises(KeyboardInterrupt):
        curate(CurateConfig(output=output, min_clip_score=0.1))
    monkeypatch.setattr(curation, "dedup", real)
    calls.clear()
    summary = curate(CurateConfig(output=output, min_clip_score=0.1))
    assert {name for name, _ in calls} == {"dedup", "finalize"}  # only what had not finished
    for name in ("00000.parquet", "00001.parquet"):
        assert (tmp_path / "out/curation/records" / name).read_bytes() == (
            tmp_path / "ref/curation/records" / name
        ).read_bytes()
    calls.clear()
    assert curate(CurateConfig(output=output, min_clip_score=0.1)) == summary and calls == []  # done: nothing to do
    other = curate(CurateConfig(output=output, min_clip_score=0.3))  # other settings: a curation of its own
    assert other["by_reason"]["low_clip_score"] == 5 and len(records_of(output)) == 9


def test_the_export_holds_the_kept_images_and_their_metadata_only(tmp_path, monkeypatch):
    inline(monkeypatch)
    output = write_output(tmp_path / "out", SHARDS)
    dest = tmp_path / "kept"
    summary = curate(CurateConfig(output=output, min_clip_score=0.1, export=str(dest), format="files"))
    kept = sorted(r["image_key"] for r in records_of(output) if r["keep"])
    assert sorted(str(p.relative_to(dest)) for p in dest.glob("images/*/*.png")) == kept
    for key in kept:
        assert (dest / key).read_bytes() == (tmp_path / "out" / key).read_bytes()
    metadata = pq.read_table(dest / "metadata").to_pylist()
    assert sorted(m["image_key"] for m in metadata) == kept and summary["export"]["images"] == 4
    record = json.loads((dest / "_export.json").read_text())
    assert record == {"source": output, "format": "files", "curation": summary["settings"]}
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    curate(CurateConfig(output=output, min_clip_score=0.1, export=str(dest), format="files"))  # done: untouched
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == before
    with pytest.raises(CurationError, match="holds an export of .* in files by a curation with other settings"):
        curate(CurateConfig(output=output, min_clip_score=0.3, export=str(dest), format="files"))


@pytest.mark.parametrize(
    "where, message",
    [
        ("out", "not the output .* or a folder inside or around it"),
        ("out/kept", "not the output"),
        ("", "not the output"),
        ("busy", "holds other files \\(notes.txt\\): give a new folder"),
        ("other-export", "holds an export of /elsewhere in files: give a new folder$"),
    ],
)
def test_an_export_goes_to_a_folder_of_its_own(tmp_path, where, message):
    output = Location(write_output(tmp_path / "out", SHARDS))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    (tmp_path / "other-export").mkdir()
    (tmp_path / "other-export/_export.json").write_text(json.dumps({"source": "/elsewhere", "format": "files"}))
    with pytest.raises(CurationError, match=message):
        export.check_destination(output, Location(str(tmp_path / where)), "files", {})
    export.check_destination(output, Location(str(tmp_path / "new")), "files", {})


def test_a_stopped_export_resumes_to_the_same_bytes_and_reads_only_the_jobs_files(tmp_path, monkeypatch):
    inline(monkeypatch)
    output = write_output(tmp_path / "out", SHARDS)
    (tmp_path / "out/metadata/notes.parquet").write_bytes(b"not a shard")  # not the job's: left alone
    dest = tmp_path / "kept"
    curate(CurateConfig(output=output, export=str(dest), format="webdataset"))
    whole = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file() and p.name != "_SUCCESS"}
    (dest / "_SUCCESS").unlink()  # stopped after shard 00000 ...
    (dest / "metadata/00001.parquet").unlink()
    (dest / "shards/00001.tar").unlink()
    curate(CurateConfig(output=output, export=str(dest), format="webdataset"))
    again = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file() and p.name != "_SUCCESS"}
    assert again == whole and sorted(str(p) for p in whole if p.suffix == ".tar") == [
        "shards/00000.tar",
        "shards/00001.tar",
    ]


def test_an_export_refuses_metadata_naming_an_image_no_job_writes(tmp_path, monkeypatch):
    inline(monkeypatch)
    output = write_output(tmp_path / "out", [[{**SHARDS[0][0], "id": "../../escape"}]])
    with pytest.raises(CurationError, match="image key 'images/../../escape/0.png' is not one a job writes"):
        curate(CurateConfig(output=output, export=str(tmp_path / "kept"), format="files"))
    assert not list((tmp_path / "kept").rglob("*.png"))
