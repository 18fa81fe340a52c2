import math

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
from helpers import write_manifest

from unclip_batch.errors import ManifestError
from unclip_batch.manifest import MAX_SEED, SizeRule, default_seed, extra_columns, read_manifests, validate

SIZE = SizeRule(default=64, multiple=4, maximum=1024)
DEFAULTS = {
    "num_inference_steps": 50,
    "guidance_scale": 4.0,
    "prior_num_inference_steps": 25,
    "prior_guidance_scale": 4.0,
}


def run_validate(tmp_path, rows, schema=None):
    return collect(read_manifests([write_manifest(tmp_path / "m.parquet", rows, schema)]))


def collect(table):
    good, bad = [], []
    for rows_, errors in validate(table, DEFAULTS, SIZE):
        good += rows_
        bad += errors
    return good, bad


def test_defaults_are_filled_and_relative_paths_resolve(tmp_path):
    good, bad = run_validate(
        tmp_path,
        [
            {"id": "a", "prompt": "a red circle"},
            {"id": "b", "task": "variation", "image": "img/x.png"},
            {"id": "c", "task": "inpaint", "image": "s3://bucket/x.png", "mask": "/abs/m.png", "prompt": "p"},
        ],
    )
    assert bad == []
    a, b, c = good
    assert (a.task, a.num_images, a.width, a.height, a.seed) == ("generate", 1, 64, 64, default_seed("a"))
    assert a.num_inference_steps == 50 and a.guidance_scale == 4.0
    assert b.image == str(tmp_path / "img" / "x.png")
    assert (c.image, c.mask) == ("s3://bucket/x.png", "/abs/m.png")


@pytest.mark.parametrize(
    "row, code",
    [
        ({"id": "", "prompt": "p"}, "invalid_id"),
        ({"id": None, "prompt": "p"}, "invalid_id"),
        ({"id": ".hidden", "prompt": "p"}, "invalid_id"),
        ({"id": "a/b", "prompt": "p"}, "invalid_id"),
        ({"id": "..", "prompt": "p"}, "invalid_id"),
        ({"id": "a b", "prompt": "p"}, "invalid_id"),
        ({"id": "x" * 129, "prompt": "p"}, "invalid_id"),
        ({"id": "t", "task": "paint", "prompt": "p"}, "unknown_task"),
        ({"id": "t", "prompt": "   "}, "missing_prompt"),
        ({"id": "t", "task": "inpaint", "image": "x.png"}, "missing_prompt"),
        ({"id": "t", "prompt": "p" * 1001}, "prompt_too_long"),
        ({"id": "t", "prompt": "caf\ufffd au lait"}, "invalid_prompt"),
        ({"id": "t", "prompt": "a red\x00circle"}, "invalid_prompt"),
        ({"id": "t", "prompt": "p", "negative_prompt": "\x1b[31m"}, "invalid_prompt"),
        ({"id": "a\\b", "prompt": "p"}, "invalid_id"),
        ({"id": "a\nb", "prompt": "p"}, "invalid_id"),
        ({"id": "t", "prompt": "p", "num_images": 0}, "invalid_num_images"),
        ({"id": "t", "prompt": "p", "num_images": 10_000}, "invalid_num_images"),
        ({"id": "t", "prompt": "p", "seed": -1}, "invalid_seed"),
        ({"id": "t", "prompt": "p", "seed": MAX_SEED + 1}, "invalid_seed"),
        ({"id": "t", "prompt": "p", "width": 30}, "unsupported_size"),
        ({"id": "t", "prompt": "p", "height": 4096}, "unsupported_size"),
        ({"id": "t", "prompt": "p", "num_inference_steps": 0}, "invalid_steps"),
        ({"id": "t", "prompt": "p", "prior_num_inference_steps": 1}, "invalid_steps"),
        ({"id": "t", "prompt": "p", "guidance_scale": -1.0}, "invalid_guidance"),
        ({"id": "t", "prompt": "p", "best_of": 17}, "invalid_best_of"),
        ({"id": "t", "task": "interpolate", "image": "a.png"}, "missing_source"),
        ({"id": "t", "task": "interpolate", "prompt": "p", "image2": "b.png", "prompt2": "q"}, "ambiguous_source"),
        ({"id": "t", "task": "interpolate", "prompt": "p", "prompt2": "q", "best_of": 2}, "invalid_best_of"),
        ({"id": "t", "task": "interpolate", "prompt": "p", "prompt2": "q", "mask": "m.png"}, "unused_column"),
        ({"id": "t", "task": "text_diff", "image": "x.png", "prompt": "a green square"}, "missing_prompt"),
        ({"id": "t", "task": "text_diff", "source_prompt": "s", "prompt": "p"}, "missing_image"),
        (
            {"id": "t", "task": "text_diff", "image": "x.png", "source_prompt": "s", "prompt": "p", "strength": 1.5},
            "invalid_strength",
        ),
        ({"id": "t", "prompt": "p", "prompt2": "q"}, "unused_column"),
        ({"id": "t", "task": "variation", "image": "x.png", "best_of": 2}, "invalid_best_of"),
        ({"id": "t", "task": "variation"}, "missing_image"),
        ({"id": "t", "task": "inpaint", "prompt": "p", "mask": "m.png"}, "missing_image"),
        ({"id": "t", "prompt": "p", "image": "x.png"}, "unexpected_image"),
        ({"id": "t", "task": "variation", "image": "x.png", "mask": "m.png"}, "unexpected_image"),
    ],
)
def test_bad_rows_get_a_code_and_a_message(tmp_path, row, code):
    good, bad = run_validate(tmp_path, [row, {"id": "fine", "prompt": "p"}])
    assert [e["code"] for e in bad] == [code]
    assert bad[0]["message"] and bad[0]["stage"] == "validate" and bad[0]["row"] == 0
    assert [r.id for r in good] == ["fine"]


