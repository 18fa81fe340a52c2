"""The package's boundaries: the runtime (unclip_batch) apart from the model lab (unclip_lab)."""

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = REPO / "unclip_batch"


def test_the_runtime_never_imports_the_lab():
    # Statically: no import of the lab anywhere in the runtime, lazy imports inside functions included.
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "unclip_lab" for n in names), f"{path} imports the lab"
    # And for real: importing every runtime module (as the job's driver and actors do) loads none of it.
    code = (
        "import importlib, json, pkgutil, sys, unclip_batch\n"
        "for m in pkgutil.walk_packages(unclip_batch.__path__, 'unclip_batch.'): importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('unclip_batch', 'unclip_lab')))))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    )
    assert "unclip_batch.predict" in loaded and "unclip_batch.models.kandinsky22" in loaded
    assert not [m for m in loaded if m.startswith("unclip_lab")]


@pytest.mark.slow
def test_the_wheel_holds_the_runtime_and_its_weights_and_not_the_lab(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("unclip_batch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"unclip_batch", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "unclip_batch/predict.py" in names
    assert any(n.startswith("unclip_batch/weights/shapes/") and n.endswith(".safetensors") for n in names)
    assert not [n for n in names if "unclip_lab" in n or n.endswith(("world.py", "train.py", "evaluate.py"))]


def test_the_tree_is_clean_under_ruff():
    """Lint and format rules: pyproject.toml's [tool.ruff]. Fix with `ruff check --fix . && ruff format .`."""
    for command in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}"


@pytest.mark.slow
def test_the_public_api_passes_mypy_strict(tmp_path):
    """mypy's settings are pyproject.toml's: our modules followed, the big libraries not."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", f"--cache-dir={tmp_path}", "unclip_batch/api.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_public_names_import_lazily():
    """``import unclip_batch`` stays light (the CLI and the workers import it); the API comes on first use."""
    code = (
        "import sys, unclip_batch; print('unclip_batch.api' in sys.modules); "
        "unclip_batch.run; print('unclip_batch.api' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
