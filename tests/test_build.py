"""unclip-batch manifest build: text files users have -> a Parquet manifest the job takes as it is."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from unclip_batch.build import build
from unclip_batch.errors import ManifestError
from unclip_batch.manifest import SizeRule, read_manifests, validate

REPO = Path(__file__).resolve().parent.parent
SIZE = SizeRule(default=64, multiple=8, maximum=1024)


def valid_rows(path) -> list:
    rows, errors = [], []
    for good, bad in validate(read_manifests([str(path)]), {}, SIZE):
        rows += good
        errors += bad
    assert errors == []
    return rows


def test_a_prompt_a_line_with_generated_ids_and_defaults(tmp_path):
    (tmp_path / "my prompts.txt").write_text("a red circle\n\n  a blue square on a yellow background \n")
    table = build([str(tmp_path / "my prompts.txt")], str(tmp_path / "m.parquet"), num_images=3, seed=11)
    rows = valid_rows(tmp_path / "m.parquet")
    assert [(r.id, r.prompt, r.num_images, r.seed) for r in rows] == [
        ("my_prompts-000000", "a red circle", 3, 11),
        ("my_prompts-000001", "a blue square on a yellow background", 3, 11),
    ]
    assert table.num_rows == 2 and not list(tmp_path.glob("*.partial"))


def test_csv_and_jsonl_keep_their_columns_and_fill_only_empty_defaults(tmp_path):
    (tmp_path / "a.csv").write_text("id,prompt,num_images,source\nx,a red circle,2,web\ny,a green square,,web\n")
    lines = [{"id": "z", "prompt": "a white triangle", "seed": 5, "source": "jsonl"}, {"prompt": "no id here"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    build([str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")], str(tmp_path / "m.parquet"), num_images=4)
    rows = {r.id: r for r in valid_rows(tmp_path / "m.parquet")}
    assert {k: rows[k].num_images for k in rows} == {"x": 2, "y": 4, "z": 4, "b-000001": 4}
    assert rows["z"].seed == 5
    assert pq.read_table(tmp_path / "m.parquet")["source"].to_pylist() == ["web", "web", "jsonl", None]


def test_templates_make_every_class_times_template(tmp_path):
    (tmp_path / "classes.txt").write_text("red circle\nblue square\n")
    templates = ["a photo of a {}", "a drawing of a {}"]
    build([str(tmp_path / "classes.txt")], str(tmp_path / "m.parquet"), templates=templates, num_images=8)
    table = pq.read_table(tmp_path / "m.parquet")
    assert table["id"].to_pylist() == ["red_circle-0", "red_circle-1", "blue_square-0", "blue_square-1"]
    assert table["prompt"].to_pylist()[1] == "a drawing of a red circle"
    assert table["label"].to_pylist() == ["red circle", "red circle", "blue square", "blue square"]
    assert [r.num_images for r in valid_rows(tmp_path / "m.parquet")] == [8] * 4


@pytest.mark.parametrize(
    ("files", "kwargs", "message"),
    [
        ({"a.txt": ""}, {}, "has no rows"),
        ({"a.parquet": "x"}, {}, "not a text manifest"),
        ({"a.csv": "id,prompt\nq,a\nq,b\n"}, {}, "1 duplicate ids"),
        ({"a.txt": "cat\n"}, {"templates": ["a photo"]}, "needs exactly one {}"),
        ({"a.txt": b"\xff\xfe broken"}, {}, "could not be read"),
    ],
)
def test_unusable_sources_say_what_to_fix(tmp_path, files, kwargs, message):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ManifestError, match=message):
        build([str(tmp_path / name) for name in files], str(tmp_path / "m.parquet"), **kwargs)
    assert not (tmp_path / "m.parquet").exists()


def test_the_command_builds_the_demo_manifest_as_committed(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_batch.cli",
            "manifest",
            "build",
            "manifests/demo.jsonl",
            "-o",
            str(tmp_path / "demo.parquet"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "10 rows" in result.stdout and "unclip-batch validate" in result.stdout
    assert pq.read_table(tmp_path / "demo.parquet").equals(pq.read_table(REPO / "manifests" / "demo.parquet"))