def test_interpolate_and_text_diff_rows(tmp_path):
    good, bad = run_validate(
        tmp_path,
        [
            {"id": "i", "task": "interpolate", "image": "a.png", "prompt2": "a blue circle", "num_images": 5},
            {"id": "t", "task": "text_diff", "image": "x.png", "source_prompt": "a red square", "prompt": "green"},
        ],
    )
    assert bad == []
    interpolate, text_diff = good
    assert interpolate.image.endswith("/a.png") and (interpolate.image2, interpolate.prompt2) == ("", "a blue circle")
    assert (text_diff.source_prompt, text_diff.strength) == ("a red square", 0.5)  # the default strength


def test_the_jobs_best_of_applies_where_a_prompt_can_rank_candidates(tmp_path):
    table = read_manifests(
        [
            write_manifest(
                tmp_path / "m.parquet",
                [
                    {"id": "g", "prompt": "p"},
                    {"id": "v", "task": "variation", "image": "x.png"},
                    {"id": "s", "task": "variation", "image": "x.png", "prompt": "p"},
                    {"id": "own", "prompt": "p", "best_of": 2},
                    {"id": "i", "task": "interpolate", "prompt": "p", "prompt2": "q"},  # frames: never reranked
                ],
            )
        ]
    )
    good = [row for rows, _ in validate(table, {**DEFAULTS, "best_of": 4}, SIZE) for row in rows]
    assert {row.id: row.best_of for row in good} == {"g": 4, "v": 1, "s": 4, "own": 2, "i": 1}


def test_float_columns_from_pandas(tmp_path):
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("num_images", pa.float64()), ("seed", pa.float64())]
    )
    good, bad = run_validate(
        tmp_path,
        [
            {"id": "a", "prompt": "p", "num_images": 2.0, "seed": math.nan},
            {"id": "b", "prompt": "p", "num_images": 1.5, "seed": 1.0},
            {"id": "c", "prompt": "p", "num_images": math.inf, "seed": 1.0},
        ],
        schema,
    )
    assert [(r.id, r.num_images, r.seed) for r in good] == [("a", 2, default_seed("a"))]
    assert [e["code"] for e in bad] == ["invalid_value", "invalid_value"]


