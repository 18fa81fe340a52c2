"""One declaration per sampling setting: everything that lists the settings is derived from Sampling."""

import dataclasses

import pyarrow as pa
import pytest

from unclip_batch import manifest, sampling, writer
from unclip_batch.cli import build_parser
from unclip_batch.errors import CODES, RowError
from unclip_batch.sampling import Sampling, call_key

VALUES = dict(
    width=64,
    height=64,
    num_inference_steps=20,
    guidance_scale=2.0,
    prior_num_inference_steps=25,
    prior_guidance_scale=4.0,
    variation_strength=0.15,
    best_of=2,
)


def test_every_setting_reaches_the_manifest_the_cli_the_metadata_and_the_call_key():
    assert set(sampling.NAMES) == set(VALUES)
    run = build_parser().parse_args(
        ["run", "m.parquet", "-o", "out"]
        + [x for name, value in VALUES.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    )
    row = {"task": "generate", "negative_prompt": "", "prompt": "p", **VALUES}
    for name, value in VALUES.items():
        assert getattr(run, name) == value and type(getattr(run, name)) is sampling.KINDS[name]
        assert name in manifest.KNOWN_COLUMNS
        assert call_key({**row, name: value * 2}) != call_key(row), f"{name} does not split model calls"
        in_metadata = name in writer.PARAMETERS.names or name in writer.METADATA_SCHEMA.names
        assert in_metadata, f"{name} is not recorded in the metadata"
    assert writer.PARAMETERS.names == list(sampling.PARAMETERS)
    assert writer.PARAMETERS.field("guidance_scale").type == pa.float64()


def test_ranges_are_checked_where_declared():
    assert Sampling.of({**VALUES, "id": "ignored"}) == Sampling(**VALUES)
    for f in sampling.SETTINGS:
        if f.metadata["least"] is None:
            continue
        assert f.metadata["code"] in CODES
        with pytest.raises(RowError) as caught:
            Sampling(**{**VALUES, f.name: f.metadata["most"] + 1})
        assert caught.value.code == f.metadata["code"] and f.name in caught.value.message
    # A manifest row is a Sampling: its settings are checked by the same declarations.
    assert {f.name for f in dataclasses.fields(manifest.Row)} >= set(sampling.NAMES)


def test_a_column_added_later_changes_no_earlier_rows_hash(monkeypatch):
    row = {"id": "a", "prompt": "a red circle", "seed": 3}
    before = manifest.input_hash(row)
    monkeypatch.setattr(manifest, "KNOWN_COLUMNS", manifest.KNOWN_COLUMNS + ("strength",))
    assert manifest.input_hash(row) == before  # rows that leave the new column empty keep their hash
    assert manifest.input_hash({**row, "strength": 0.5}) != before
