import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_manifest

from unclip_batch import plan
from unclip_batch.errors import ManifestError, SetupError
from unclip_batch.manifest import manifest_files
from unclip_batch.storage import Location, Stores


def test_shards_are_planned_from_footers_and_cover_every_row_once(tmp_path):
    folder = tmp_path / "manifests"
    write_manifest(folder / "a.parquet", [{"id": f"a{i}"} for i in range(5)])
    write_manifest(folder / "b.parquet", [{"id": f"b{i}"} for i in range(3)])
    files = manifest_files([str(folder)])
    assert [(f.rows, f.first) for f in files] == [(5, 0), (3, 5)]  # a folder's rows count on across its files
    shards = plan.plan_shards(files, rows_per_shard=2, limit=6)
    assert [(s.name, s.path.rsplit("/", 1)[1], s.start, s.stop, s.limit) for s in shards] == [
        ("00000", "a.parquet", 0, 2, 2),
        ("00001", "a.parquet", 2, 4, 4),
        ("00002", "a.parquet", 4, 5, 5),
        ("00003", "b.parquet", 0, 2, 1),  # --limit 6 ends the job inside it
        ("00004", "b.parquet", 2, 3, 2),  # planned (the output may hold it), nothing to do this run
    ]
    assert [(s.first, s.offset) for s in shards] == [(0, 0), (2, 2), (4, 4), (5, 5), (7, 7)]
    with pytest.raises(ManifestError, match="has no rows"):
        manifest_files([write_manifest(tmp_path / "empty.parquet", [], schema=pa.schema([("id", pa.string())]))])


def work(out, **kwargs) -> plan.Work:
    from unclip_batch.manifest import SizeRule

    return plan.Work(
        output=Location(str(out)), stores=Stores(None), defaults={}, size=SizeRule(64, 8, 1024), batch_size=4, **kwargs
    )