def test_duplicate_ids_keep_the_first(tmp_path):
    first = write_manifest(tmp_path / "1.parquet", [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "p"}])
    second = write_manifest(tmp_path / "2.parquet", [{"id": "a", "prompt": "two"}])
    table = read_manifests([first, second])
    good, bad = collect(table)
    assert [(r.id, r.prompt) for r in good] == [("a", "one"), ("b", "p")]
    assert [(e["id"], e["code"], e["row"]) for e in bad] == [("a", "duplicate_id", 2)]


def test_integer_ids_and_extra_columns_are_kept(tmp_path):
    table = read_manifests([write_manifest(tmp_path / "m.parquet", [{"id": 7, "prompt": "p", "tag": [1, 2]}])])
    assert table["id"].to_pylist() == ["7"]
    assert extra_columns(table) == ["tag"]


def test_limit(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": str(i), "prompt": "p"} for i in range(10)])
    assert read_manifests([path], limit=3).num_rows == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.write_bytes(b"not parquet at all"), p)[1], "could not be read as Parquet"),
        (lambda p: write_manifest(p, [{"prompt": "no id"}]), "no 'id' column"),
        (lambda p: write_manifest(p, [{"id": "a", "num_images": "two"}]), "'num_images' has type string"),
        (lambda p: write_manifest(p, [{"id": "a", "prompt": 3}]), "'prompt' has type int64"),
        (lambda p: write_manifest(p, [{"id": "a", "sha256": "x"}]), "reserved"),
        (lambda p: write_manifest(p, [], pa.schema([("id", pa.string())])), "has no rows"),
        (
            lambda p: (p.with_suffix(".csv").write_text("id,prompt\na,p\n"), p.with_suffix(".csv"))[1],
            r"is text, not Parquet: convert it with `unclip-batch manifest build .*m.csv -o .*m.parquet`",
        ),
    ],
)
def test_unusable_manifests_fail_as_a_whole(tmp_path, make, message):
    path = make(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=message) as refused:
        read_manifests([str(path)])
    assert str(refused.value).startswith(f"manifest {path}")  # which manifest, whatever went wrong


def test_default_seed_is_stable():
    assert default_seed("row-1") == default_seed("row-1") != default_seed("row-2")
    assert 0 <= default_seed("x") < 2**32


@pytest.mark.parametrize(
    "kind",
    [
        pa.large_string(),
        pa.string_view(),
        pa.dictionary(pa.int32(), pa.string()),
        pa.dictionary(pa.int8(), pa.large_string()),
    ],
)
def test_every_arrow_string_type_is_a_string(tmp_path, kind):
    """pandas categoricals become dictionaries, newer writers string_view: both are strings to us."""
    rows = {
        "id": ["a", "b"],
        "task": ["generate", "variation"],
        "prompt": ["a red circle", None],
        "image": [None, "img/x.png"],
        "tag": ["kept", "as is"],
    }
    table = pa.table({name: pa.array(values, pa.string()).cast(kind) for name, values in rows.items()})
    path = tmp_path / "m.parquet"
    pa.parquet.write_table(table, path)
    read = read_manifests([str(path)])
    assert read.schema.field("id").type == read.schema.field("prompt").type == pa.string()
    assert read.schema.field("tag").type == pa.parquet.read_schema(path).field("tag").type  # carried untouched
    good, bad = collect(read)
    assert bad == [] and [(r.id, r.task, r.prompt, r.image) for r in good] == [
        ("a", "generate", "a red circle", ""),
        ("b", "variation", "", str(tmp_path / "img" / "x.png")),
    ]


