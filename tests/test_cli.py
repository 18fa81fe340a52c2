"""The command line as a user runs it: separate processes, exit codes, printed summaries."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from helpers import cli, cli_flags, write_manifest

REPO = Path(__file__).resolve().parent.parent


def fast_flags():
    return cli_flags()


def test_validate_reports_bad_rows(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [{"id": "ok", "prompt": "p"}, {"id": "bad id", "prompt": "p"}, {"id": "n", "prompt": "p", "num_images": 0}],
    )
    result = cli("validate", manifest)
    assert result.returncode == 4  # EXIT_ROWS_FAILED, as a run whose rows failed
    assert "3 rows: 1 valid, 2 invalid" in result.stdout
    assert "invalid_id: 1" in result.stdout and "invalid_num_images: 1" in result.stdout
    assert "row 1 id='bad id'" in result.stdout


def test_validate_finds_the_demo_rows_missing_source_file():
    """The demo's last row points at a missing file on purpose: validate says so without running a job."""
    result = cli("validate", "manifests/demo.parquet")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "10 rows: 9 valid, 1 invalid" in result.stdout and "image_unreadable: 1" in result.stdout
    assert "row 9 id='broken-source': [image_unreadable] image " in result.stdout
    assert "manifests/images/does_not_exist.png does not exist" in result.stdout


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "no id"}], "no 'id' column"),
        ([{"id": "a", "num_images": "many"}], "'num_images' has type string"),
    ],
)
def test_bad_manifest_fails_fast_without_a_model(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    start = time.monotonic()
    result = cli("run", manifest, "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr
    assert time.monotonic() - start < 30  # no Ray, no model: seconds, not a job
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command, model, says",
    [
        ("run", "{tmp}/nothing", "not a folder ({tmp}/nothing does not exist), not a known alias (default, shapes"),
        ("run", "./defualt", "not a folder"),
        (
            "validate",
            "does-not-exist",
            "not a folder, not a known alias (default, shapes, tiny, null), and not loadable from the "
            "Hugging Face Hub as a namespace (HF_HUB_OFFLINE is set",
        ),
    ],
)
def test_unknown_model_fails_fast_saying_what_was_tried(tmp_path, command, model, says):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    output = ["--output", str(tmp_path / "out")] if command == "run" else []
    result = cli(command, manifest, *output, "--model", model.format(tmp=tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"model {model.format(tmp=tmp_path)!r} not found: " + says.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_ray_client_address_is_refused_before_any_work(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    start = time.monotonic()
    result = cli(
        "run", manifest, "--output", str(tmp_path / "out"), "--model", "tiny", "--address", "ray://head.example:10001"
    )
    assert result.returncode == 2, result.stderr
    assert "Ray Client (ray://) does not work with Ray Data" in result.stderr
    assert "ray job submit --address http://head.example:8265" in result.stderr
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()
    # The same from the environment, as `RAY_ADDRESS=ray://...` would have it.
    result = cli("run", manifest, "--output", str(tmp_path / "out"), env={"RAY_ADDRESS": "ray://h:10001"})
    assert result.returncode == 2 and "Ray Client" in result.stderr


def test_relative_output_is_refused_in_a_ray_job_and_made_absolute_elsewhere(tmp_path):
    from unclip_batch.cli import output_location

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    result = cli("run", manifest, "--output", "out/run1", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"})
    assert result.returncode == 2, result.stderr
    assert "--output out/run1 is a relative path, and this is a Ray job" in result.stderr
    assert output_location("out/x") == os.path.join(os.getcwd(), "out/x")
    assert output_location("s3://b/out") == "s3://b/out" and output_location("/abs/out") == "/abs/out"


def test_validate_reads_only_parquet_of_a_folder_and_names_the_rest(tmp_path):
    folder = tmp_path / "manifests"
    write_manifest(folder / "a.parquet", [{"id": "a", "prompt": "p"}])
    write_manifest(folder / "sub" / "b.parquet", [{"id": "b", "prompt": "p"}])
    (folder / "build.py").write_text("print('not a manifest')\n")
    (folder / "source.png").write_bytes(b"\x89PNG not really")
    (folder / "_SUCCESS").write_text("{}")
    result = cli("validate", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rows: 2 valid, 0 invalid" in result.stdout
    assert "read 2 *.parquet file(s), skipped 2 other file(s): build.py, source.png" in result.stderr
    (folder / "a.parquet").unlink(), (folder / "sub" / "b.parquet").unlink()
    result = cli("validate", str(folder))
    assert result.returncode == 2 and "has no *.parquet files (2 other files, e.g. build.py)" in result.stderr


def test_validate_suggests_the_column_a_near_miss_meant(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompts": "a red circle"}])
    result = cli("validate", manifest)
    assert result.returncode == 4
    assert (
        "column 'prompts' is not a manifest column and is carried through as it is; did you mean 'prompt'?"
        in result.stderr
    )
    assert "missing_prompt: 1" in result.stdout


@pytest.mark.slow
def test_run_on_s3_with_aws_environment(s3, tmp_path):
    """The README's S3 recipe: credentials and endpoint from the usual AWS variables, summary printed."""
    fs = s3.filesystem()
    fs.mkdir("cli-env")
    fs.put(str(REPO / "manifests" / "demo.parquet"), "cli-env/demo/demo.parquet")
    fs.put(str(REPO / "manifests" / "images") + "/", "cli-env/demo/images/", recursive=True)
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
    }
    # The null model: this is about storage, credentials and the summary, not pixels.
    result = cli(
        "run",
        "s3://cli-env/demo/demo.parquet",
        "--output",
        "s3://cli-env/out",
        "--quiet",
        "--model",
        "null",
        *fast_flags(),
        env=env,
        timeout=600,
    )
    assert result.returncode == 4, result.stderr[-3000:]  # complete, but the demo's last row failed
    assert "succeeded              9" in result.stdout and "image_unreadable" in result.stdout
    assert "(errors: s3://cli-env/out/errors/)" in result.stdout
    summary = json.loads(fs.cat("cli-env/out/_SUCCESS"))
    assert (summary["rows"]["succeeded"], summary["rows"]["failed"], summary["images"]) == (9, 1, 15)
    assert len(fs.glob("cli-env/out/images/*/*.png")) == 15


def test_pickle_weights_are_refused_before_any_work(tmp_path):
    import shutil

    from unclip_batch.models import WEIGHTS

    shutil.copytree(WEIGHTS / "tiny", tmp_path / "model")
    unet = tmp_path / "model" / "kandinsky-2-2-decoder" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    result = cli("run", manifest, "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model"))
    assert result.returncode == 2
    assert "safetensors only" in result.stderr and "diffusion_pytorch_model.bin" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_option_of_every_command_has_help():
    """docs/cli.md is generated from these (tests/test_docs.py): an option without help would be a blank line."""
    from unclip_batch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    parsers = [commands["run"], commands["validate"], commands["report"]]
    parsers += list(commands["manifest"]._subparsers._group_actions[0].choices.values())
    for parser in parsers:
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings or action.dest)
    assert "examples:" in commands["run"].format_help() and "exit codes:" in commands["run"].format_help()


def test_version():
    from unclip_batch import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"unclip-batch {__version__}"


def test_bad_options_are_setup_errors_and_a_bug_is_not_blamed_on_them(tmp_path, monkeypatch, capsys):
    from unclip_batch import cli as cli_module
    from unclip_batch import job

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    assert cli_module.main(["run", manifest, "-o", str(tmp_path / "out"), "--batch-size", "3"]) == 2
    assert "batch_size must be a power of two" in capsys.readouterr().err

    def buggy(config):
        raise ValueError("a bug inside the job")

    monkeypatch.setattr(job, "run_job", buggy)  # a ValueError that is no option's fault: a traceback, not exit 2
    with pytest.raises(ValueError, match="a bug inside the job"):
        cli_module.main(["run", manifest, "-o", str(tmp_path / "out")])


def test_validate_names_words_the_embedded_model_does_not_know(tmp_path):
    rows = [{"id": "ok", "prompt": "a red circle"}, {"id": "cat", "prompt": "a photo of a cat"}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    result = cli("validate", manifest)  # the default model: a closed world, its words in unclip_batch.json
    assert result.returncode == 0, result.stderr  # a warning, not an invalid row
    assert (
        "1 rows use words model 'default' does not know" in result.stdout
        and "is the embedded 64 px shapes model" in result.stdout
    )
    assert "'cat' (1)" in result.stdout and "(first rows: cat)" in result.stdout and "circle" in result.stdout
    assert "warning" not in cli("validate", manifest, "--model", "tiny").stdout  # any text: nothing to say


def test_compile_alone_means_torch_compiles_default_mode_and_a_mode_may_be_named(tmp_path):
    from unclip_batch.cli import build_parser, config_from_args

    def compile_of(*flags):
        return config_from_args(build_parser().parse_args(["run", "m.parquet", "-o", str(tmp_path), *flags])).compile

    assert compile_of() == "off"
    assert compile_of("--compile") == "default"
    assert compile_of("--compile", "max-autotune") == "max-autotune"
    assert compile_of("--compile", "--limit", "2") == "default"  # the next option is not taken for a mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m.parquet", "-o", str(tmp_path), "--compile", "fast"])


def validate(capsys, *args) -> tuple[int, str, str]:
    """`unclip-batch validate ARGS` in this process: (exit code, stdout, stderr)."""
    from unclip_batch.cli import main

    code = main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_default_model_trap_is_named_only_when_most_rows_are_other_words(tmp_path, capsys):
    """Item 4 of the docs issue: a manifest of ordinary prompts on the embedded model is told, once, that this is
    the 64 px shapes model and how to run Kandinsky 2.2; a manifest mostly in its world's words is not."""
    shapes = [{"id": f"s{i}", "prompt": "a red circle"} for i in range(3)]
    mostly_shapes = write_manifest(tmp_path / "a.parquet", [*shapes, {"id": "cat", "prompt": "a photo of a cat"}])
    _, out, _ = validate(capsys, mostly_shapes)
    assert "1 rows use words" in out and "--model kandinsky-community" not in out
    ordinary = write_manifest(
        tmp_path / "b.parquet", [{"id": f"c{i}", "prompt": f"a photo of cat {i}"} for i in range(3)]
    )
    _, out, _ = validate(capsys, ordinary)
    assert out.count("is the embedded 64 px shapes model") == 1 and "--model kandinsky-community" in out


def test_validate_checks_the_sizes_of_the_model_named(tmp_path, capsys):
    """Item 4: without --model, sizes are checked against the embedded model (multiples of 8); with --model,
    against the one named (tiny: multiples of 4; Kandinsky 2.2: of 64)."""
    manifest = write_manifest(
        tmp_path / "m.parquet", [{"id": "a", "prompt": "a red circle", "width": 36, "height": 64}]
    )
    code, out, _ = validate(capsys, manifest)
    assert code == 4 and "unsupported_size: 1" in out and "multiple of 8" in out
    assert validate(capsys, manifest, "--model", "tiny")[0] == 0


def test_a_negative_prompt_on_a_variation_is_refused_not_ignored(tmp_path, capsys):
    """Item 5: a variation's negative_prompt was accepted and ignored."""
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [{"id": "v", "task": "variation", "image": "img.png", "negative_prompt": "blurry"}],
    )
    (tmp_path / "img.png").write_bytes(b"")
    code, out, _ = validate(capsys, manifest)
    assert code == 4 and "unused_column: 1" in out and "negative_prompt" in out


def test_a_terminal_shows_warnings_only_unless_verbose(tmp_path, monkeypatch):
    """Item 17: on a terminal, the progress bar and summary say it all: the job's INFO lines and Ray Data's
    execution-plan lines stay off the console unless -v (Ray's log folder keeps them)."""
    import logging

    from unclip_batch import cli as cli_module
    from unclip_batch import pipeline

    seen = {}

    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    def fake_run_job(config):
        seen["level"] = logging.getLogger().level
        seen["verbose"] = config.verbose
        raise cli_module.SetupError("stop here")

    monkeypatch.setattr("unclip_batch.job.run_job", fake_run_job)
    monkeypatch.setattr(sys, "stderr", Terminal())
    # basicConfig sets the root logger up once per process: give it a fresh one, and put it back after.
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    for flags, level, verbose in (([], logging.WARNING, False), (["-v"], logging.INFO, True)):
        logging.root.handlers = []
        assert cli_module.main(["run", manifest, "-o", str(tmp_path / "out"), *flags]) == 2
        assert (seen["level"], seen["verbose"]) == (level, verbose)
    # Ray Data's console handler: INFO off unless verbose, its file handler untouched.
    from ray._private.log import PlainRayHandler

    console, file = PlainRayHandler(), logging.FileHandler(tmp_path / "ray-data.log")
    other = logging.StreamHandler()  # a test runner's capture handler: left alone
    ray_data = logging.getLogger("ray.data")
    monkeypatch.setattr(ray_data, "handlers", [console, file, other])
    info = logging.LogRecord("ray.data", logging.INFO, "", 0, "Execution plan of Dataset ...", None, None)
    pipeline._quiet_console(verbose=False)
    assert not console.filter(info) and file.filter(info) and other.filter(info)
    pipeline._quiet_console(verbose=True)
    assert console.filter(info)


def test_invalid_json_in_the_environment_is_exit_2(tmp_path, capsys, monkeypatch):
    """Item 14: a traceback and exit 1 before."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    monkeypatch.setenv("UNCLIP_BATCH_STORAGE_OPTIONS", "{not json")
    code, _, err = validate(capsys, manifest)
    assert code == 2 and "not valid JSON" in err and "Traceback" not in err
