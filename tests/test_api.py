"""The Python API on a real Ray: ``run`` is the CLI's job, and the processor in a Ray Data pipeline of one's own
gives the job's bytes for every task, bad rows as data."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import FAST, cli_flags, images_of, job, write_manifest

import unclip_batch as ub
from unclip_batch.cli import main
from unclip_batch.job import run_job
from unclip_batch.manifest import default_seed

pytestmark = pytest.mark.slow
TASK_ROWS = [
    {"id": "gen", "prompt": "a red circle", "num_images": 2},
    {"id": "var", "task": "variation", "image": "img/scene.png"},
    {"id": "inp", "task": "inpaint", "image": "img/scene.png", "mask": "img/mask.png", "prompt": "a blue square"},
    {"id": "hole", "task": "inpaint", "image": "img/hole.png", "prompt": "a green triangle"},
    {"id": "mix", "task": "interpolate", "image": "img/scene.png", "prompt2": "a blue square", "num_images": 3},
    {
        "id": "diff",
        "task": "text_diff",
        "image": "img/scene.png",
        "source_prompt": "a red circle",
        "prompt": "a blue circle",
    },
]


def test_run_is_the_clis_job_and_raises_what_the_cli_exits_with(ray_local, sources, tmp_path):
    manifest = write_manifest(
        sources / "m.parquet", [*TASK_ROWS[:2], {"id": "gone", "task": "variation", "image": "x.png"}]
    )
    with pytest.raises(ub.RowsFailed, match="1 rows failed .image_unreadable: 1.") as failed:
        ub.run(manifest, output=str(tmp_path / "api"), model="tiny", device="cpu", **FAST)
    assert failed.value.summary.succeeded == 2 and failed.value.summary.errors_by_code == {"image_unreadable": 1}
    again = ub.run([manifest], output=str(tmp_path / "api"), model="tiny", device="cpu", allow_failures=True, **FAST)
    assert (again.done_before, again.succeeded, again.images) == (3, 0, 0)  # a resume: nothing left to do
    # The CLI in this process, on the session's Ray (a process of its own would start a Ray: the suite's time).
    assert main(["run", manifest, "-o", str(tmp_path / "cli"), "--model", "tiny", "--quiet", *cli_flags()]) == 4
    assert images_of(tmp_path / "api") == images_of(tmp_path / "cli") and len(images_of(tmp_path / "cli")) == 3
    with pytest.raises(ub.SetupError, match="does not exist"):
        ub.run(str(tmp_path / "none.parquet"), output=str(tmp_path / "x"), model="tiny")
    with pytest.raises(ub.SetupError, match="unknown option.*colour"):
        ub.run(manifest, output=str(tmp_path / "x"), colour="red")


def test_the_processor_gives_the_jobs_bytes_for_every_task(ray_local, sources, tmp_path):
    """Each task through the processor (sources as absolute paths, and as bytes) gives the PNG bytes the job
    writes for the same row."""
    import ray

    manifest = write_manifest(sources / "m.parquet", TASK_ROWS)
    run_job(job([manifest], tmp_path / "job", batch_size=4))
    expected = images_of(tmp_path / "job")
    absolute = [{**r, **{k: str(sources / r[k]) for k in ("image", "mask") if k in r}} for r in TASK_ROWS]
    # The same rows with their sources as bytes, under other ids and the first rows' seeds: the same images.
    as_bytes = [
        {
            **r,
            "id": f"{r['id']}-bytes",
            "seed": default_seed(r["id"]),
            **{k: (sources / r[k]).read_bytes() for k in ("image", "mask") if k in r},
        }
        for r in TASK_ROWS
        if r["id"] in ("var", "inp")
    ]
    config = ub.ProcessorConfig(model="tiny", device="cpu", batch_size=4, defaults=FAST)
    rows = ub.build_processor(config)(ray.data.from_items(absolute + as_bytes)).take_all()
    assert not [r for r in rows if r["error_code"]]
    made = {f"{r['id']}/{r['k']}.png": r["png"] for r in rows}
    assert {k: v for k, v in made.items() if "-bytes" not in k} == expected
    for name in ("var", "inp"):
        assert made[f"{name}-bytes/0.png"] == expected[f"{name}/0.png"]


def test_a_processor_pipeline_of_ones_own_to_webdataset_and_parquet(ray_local, tmp_path):
    """ray.data.from_items -> processor (preprocess from the user's columns) -> the user's filter -> Parquet and
    WebDataset, read back by pyarrow and webdataset; bad rows come out as error rows while the others succeed."""
    import ray
    import webdataset as wds

    captions = [
        {"uid": "a", "caption": "a red circle", "seed": 1},
        {"uid": "b", "caption": "a blue square", "seed": 2},
        {"uid": "bad id", "caption": "a green triangle", "seed": 3},
        {"uid": "v", "caption": "", "seed": 4, "task": "variation", "url": str(tmp_path / "missing.png")},
        {"uid": "t", "caption": "a white circle", "seed": 5, "task": "sketch"},
        {"uid": "boom", "caption": None, "seed": 6},
    ]

    def preprocess(row):
        if row["caption"] is None:
            raise ValueError("no caption")
        return {
            "id": row["uid"],
            "task": row.get("task") or "generate",
            "prompt": row["caption"],
            "seed": row["seed"],
            "image": row.get("url"),
        }

    config = ub.ProcessorConfig(model="tiny", device="cpu", batch_size=4, defaults=FAST, embeddings=True)
    processor = ub.build_processor(
        config, preprocess=preprocess, postprocess=lambda r: {**r, "keep": r["png"] is not None}
    )
    ds = processor(ray.data.from_items(captions)).materialize()
    rows = {r["uid"]: r for r in ds.take_all()}
    codes = {uid: r["error_code"] for uid, r in rows.items()}
    assert codes == {
        "a": None,
        "b": None,
        "bad id": "invalid_id",
        "v": "image_unreadable",
        "t": "unknown_task",
        "boom": "preprocess_failed",
    }
    assert "no caption" in rows["boom"]["error_message"] and rows["boom"]["id"] == ""
    assert rows["a"]["seed"] == 1 and len(rows["a"]["embedding"]) > 0 and rows["a"]["caption"] == "a red circle"
    kept = ds.filter(lambda r: r["keep"])
    kept.write_parquet(str(tmp_path / "parquet"))
    table = pq.read_table(tmp_path / "parquet")
    assert sorted(table["uid"].to_pylist()) == ["a", "b"] and all(table["png"].to_pylist())
    shards = kept.map(
        lambda r: {
            "__key__": r["uid"],
            "png": r["png"],
            "json": json.dumps({"prompt": r["caption"], "seed": r["seed"]}),
        }
    )
    shards.write_webdataset(str(tmp_path / "shards"), encoder=None)  # the PNG bytes as they are
    samples = list(
        wds.WebDataset(sorted(map(str, (tmp_path / "shards").glob("*.tar"))), shardshuffle=False).decode("pil")
    )
    assert sorted(s["__key__"] for s in samples) == ["a", "b"] and samples[0]["png"].size == (64, 64)
    with pytest.raises(Exception, match="postprocess raised on row 'a'"):
        ub.build_processor(config, postprocess=lambda r: 1 / 0)(
            ray.data.from_items([{"id": "a", "prompt": "x"}])
        ).take_all()