def test_input_hash_sees_what_the_images_depend_on(tmp_path):
    from unclip_batch.manifest import input_hash

    base = {"id": "a", "prompt": "a red circle", "seed": 5}
    assert input_hash(base) == input_hash({**base, "seed": 5.0, "tag": "extra"}) == input_hash({**base, "mask": None})
    for change in (
        {"prompt": "a blue circle"},
        {"seed": 6},
        {"num_images": 2},
        {"task": "variation"},
        {"guidance_scale": 2.0},
        {"image": "x.png"},
    ):
        assert input_hash({**base, **change}) != input_hash(base), change
    good, _ = run_validate(tmp_path, [base])
    assert good[0].input_hash == input_hash(base)
    # The fingerprint is kept in outputs: a resume compares it with the row's, so its value is a contract.
    assert input_hash(base) == "59eda319db6e42fb"
    assert input_hash({**base, "prompt": "café", "guidance_scale": 2.5, "num_images": 3}) == "4837bd78ec390d2c"


def test_an_error_record_holds_these_fields_and_no_other(tmp_path):
    from unclip_batch.manifest import input_hash

    _, bad = run_validate(tmp_path, [{"id": "ok", "prompt": "p"}, {"id": "t", "prompt": "p", "seed": -1}])
    assert list(bad[0]) == ["id", "task", "stage", "code", "message", "row", "input_hash"]
    assert bad[0]["id"] == "t" and bad[0]["task"] == "generate" and bad[0]["stage"] == "validate"
    assert bad[0]["code"] == "invalid_seed" and bad[0]["row"] == 1
    assert bad[0]["input_hash"] == input_hash({"id": "t", "prompt": "p", "seed": -1})
    _, bad = run_validate(tmp_path, [{"id": "v", "task": "variation", "image": "x.png", "best_of": 2}])
    assert (bad[0]["task"], bad[0]["code"]) == ("variation", "invalid_best_of")  # the row's own task


def test_a_text_columns_error_names_the_column(tmp_path):
    from unclip_batch.manifest import MAX_PROMPT_CHARS

    _, bad = run_validate(tmp_path, [{"id": "t", "prompt": "p", "negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}])
    assert bad[0]["code"] == "prompt_too_long" and bad[0]["message"].startswith("negative_prompt has ")


@pytest.mark.parametrize("name", ["_private", "_", "__index_level_0__", "sha256", "image_key", "manifest_row"])
def test_columns_the_output_writes_or_starting_with_an_underscore_are_refused(tmp_path, name):
    with pytest.raises(ManifestError, match=f"column\\(s\\) {name} are reserved"):
        read_manifests([write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", name: "x"}])])


def test_a_column_with_an_underscore_elsewhere_is_carried(tmp_path):
    table = read_manifests([write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "my_tag_": "x"}])])
    assert extra_columns(table) == ["my_tag_"]


def test_a_shard_reads_its_own_rows_and_no_other(tmp_path):
    """Rows [start, stop) of a file of several row groups: inside one group, across groups, at either end."""
    from unclip_batch.manifest import read_rows
    from unclip_batch.storage import Location

    path = tmp_path / "m.parquet"
    pa.parquet.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "n": list(range(10))}), path, row_group_size=3)
    location = Location(str(tmp_path))
    for start, stop in ((0, 3), (4, 7), (2, 9), (9, 10), (0, 10), (5, 5)):
        table = read_rows(location, str(path), start, stop, ["id", "missing"])
        assert table["id"].to_pylist() == [f"r{i}" for i in range(start, stop)], (start, stop)
        assert table.column_names == ["id"]