def test_a_shard_read_keeps_what_is_recorded_and_redoes_the_rest(tmp_path):
    from unclip_batch.manifest import input_hash

    rows = [{"id": "a", "prompt": "red"}, {"id": "b", "prompt": "blue"}, {"id": "c", "prompt": "green"}]
    rows += [{"id": "a", "prompt": "again"}, {"id": "bad id", "prompt": "x"}, {"id": "d", "prompt": "grey"}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    (shard,) = plan.plan_shards(manifest_files([manifest]), rows_per_shard=10)
    out = tmp_path / "out"
    h = [input_hash(r) for r in rows]

    def record(i, **more):
        return {
            "id": rows[i]["id"],
            "manifest": manifest,
            "manifest_row": i,
            "input_hash": h[i],
            **more,
        }

    (out / "metadata").mkdir(parents=True)
    (out / "errors").mkdir()
    pq.write_table(
        pa.Table.from_pylist([record(0, k=0), record(0, k=1), record(2, k=0)]), out / "metadata/00000.parquet"
    )
    pq.write_table(pa.Table.from_pylist([record(1, code="image_invalid")]), out / "errors/00000.parquet")
    duplicates = {bytes(manifest_digest("a")): 0}
    blocks, errors, report = plan.read_shard(shard, work(out, duplicates=duplicates))
    # a, b (an error: skipped) and c are recorded; the second "a" is a duplicate, "bad id" invalid, d to do.
    assert [e["code"] for e in errors] == ["duplicate_id", "invalid_id"]
    assert [row for block in blocks for row in block["id"].to_pylist()] == ["d"]
    assert (report["rows"], report["kept"], report["kept_failed"], report["changed"]) == (6, 3, 1, 0)
    assert plan.changed_rows(shard, output=Location(str(out)), duplicates=duplicates, stores=Stores(None)) == []
    # --retry-errors redoes b; a row edited in place (c) is a changed row.
    blocks, _, report = plan.read_shard(shard, work(out, duplicates=duplicates, retry_errors=True))
    assert [r for b in blocks for r in b["id"].to_pylist()] == ["b", "d"] and report["retried"] == 1
    rows[2]["prompt"] = "yellow"
    write_manifest(tmp_path / "m.parquet", rows)
    (shard,) = plan.plan_shards(manifest_files([manifest]), rows_per_shard=10)
    assert plan.changed_rows(shard, output=Location(str(out)), duplicates=duplicates, stores=Stores(None)) == ["c"]
    blocks, _, report = plan.read_shard(shard, work(out, duplicates=duplicates))
    assert sorted(r for b in blocks for r in b["id"].to_pylist()) == ["c", "d"] and report["changed"] == 1


def manifest_digest(row_id: str):
    from unclip_batch.manifest import id_digests

    return id_digests(pa.array([row_id]))[0].tobytes()


def test_the_output_says_which_shards_are_finished_and_refuses_strange_ones(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}"} for i in range(5)])
    shards = plan.plan_shards(manifest_files([manifest]), rows_per_shard=2)
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "metadata").mkdir()
    stats = {k: getattr(shards[0], k) for k in ("manifest", "path", "start", "stop", "version")}
    (out / "shards" / "00000_stats.json").write_text(json.dumps({**stats, "rows": 2, "failed": 0}))
    (out / "shards" / "00001_stats.json").write_text(
        json.dumps({**stats, "start": 2, "stop": 4, "version": "9:old", "failed": 1})
    )
    pq.write_table(pa.table({"id": ["r4"]}), out / "metadata" / "00002.parquet")
    state = plan.output_state(Location(str(out)), "shards")
    assert sorted(state.stats) == ["00000", "00001"] and state.recorded == {"00002"}
    visit, skipped = plan.to_visit(shards, state, retry_errors=False)
    # 00001's stats are of another version of the file (its manifest was written again): read again.
    assert [s.name for s in visit] == ["00001", "00002"] and len(skipped) == 1
    visit, _ = plan.to_visit(shards[:1], plan.output_state(Location(str(out)), "shards"), retry_errors=True)
    assert visit == []  # finished, and no errors to retry
    plan.check_layout(shards, state, Location(str(out)))
    pq.write_table(pa.table({"id": ["x"]}), out / "metadata" / "part-0f3a-00000.parquet")  # an older layout
    with pytest.raises(SetupError, match="do not plan .*part-0f3a-00000"):
        plan.check_layout(shards, plan.output_state(Location(str(out)), "shards"), Location(str(out)))


def test_another_job_on_the_same_output_is_refused(tmp_path):
    from unclip_batch.writer import write_json

    out = Location(str(tmp_path))
    record = {"model": "tiny", "fingerprint": "abc", "weights": "w1"}
    assert plan.check_job_record(out, record) is False
    write_json(out, plan.JOB_RECORD, record)
    assert plan.check_job_record(out, record) is True
    assert plan.check_job_record(out, {**record, "weights": None}) is True  # weights not known here: not compared
    with pytest.raises(SetupError, match="--overwrite"):
        plan.check_job_record(out, {"model": "other", "fingerprint": "def"})
    with pytest.raises(SetupError, match="other weights .*w1 there, w2 here"):
        plan.check_job_record(out, {**record, "weights": "w2"})


