"""The docs cannot drift from the code: the reference pages are generated (docs/generate.py) and must equal
what the code generates now; every command in the README parses, and those that need no network, GPU or
cluster run as pasted; every local link resolves."""

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATE = runpy.run_path(str(REPO / "docs" / "generate.py"))


@pytest.mark.parametrize("page", sorted(GENERATE["PAGES"]))
def test_the_generated_pages_are_what_the_code_says(page):
    committed = (REPO / "docs" / page).read_text()
    assert committed == GENERATE["PAGES"][page](), f"docs/{page} is stale: run `make docs` and commit it"


def test_the_references_cover_every_code_option_and_column():
    from unclip_batch.errors import CODES
    from unclip_batch.writer import COLUMN_DOCS, METADATA_SCHEMA

    errors = (REPO / "docs" / "errors.md").read_text()
    assert all(f"| `{code}` |" in errors for code in CODES)
    outputs = (REPO / "docs" / "outputs.md").read_text()
    assert all(f"| `{name}` |" in outputs for name in METADATA_SCHEMA.names) and set(METADATA_SCHEMA.names) <= set(
        COLUMN_DOCS
    )
    from unclip_batch.curation import RECORD_DOCS, RECORD_SCHEMA

    assert all(f"| `{name}` |" in outputs for name in RECORD_SCHEMA.names) and set(RECORD_SCHEMA.names) == set(
        RECORD_DOCS
    )
    cli = (REPO / "docs" / "cli.md").read_text()
    assert "## `unclip-batch curate`" in cli and "--near-duplicate" in cli and "--export" in cli
    for flag in ("--max-source-bytes", "--storage-options", "--verbose", "--seed", "--show", "--version", "-o"):
        assert flag in cli, flag


def test_the_api_page_lists_every_public_name():
    import unclip_batch

    text = (REPO / "docs" / "api.md").read_text()
    assert [n for n in unclip_batch.__all__ if n != "__version__" and f"## `ub.{n}" not in text] == []


def test_the_manifest_page_names_every_manifest_column():
    from unclip_batch.manifest import KNOWN_COLUMNS

    text = (REPO / "docs" / "manifests.md").read_text()
    assert [c for c in KNOWN_COLUMNS if f"`{c}`" not in text] == []


def shell_commands(text: str) -> list[str]:
    """The commands of a Markdown text's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_is_for_users_and_short():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 280
    first_screens = "\n".join(text.splitlines()[:150])
    assert "--model kandinsky-community" in first_screens or "--model s3://" in first_screens
    assert "ray job submit" in first_screens and "--format webdataset" in first_screens
    for history in ("issue", "our 2-core", "2026-"):
        assert history not in text, history


def test_every_local_link_resolves():
    for page in [REPO / "README.md", REPO / "SECURITY.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_every_readme_command_parses_and_the_offline_ones_run(tmp_path):
    """Each `unclip-batch ...` line of the README parses with the CLI's own parser; those that need no network,
    GPU or cluster run as pasted, in a copy of the repository's demo files."""
    from unclip_batch.cli import build_parser

    commands = shell_commands((REPO / "README.md").read_text()) + shell_commands(
        (REPO / "docs" / "operators.md").read_text()
    )
    ours = [c for c in commands if c.startswith("unclip-batch") or "jobs/run_job.py" in c]
    assert len(ours) >= 4
    for command in ours:
        words = shlex.split(command)
        args = words[words.index("jobs/run_job.py") + 1 :] if "jobs/run_job.py" in words else words[1:]
        if "jobs/run_job.py" in words:
            args = ["run", *args]
        build_parser().parse_args(args)  # SystemExit on an unknown flag or a bad value
    # The ones that run offline here: building the manifest from a prompt file.
    (tmp_path / "prompts.txt").write_text("a red circle\na small green triangle at the top left\n")
    unclip = str(Path(sys.executable).parent / "unclip-batch")
    ran = 0
    for command in ours:
        words = shlex.split(command)
        if words[:3] == ["unclip-batch", "manifest", "build"] and not any("://" in w for w in words):
            result = subprocess.run([unclip, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (command, result.stderr)
            ran += 1
    assert ran >= 1 and (tmp_path / "prompts.parquet").exists()