def test_words_outside_a_closed_world_model_vocabulary_are_counted_not_refused(tmp_path):
    from unclip_batch.manifest import UnknownWords

    rows, bad = run_validate(
        tmp_path,
        [
            {"id": "ok", "prompt": "A red circle, on a white background!"},
            {"id": "cat", "prompt": "a photo of a cat", "negative_prompt": "blurry photo"},
            {"id": "star", "prompt": "a pink star"},
        ],
    )
    assert len(rows) == 3 and bad == []  # valid rows: a warning, never an error
    words = UnknownWords(frozenset("a red circle on white background".split()))
    words.check(rows)
    assert (words.rows, words.first_ids) == (2, ["cat", "star"])
    assert words.words == {"photo": 1, "of": 1, "cat": 1, "blurry": 1, "pink": 1, "star": 1}
    assert "2 rows use words model 'm' does not know" in words.message("m") and "'photo' (1)" in words.message("m")
    anything = UnknownWords(None)  # a model that reads any text (Kandinsky 2.2's CLIP) says nothing
    anything.check(rows)
    assert anything.rows == 0 and anything.message("m") == ""


def _edges():
    """Every range a manifest row accepts, as (column, its lowest, its highest, one step, the base row, code):
    each edge is accepted, one step past it is the code."""
    from unclip_batch import sampling
    from unclip_batch.manifest import MAX_NUM_IMAGES, MAX_PROMPT_CHARS

    base = {"id": "t", "prompt": "p"}
    diff = {"id": "t", "task": "text_diff", "image": "x.png", "source_prompt": "s", "prompt": "p"}
    edges = [
        ("num_images", 1, MAX_NUM_IMAGES, 1, base, "invalid_num_images"),
        ("seed", 0, MAX_SEED, 1, base, "invalid_seed"),
        ("strength", 0.0, 1.0, 0.001, diff, "invalid_strength"),
    ]
    for f in sampling.SETTINGS:
        least, most = f.metadata["least"], f.metadata["most"]
        if least is not None:
            step = 1 if sampling.KINDS[f.name] is int else 0.001
            edges.append((f.name, least, most, step, base, f.metadata["code"]))
    edges.append(("prompt", "p", "p" * MAX_PROMPT_CHARS, None, base, "prompt_too_long"))
    return edges


@pytest.mark.parametrize("column, lowest, highest, step, base, code", _edges(), ids=lambda v: str(v)[:20])
def test_each_range_accepts_its_edges_and_refuses_one_step_past_them(
    tmp_path, column, lowest, highest, step, base, code
):
    if step is None:  # a text's length: its longest, and one character more
        cases = [(highest, None), (highest + "p", code)]
    else:
        cases = [(lowest, None), (highest, None), (lowest - step, code), (highest + step, code)]
    for value, expected in cases:
        if column == "seed" and value > MAX_SEED:  # past int64's range for the next step: the largest allowed + 1
            value = MAX_SEED + 1
        good, bad = run_validate(tmp_path, [{**base, column: value}])
        assert [e["code"] for e in bad] == ([expected] if expected else []), (column, value)
        if expected is None:
            assert getattr(good[0], column) == value, (column, value)


def test_unknown_words_add_up_across_shards_and_the_warning_ranks_them():
    """Each shard's count (read in a task) added in the driver; the words most used first, 12 shown; the first
    five rows named; the trap (mostly unknown words: the wrong model) said first."""
    from unclip_batch.manifest import UnknownWords

    total = UnknownWords(frozenset({"a", "red", "circle"}))
    total.add({"rows": 2, "checked": 3, "words": {"cat": 2, "dog": 1}, "first_ids": ["r1", "r2"]})
    total.add({"rows": 4, "checked": 10, "words": {"cat": 1, "bird": 5}, "first_ids": ["r5", "r6", "r7", "r8"]})
    total.add({"rows": 1, "words": {"zebra": 1}, "first_ids": ["r9"]})  # an older shard's, without "checked"
    assert (total.rows, total.checked) == (7, 13)
    assert total.words == {"cat": 3, "dog": 1, "bird": 5, "zebra": 1}
    assert total.first_ids == ["r1", "r2", "r5", "r6", "r7"]
    assert total.to_dict() == {"rows": 7, "checked": 13, "words": total.words, "first_ids": total.first_ids}
    message = total.message("default")
    assert message.startswith("Model 'default' is the embedded 64 px shapes model")  # 2 * 7 >= 13
    assert (
        "7 rows use words model 'default' does not know, and it draws them as if those words were not there: "
        "'bird' (5), 'cat' (3), 'dog' (1), 'zebra' (1) (first rows: r1, r2, r5, r6, r7). Its words: a, circle, red"
        in message
    )
    total.checked = 15  # mostly known words: the words, without the trap
    assert total.message("default").startswith("7 rows use words")
    total.checked = 14  # exactly half the rows: still the trap
    assert total.message("default").startswith("Model 'default'")
    many = UnknownWords(frozenset())
    many.add({"rows": 1, "checked": 9, "words": {f"w{i:02d}": 1 for i in range(13)}, "first_ids": ["x"]})
    assert "'w11' (1) ... (first rows: x)" in many.message("m") and "'w12'" not in many.message("m")
    assert UnknownWords(frozenset()).message("m") == ""