def test_overwrite_removes_what_a_job_writes_by_name(tmp_path):
    """The names are the contract (a folder a job writes and --overwrite leaves behind would mix two runs)."""
    folders = ("images", "metadata", "errors", "shards", "data", "stats", "report", "curation", "_parts")
    for name in folders:
        (tmp_path / name / "deep").mkdir(parents=True)
        (tmp_path / name / "deep" / "x").write_text("x")
    for name in ("_SUCCESS", "_job.json"):
        (tmp_path / name).write_text("{}")
    plan.clear_output(Location(str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_removes_every_name_of_ours_from_a_jobs_output_and_nothing_else(tmp_path):
    for name in plan.OURS:
        (tmp_path / name / "x").mkdir(parents=True) if "." not in name and name[0] != "_" else None
    for name in ("_SUCCESS", "_job.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "_parts" / "00000").mkdir(parents=True)
    plan.clear_output(Location(str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "_job.json").write_text("{}")
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="notes.txt beside a job's results"):
        plan.clear_output(Location(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_job.json", "images", "notes.txt"]


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
            variation_strength=0.3,
            negative_prompt="",
            prompt="p",
            num_images=random.choice([1, 1, 1, 2, 4]),
            best_of=random.choice([1, 1, 2, 4]),  # each image is best_of model images: what fills a call
        )
        for i in range(500)
    ]
    blocks = list(plan.model_blocks(rows, batch))
    flat = [row for block in blocks for row in block]
    assert sorted(r.id for r in flat) == sorted(r.id for r in rows)
    assert flat == sorted(rows, key=lambda row: call_key(vars(row)))  # stable: manifest order within a group
    per_group = Counter()
    for row in rows:
        per_group[call_key(vars(row))] += row.num_images * row.best_of
    calls = 0
    for block in blocks:
        in_block = Counter()
        for row in block:
            in_block[call_key(vars(row))] += row.num_images * row.best_of
        calls += sum(math.ceil(n / batch) for n in in_block.values())
        most = max(r.num_images * r.best_of for r in rows)
        assert sum(in_block.values()) < 2 * batch * plan.CALLS_PER_BLOCK + most
    assert calls == sum(math.ceil(n / batch) for n in per_group.values())  # no call padded twice
    assert len(blocks) > 5  # and still small blocks, written as they are made


def test_the_checks_before_compute_read_through_a_short_outage(tmp_path, monkeypatch):
    """The id scan and the changed-rows check read the manifest and the records through a blink of
    storage, as the read stage and every write do (not failing a resumed job at its start)."""
    from helpers import fake_storage_clock

    from unclip_batch import manifest, pipeline

    slept = fake_storage_clock(monkeypatch).slept  # the retries' waits, without waiting
    rows = [{"id": "a", "prompt": "red"}, {"id": "b", "prompt": "blue"}]
    files = manifest_files([write_manifest(tmp_path / "m.parquet", rows)])
    (shard,) = plan.plan_shards(files, rows_per_shard=10)

    def blinking(function):
        calls = []

        def once_down(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("endpoint down")
            return function(*args, **kwargs)

        return once_down, calls

    read_rows, reads = blinking(manifest.read_rows)
    monkeypatch.setattr(pipeline, "read_rows", read_rows)
    digests, tasks = pipeline._scan_file(files[0], 2, Stores(None), retry_for_s=10)
    assert len(digests) == 2 and tasks == {"generate"} and len(reads) == 2
    records, reads = blinking(plan.shard_records)
    monkeypatch.setattr(plan, "shard_records", records)
    assert (
        plan.changed_rows(
            shard, output=Location(str(tmp_path / "out")), duplicates={}, stores=Stores(None), retry_for_s=10
        )
        == []
    )
    assert len(reads) == 2 and slept == [0.5, 0.5]  # each read once more, after the first wait


def test_output_state_names_shards_by_their_files(tmp_path):
    """A stats file's shard is its name before _stats.json; a recorded shard has metadata or errors."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00003_stats.json").write_text('{"rows": 4}')
    (tmp_path / "shards" / "00003.tar").write_bytes(b"")
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "00001.parquet").write_bytes(b"")
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "00002.parquet").write_bytes(b"")
    (tmp_path / "errors" / "notes.txt").write_text("not a shard")
    state = plan.output_state(Location(str(tmp_path)), "shards")
    assert state.stats == {"00003": {"rows": 4}}
    assert state.recorded == frozenset({"00001", "00002"})
    assert plan.output_state(Location(str(tmp_path)), "stats").stats == {}


def test_another_jobs_output_is_refused_with_the_settings_that_differ(tmp_path):
    from unclip_batch.writer import write_json

    out = Location(str(tmp_path))
    there = plan.job_record("tiny", {"num_inference_steps": 4, "guidance_scale": 4.0}, 8, format="files")
    write_json(out, plan.JOB_RECORD, there)
    here = plan.job_record("tiny", {"num_inference_steps": 6, "guidance_scale": 4.0}, 16, format="files")
    with pytest.raises(SetupError) as refused:
        plan.check_job_record(out, here)
    assert "holds results of another job (batch_size 8 there, 16 here; num_inference_steps 4 there, 6 here)" in str(
        refused.value
    )


def test_shards_past_the_limit_are_neither_read_nor_skipped_and_errors_are_read_again_to_retry(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "p"} for i in range(6)])
    shards = plan.plan_shards(manifest_files([manifest]), 2, limit=2)
    assert [(s.start, s.limit) for s in shards] == [(0, 2), (2, 2), (4, 4)]
    empty = plan.OutputState(stats={}, recorded=frozenset())
    assert [s.name for s in plan.to_visit(shards, empty, retry_errors=False)[0]] == ["00000"]
    finished = {k: getattr(shards[0], k) for k in ("manifest", "path", "start", "stop", "version")}
    state = plan.OutputState(stats={"00000": {**finished, "failed": 1}}, recorded=frozenset({"00000"}))
    assert plan.to_visit(shards, state, retry_errors=False) == ([], [{**finished, "failed": 1}])
    assert [s.name for s in plan.to_visit(shards, state, retry_errors=True)[0]] == ["00000"]


def test_the_layout_check_names_five_strange_shards_and_says_there_are_more(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "r0", "prompt": "p"}])
    shards = plan.plan_shards(manifest_files([manifest]), 10)
    state = plan.OutputState(stats={}, recorded=frozenset(f"9000{i}" for i in range(7)))
    with pytest.raises(SetupError, match=r"do not plan \(90000, 90001, 90002, 90003, 90004 \.\.\.\)"):
        plan.check_layout(shards, state, Location(str(tmp_path)))
    five = plan.OutputState(stats={}, recorded=frozenset(f"9000{i}" for i in range(5)))
    with pytest.raises(SetupError, match=r"do not plan \(90000, 90001, 90002, 90003, 90004\)"):
        plan.check_layout(shards, five, Location(str(tmp_path)))


def test_model_blocks_exactly_at_their_edges():
    """Batch 2: a block holds 8 images (4 calls); it ends only where a call ends (an even count of the group's
    images), or anyway at 16 images."""
    from types import SimpleNamespace

    def rows(*sizes, task="generate"):
        base = dict(task=task, width=64, height=64, num_inference_steps=2, guidance_scale=1.0, negative_prompt="")
        base |= dict(prior_num_inference_steps=2, prior_guidance_scale=1.0, variation_strength=0.3, prompt="p")
        return [SimpleNamespace(id=f"{task}{i}", num_images=n, best_of=1, **base) for i, n in enumerate(sizes)]

    sizes = lambda blocks: [[r.num_images for r in block] for block in blocks]  # noqa: E731
    assert sizes(plan.model_blocks(rows(*[1] * 9), 2)) == [[1] * 8, [1]]  # 8 images: a block, at a call's end
    assert sizes(plan.model_blocks(rows(1, 1, 1, 1, 1, 1, 1, 2, 1), 2)) == [[1] * 7 + [2, 1]]  # 9, odd: no cut
    assert sizes(plan.model_blocks(rows(3, 3, 3, 3, 3, 3), 2)) == [[3, 3, 3, 3], [3, 3]]  # 9 is odd: on; 12 ends a call
    assert sizes(plan.model_blocks(rows(1, 1, 1, 1, 1, 1, 1), 2)) == [[1] * 7]
    # Exactly twice the target with the group mid-call (15 of its images): cut there all the same.
    at_twice = rows(1) + rows(1, 2, 2, 2, 2, 2, 2, 2, 1, task="variation")
    assert sizes(plan.model_blocks(at_twice, 2)) == [[1, 1, 2, 2, 2, 2, 2, 2, 2], [1]]
    two_groups = rows(1, 1, 1) + rows(1, 1, 1, 1, 1, 1, 1, task="variation")
    blocks = list(plan.model_blocks(two_groups, 2))
    # generate's 3 images, then variation's: at 8 images the variations' 5 end no call; at 9, 6 do.
    assert [[r.id for r in b] for b in blocks] == [
        ["generate0", "generate1", "generate2"] + [f"variation{i}" for i in range(6)],
        ["variation6"],
    ]


def test_a_shards_read_reports_its_counts_and_unknown_words(tmp_path):
    from unclip_batch.manifest import SizeRule

    manifest = write_manifest(
        tmp_path / "m.parquet",
        [{"id": "a", "prompt": "a red circle"}, {"id": "b", "prompt": "a red cat"}, {"id": "bad id", "prompt": "p"}],
    )
    (shard,) = plan.plan_shards(manifest_files([manifest]), 10)
    work = plan.Work(
        output=Location(str(tmp_path / "out")),
        stores=Stores(None),
        defaults={
            "num_inference_steps": 2,
            "guidance_scale": 1.0,
            "prior_num_inference_steps": 2,
            "prior_guidance_scale": 1.0,
        },
        size=SizeRule(default=64, multiple=8, maximum=256),
        batch_size=2,
        vocabulary=frozenset({"a", "red", "circle", "p"}),
    )
    blocks, errors, report = plan.read_shard(shard, work)
    assert report == {
        "rows": 3,
        "kept": 0,
        "kept_failed": 0,
        "retried": 0,
        "changed": 0,
        "invalid": 1,
        "words": {"rows": 1, "checked": 2, "words": {"cat": 1}, "first_ids": ["b"]},
    }
    assert [e["id"] for e in errors] == ["bad id"] and len(blocks) == 1
    block = blocks[0]
    for column in ("stage", "code", "message"):  # filled in by later stages
        assert block[column].type == pa.string() and block[column].to_pylist() == ["", ""]


def test_an_output_without_a_job_record_may_hold_foreign_files_but_none_of_ours(tmp_path):
    out = Location(str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "images").mkdir()  # an emptied folder of ours: nothing in it
    assert plan.check_job_record(out, plan.job_record("tiny", {}, 8)) is False
    (tmp_path / "_SUCCESS").write_text("{}")
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "00000.parquet").write_bytes(b"x")
    with pytest.raises(SetupError, match=f"^{tmp_path} holds _SUCCESS, metadata but no _job.json"):
        plan.check_job_record(out, plan.job_record("tiny", {}, 8))


def test_a_block_is_cut_anyway_at_twice_its_target():
    from types import SimpleNamespace

    base = dict(task="generate", width=64, height=64, num_inference_steps=2, guidance_scale=1.0, negative_prompt="")
    base |= dict(prior_num_inference_steps=2, prior_guidance_scale=1.0, variation_strength=0.3, prompt="p")
    rows = [SimpleNamespace(id=f"r{i}", num_images=n, best_of=1, **base) for i, n in enumerate([5, 5, 5, 1, 1])]
    # Batch 2, target 8: 5 and 10 are past it, but 5, 15 are odd (mid-call) and 10 is even: cut at 10.
    assert [[r.num_images for r in b] for b in plan.model_blocks(rows, 2)] == [[5, 5], [5, 1, 1]]
    many = [SimpleNamespace(id=f"r{i}", num_images=3, best_of=1, **base) for i in range(12)]
    # Batch 4, target 16: the group's count is a multiple of 4 every 12 images, first past 16 at 24.
    assert [len(b) for b in plan.model_blocks(many, 4)] == [8, 4]
    # Rows of 15 images, batch 16 (target 64): the count reaches a call's end only at 240, so the block is cut
    # anyway once past twice the target: at 135 images, 9 rows.
    wide = [SimpleNamespace(id=f"r{i}", num_images=15, best_of=1, **base) for i in range(12)]
    assert [len(b) for b in plan.model_blocks(wide, 16)] == [9, 3]


def test_the_job_record_and_its_fingerprint_are_pinned():
    """An output's _job.json is compared with every later run's: its fields and its fingerprint's value must
    not move between versions, or a resume of an older output would be refused (or a changed job let in)."""
    from unclip_batch import __version__

    record = plan.job_record("tiny", {"num_inference_steps": 4}, 8)
    assert record == {
        "model": "tiny",
        "defaults": {"num_inference_steps": 4},
        "batch_size": 8,
        "scheduler": "default",
        "embeddings": False,
        "format": "files",
        "rows_per_shard": 1000,
        "unclip_batch": __version__,
        "weights": None,
        "fingerprint": "521b143bdfb3de42",
    }
    assert list(record) == list(plan.job_record("m", {}, 1))  # the file's field order too
    other = plan.job_record("tiny", {"num_inference_steps": 4}, 8, "ddim", True, "parquet", 50, "abc")
    assert other["fingerprint"] == "f6f155d220535dfe" and other["weights"] == "abc"
    # The weights and the version are no part of the fingerprint: checked on their own, or not at all.
    assert plan.job_record("tiny", {"num_inference_steps": 4}, 8, weights="w")["fingerprint"] == "521b143bdfb3de42"
    # Defaults given in another order are the same job.
    one, two = ({"guidance_scale": 4.0, "num_inference_steps": 4}, {"num_inference_steps": 4, "guidance_scale": 4.0})
    assert plan.job_record("tiny", one, 8)["fingerprint"] == plan.job_record("tiny", two, 8)["fingerprint"]


def test_each_row_against_its_earlier_record_kept_redone_or_changed():
    """sort_out, case by case: what a rerun keeps, redoes and calls changed, from the record at each position."""
    from unclip_batch.manifest import MANIFEST_ROW, input_hash

    def record(position, row_id="r", prompt="p"):
        return {MANIFEST_ROW: position, "id": row_id, "prompt": prompt}

    records = [record(p) for p in range(9)] + [record(9, row_id=None, prompt="q")]
    same = input_hash(record(0))
    previous = {
        1: {"manifest": "m", "id": "r", "input_hash": same, "code": ""},  # kept
        2: {"manifest": "m", "id": "r", "input_hash": same, "code": "model_error"},  # an error: kept, or retried
        3: {"manifest": "m", "id": "r", "input_hash": same, "code": "image_unreadable"},  # another
        4: {"manifest": "m", "id": "other", "input_hash": same, "code": ""},  # another row was here
        5: {"manifest": "elsewhere", "id": "r", "input_hash": same, "code": ""},  # another manifest's row
        6: {"manifest": None, "id": "r", "input_hash": same, "code": ""},  # from before manifests were recorded
        7: {"manifest": "m", "id": "r", "input_hash": None, "code": ""},  # from before input hashes
        8: {"manifest": "m", "id": "r", "input_hash": "0" * 16, "code": ""},  # the row changed
        9: {"manifest": "m", "id": None, "input_hash": same, "code": ""},  # changed, and has no id to name it by
    }
    skipping = plan.sort_out(records, previous, "m", retry_errors=False)
    assert [r[MANIFEST_ROW] for r in skipping.todo] == [0, 4, 5, 8, 9]
    assert (skipping.kept, skipping.kept_failed, skipping.retried) == (5, 2, 0)
    assert skipping.changed == ["r", "r", "r", "m#9"]
    retrying = plan.sort_out(records, previous, "m", retry_errors=True)
    assert [r[MANIFEST_ROW] for r in retrying.todo] == [0, 2, 3, 4, 5, 8, 9]
    assert (retrying.kept, retrying.kept_failed, retrying.retried) == (3, 0, 2)