def test_a_manifest_folder_reads_its_parquet_files_and_names_the_rest(tmp_path, caplog):
    """Files at any depth, sorted; hidden and _-prefixed entries (files or folders) skipped as pyarrow skips
    them; other files named in one warning, five at most and how many more."""
    import logging

    from unclip_batch.manifest import parquet_files
    from unclip_batch.storage import Location

    folder = tmp_path / "m"
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "sub/_tmp/x.parquet", ".hidden/y.parquet", "_z.parquet"):
        write_manifest(folder / name, [{"id": "a", "prompt": "p"}])
    for i in range(7):
        (folder / f"note{i}.txt").write_text("x")
    fs = Location(str(folder)).fs
    with caplog.at_level(logging.WARNING, logger="unclip_batch.manifest"):
        files = parquet_files(fs, str(folder), "s3://b/m")
    assert files == [str(folder / n) for n in ("a.parquet", "b.parquet", "sub/c.parquet")]
    assert caplog.messages == [
        "manifest folder s3://b/m: read 3 *.parquet file(s), skipped 7 other file(s): note0.txt, note1.txt, "
        "note2.txt, note3.txt, note4.txt and 2 more"
    ]
    caplog.clear()
    for i in range(2, 7):
        (folder / f"note{i}.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="unclip_batch.manifest"):
        parquet_files(fs, str(folder), "s3://b/m")
    assert caplog.messages[0].endswith("skipped 2 other file(s): note0.txt, note1.txt")
    empty = tmp_path / "none"
    (empty / "imgs").mkdir(parents=True)
    (empty / "imgs" / "x.png").write_bytes(b"png")
    with pytest.raises(
        ManifestError, match=r"^manifest folder s3://b/n has no \*.parquet files \(1 other files, e.g. imgs/x.png\)$"
    ):
        parquet_files(fs, str(empty), "s3://b/n")
    (empty / "imgs" / "x.png").unlink()
    with pytest.raises(ManifestError, match=r"^manifest folder s3://b/n has no \*.parquet files$"):
        parquet_files(fs, str(empty), "s3://b/n")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"task": "interpolate", "image": "a.png", "prompt": "p"}, "needs its first end as image or prompt, not both"),
        ({"task": "interpolate", "prompt2": "q"}, "needs its first end as image or prompt, and this row has neither"),
        ({"task": "interpolate", "prompt": "p"}, "needs its second end as image2 or prompt2, and this row has neither"),
        (
            {"task": "interpolate", "prompt": "p", "image2": "b.png", "prompt2": "q"},
            "second end as image2 or prompt2, not both",
        ),
    ],
)
def test_an_interpolations_ends_are_named_in_its_error(tmp_path, row, message):
    _, bad = run_validate(tmp_path, [{"id": "t", **row}])
    assert message in bad[0]["message"]


@pytest.mark.parametrize(
    "task, base, unused",
    [
        ("interpolate", {"prompt": "p", "prompt2": "q"}, ("mask", "negative_prompt", "source_prompt")),
        (
            "text_diff",
            {"image": "x.png", "source_prompt": "s", "prompt": "p"},
            ("mask", "image2", "prompt2", "negative_prompt"),
        ),
    ],
)
def test_each_column_a_task_does_not_use_is_refused_alone(tmp_path, task, base, unused):
    for column in unused:
        _, bad = run_validate(tmp_path, [{"id": "t", "task": task, **base, column: "x.png"}])
        assert [e["code"] for e in bad] == ["unused_column"], column


def test_a_folder_manifest_read_whole_resolves_sources_against_the_folder(tmp_path, monkeypatch):
    """`validate` reads a folder's files as one manifest (columns one file lacks are null), numbers the rows
    across files, resolves relative sources against the folder, and a relative URL against the working folder."""
    from unclip_batch.manifest import FOLDER, MANIFEST, MANIFEST_ROW, ROW

    folder = tmp_path / "m"
    write_manifest(folder / "a.parquet", [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q", "num_images": 2}])
    write_manifest(folder / "b.parquet", [{"id": "c", "task": "variation", "image": "img/x.png", "tag": "t"}])
    table = read_manifests([str(folder)])
    assert table["id"].to_pylist() == ["a", "b", "c"] and table["tag"].to_pylist() == [None, None, "t"]
    assert table[ROW].to_pylist() == [0, 1, 2] and table[ROW].type == pa.int64()
    assert table[MANIFEST_ROW].to_pylist() == [0, 1, 2] and set(table[MANIFEST].to_pylist()) == {str(folder)}
    assert set(table[FOLDER].to_pylist()) == {str(folder)}
    good, bad = collect(table)
    assert bad == [] and good[2].image == str(folder / "img" / "x.png")
    assert read_manifests([str(folder)], limit=2)["id"].to_pylist() == ["a", "b"]
    monkeypatch.chdir(tmp_path)
    relative = read_manifests(["m/a.parquet"])
    assert set(relative[FOLDER].to_pylist()) == {str(folder)} and set(relative[MANIFEST].to_pylist()) == {
        str(folder / "a.parquet")
    }
    with pytest.raises(ManifestError, match=f"manifest {folder / 'none.parquet'} does not exist"):
        read_manifests(["m/none.parquet"])


def test_a_shard_reads_only_the_row_groups_holding_its_rows_and_ids_as_strings(tmp_path, monkeypatch):
    """The bytes a shard reads are its own row groups' (a 5M-row manifest is read a shard at a time); ids
    and text columns come back as plain strings whatever Arrow type wrote them."""
    from unclip_batch.manifest import read_rows
    from unclip_batch.storage import Location

    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "id": pa.array(range(30), pa.int64()),
            "prompt": pa.array([f"p{i}" for i in range(30)], pa.large_string()),
            "task": pa.array(["generate"] * 30).dictionary_encode(),
        }
    )
    pa.parquet.write_table(table, path, row_group_size=10)
    read = []
    real = pa.parquet.ParquetFile.read_row_groups

    def recording(self, groups, **options):
        read.append(list(groups))
        return real(self, groups, **options)

    monkeypatch.setattr(pa.parquet.ParquetFile, "read_row_groups", recording)
    location = Location(str(tmp_path))
    for (start, stop), groups in {(10, 20): [1], (9, 21): [0, 1, 2], (19, 21): [1, 2], (0, 30): [0, 1, 2]}.items():
        read.clear()
        rows = read_rows(location, str(path), start, stop, None)
        assert read == [groups], (start, stop)
        assert rows["id"].to_pylist() == [str(i) for i in range(start, stop)]
        assert [rows.schema.field(c).type for c in ("id", "prompt", "task")] == [pa.string()] * 3
    read.clear()
    empty = read_rows(location, str(path), 20, 20, ["id", "prompt"])
    assert read == [[]] and empty.num_rows == 0 and empty.column_names == ["id", "prompt"]


@pytest.mark.parametrize(
    "column, value, expected",
    [
        ("id", 1.5, "string"),
        ("prompt", 3, "string"),
        ("source_prompt", 3, "string"),
        ("seed", "7", "integer"),
        ("num_images", "2", "integer"),
        ("num_inference_steps", "50", "integer"),
        ("strength", "0.5", "number"),
        ("guidance_scale", "4", "number"),
    ],
)
def test_a_column_of_the_wrong_type_is_refused_naming_the_type_it_needs(tmp_path, column, value, expected):
    row = {"id": "a", "prompt": "p", column: value}
    path = write_manifest(tmp_path / "m.parquet", [row])
    kind = pa.Table.from_pylist([row]).schema.field(column).type
    with pytest.raises(ManifestError) as refused:
        read_manifests([path])
    assert str(refused.value) == f"manifest {path}: column {column!r} has type {kind}; expected {expected}"


def test_columns_that_nearly_name_ours_are_pointed_out_once_each(caplog):
    from unclip_batch.manifest import _warn_near_misses

    with caplog.at_level("WARNING", logger="unclip_batch.manifest"):
        _warn_near_misses("m.parquet", ["id", "Prompt", "negativ_prompt", "sede", "seed", "tag", "prompt2"])
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "manifest m.parquet: column 'Prompt' is not a manifest column and is carried through as it is; "
        "did you mean 'prompt'?",
        "manifest m.parquet: column 'negativ_prompt' is not a manifest column and is carried through as it is; "
        "did you mean 'negative_prompt'?",
    ]  # 'sede' is nearest to 'seed', which the manifest has; 'tag' is near nothing


def test_a_null_id_has_a_digest_of_its_own_that_no_written_id_shares():
    from unclip_batch.manifest import id_digests

    digests = id_digests(pa.array(["None", None, "", "a"], pa.string()))
    assert digests.dtype.itemsize == 16 and len(digests) == 4
    assert digests[1].tobytes() == bytes(16) and len({d.tobytes() for d in digests}) == 4


def test_manifests_on_a_store_keep_their_urls_and_resolve_sources_against_their_folder():
    """A manifest folder and a file in it on a store that is not this disk (fsspec's memory store): URLs
    stay as given (no local path made of them), a folder's files count rows on from each other, and
    relative sources start at the folder (a file's: the folder it is in)."""
    import io
    import uuid

    import fsspec

    from unclip_batch.manifest import FOLDER, MANIFEST, MANIFEST_ROW, ManifestFile, manifest_files
    from unclip_batch.storage import Location

    root = f"memory://manifests-{uuid.uuid4().hex}/in"
    store = Location(root)
    for name, ids in (("a.parquet", ["a0", "a1"]), ("b.parquet", ["b0"])):
        buffer = io.BytesIO()
        pa.parquet.write_table(
            pa.table({"id": ids, "prompt": ["p"] * len(ids), "image": ["img/x.png"] * len(ids)}), buffer
        )
        store.write(name, buffer.getvalue())
    store.write("notes.txt", b"not a manifest")
    try:
        folder = read_manifests([root + "/"])
        single = read_manifests([root + "/a.parquet"])
        files = manifest_files([root + "/", root + "/a.parquet"])
    finally:
        fsspec.filesystem("memory").rm(store.root.split("/")[0], recursive=True)
    assert folder["id"].to_pylist() == ["a0", "a1", "b0"] and folder[MANIFEST_ROW].to_pylist() == [0, 1, 2]
    assert set(folder[MANIFEST].to_pylist()) == {root + "/"} and set(folder[FOLDER].to_pylist()) == {root}
    assert set(single[MANIFEST].to_pylist()) == {root + "/a.parquet"} and set(single[FOLDER].to_pylist()) == {root}
    path = store.root
    assert [(f.manifest, f.path, f.folder, f.rows, f.first) for f in files] == [
        (root + "/", f"{path}/a.parquet", root, 2, 0),
        (root + "/", f"{path}/b.parquet", root, 1, 2),
        (root + "/a.parquet", f"{path}/a.parquet", root, 2, 0),
    ]
    assert all(isinstance(f, ManifestFile) and f.version for f in files)
