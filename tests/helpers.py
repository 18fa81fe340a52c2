"""Helpers shared by the tests: manifests, source images, reading a job's output."""

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from unclip_batch.config import JobConfig

REPO = Path(__file__).resolve().parent.parent

# Few steps keep the tiny model fast; the code paths are the same as at 50.
FAST = {"num_inference_steps": 4, "prior_num_inference_steps": 2}


def cli_flags(steps: dict = FAST, device: str = "cpu") -> list[str]:
    """The command line's form of a job's step settings (``--num-inference-steps 4 ...``) and device."""
    flags = [x for name, value in steps.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    return [*flags, "--device", device]


def cli(*args, env=None, timeout=300):
    """``unclip-batch ARGS`` in a process of its own, from the repository, with ``env`` over this environment."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "unclip_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist reads the keys of the first row only
        keys = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{k: row.get(k) for k in keys} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(color=(220, 30, 30), background=(40, 70, 200), size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return image


def box_mask(size=64, box=(32, 32, 60, 60)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def job(manifests, output, **kwargs) -> JobConfig:
    defaults = {**FAST, **kwargs.pop("defaults", {})}
    kwargs.setdefault("model", "tiny")
    kwargs.setdefault("device", "cpu")  # pinned: on a GPU machine "auto" would run another path
    return JobConfig(manifests=tuple(str(m) for m in manifests), output=str(output), defaults=defaults, **kwargs)


def read_output(output) -> tuple[pa.Table, pa.Table]:

    from unclip_batch.storage import Location

    location = Location(str(output))

    def read(folder):
        files = [location.path(f) for f in location.files(folder) if f.endswith(".parquet")]
        tables = [pq.read_table(f, filesystem=location.fs) for f in files]
        return pa.concat_tables(tables) if tables else None

    return read("metadata"), read("errors")


def images_of(output: Path) -> dict[str, bytes]:
    """Every image of a local output as {"<id>/<k>.png": PNG bytes}, whatever its format."""
    import json
    import tarfile

    root = Path(output)
    found = {str(p.relative_to(root / "images")): p.read_bytes() for p in sorted(root.glob("images/**/*.png"))}
    for shard in sorted(root.glob("shards/*.tar")):  # webdataset: each sample's .json names its row
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                record = json.loads(data)
                found[f"{record['id']}/{record['k']}.png"] = members[name.removesuffix(".json") + ".png"]
    for shard in sorted(root.glob("data/*.parquet")):  # parquet: the image column's bytes
        table = pq.read_table(shard, columns=["id", "k", "image"]).to_pylist()
        found.update({f"{r['id']}/{r['k']}.png": r["image"]["bytes"] for r in table})
    return dict(sorted(found.items()))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def kill_processes(marks: tuple[str, ...]) -> None:
    """SIGKILL every process whose command line holds one of ``marks``, with all its children."""
    import psutil

    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and any(m in " ".join(p.info["cmdline"]) for m in marks)
    ]
    victims = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                victims[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    for p in victims.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)


def make_sources(folder: Path) -> Path:
    """Source images and masks that manifests in ``folder`` reference as img/..."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    scene().save(folder / "img" / "scene.png")
    scene((30, 160, 60), (240, 220, 40)).save(folder / "img" / "scene2.png")
    box_mask().save(folder / "img" / "mask.png")
    box_mask(box=(0, 0, 20, 63)).save(folder / "img" / "mask2.png")
    rgba = scene().convert("RGBA")
    ImageDraw.Draw(rgba).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 0))
    rgba.save(folder / "img" / "hole.png")
    return folder


def doc_columns(section: str) -> list[str]:
    """The output columns docs/outputs.md lists in its section ``section`` ("## Metadata"), in order."""
    text = (REPO / "docs" / "outputs.md").read_text()
    start = text.index(section)
    table = text[start : text.index("\n\n", text.index("| column", start))]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)


class _Done:
    """A task's result, as the in-process pipeline hands it back where Ray would hand a reference."""

    def __init__(self, value):
        self.value = value


class _InlineTask:
    def __init__(self, function, num_returns: int = 1):
        self.function, self.num_returns = function, num_returns

    def remote(self, *args, **kwargs):
        resolved = lambda v: v.value if isinstance(v, _Done) else v  # noqa: E731  (Ray passes results, not refs)
        value = self.function(*map(resolved, args), **{k: resolved(v) for k, v in kwargs.items()})
        return tuple(_Done(v) for v in value) if self.num_returns > 1 else _Done(value)


class FakeClock:
    """A clock for storage's retries: each wait is recorded and passes at once (no real waiting)."""

    def __init__(self, now: float = 100.0):
        self.now, self.slept = now, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def fake_storage_clock(monkeypatch) -> FakeClock:
    from unclip_batch import storage

    clock = FakeClock()
    monkeypatch.setattr(storage, "time", clock)
    return clock


def inline_pipeline(monkeypatch) -> None:
    """The job's pipeline in this process, without Ray: the same stages (read_stage, load_sources, the
    predictor, write_stage, commit_shard, the id scan) on plain batches, a model block at a time, in shard
    order. For fast tests of what the job does around them (job.py, the commits, resume); the Ray wiring
    itself is the slow tests' (test_end_to_end, test_faults)."""
    import dataclasses
    import json

    from unclip_batch import pipeline, plan
    from unclip_batch.predict import UnclipPredictor
    from unclip_batch.sources import SourcePolicy, load_sources

    unwrap = lambda refs: [r.value for r in refs] if isinstance(refs, list) else refs.value  # noqa: E731
    monkeypatch.setattr(pipeline, "ensure_ray", lambda config: None)
    monkeypatch.setattr(pipeline, "_task", _InlineTask)
    monkeypatch.setattr(pipeline, "_get", unwrap)
    monkeypatch.setattr(pipeline, "finished", lambda refs, timeout=0: list(refs))
    monkeypatch.setattr(pipeline, "result", unwrap)

    def changed_rows(config, output, stores, shards, duplicates):
        options = {"output": output, "stores": stores, "retry_for_s": config.storage_retry_s}
        return [row for s in shards for row in plan.changed_rows(s, duplicates=duplicates, **options)]

    def run(config, shards, work, tasks):
        predictor = pipeline._packed(
            UnclipPredictor(
                model=config.model,
                tasks=tasks,
                batch_size=config.batch_size,
                device="cpu",
                stores=work.stores,
                embeddings=config.embeddings,
            )
        )
        fetch = any(task != "generate" for task in tasks)
        policy = SourcePolicy(work.stores, work.max_source_bytes, config.storage_retry_s)
        for shard in shards:
            text = np.array([json.dumps(dataclasses.asdict(shard))], dtype=object)
            read = pipeline.read_stage({"shard": text}, work, config.format, sources=not fetch)
            for i in range(len(read["payload"])):
                block = {key: values[i : i + 1] for key, values in read.items()}
                if fetch:
                    block = pipeline._packed(load_sources)(block, policy=policy)
                yield pipeline.write_stage(predictor(block), work.output, config.format, config.storage_retry_s)

    monkeypatch.setattr(pipeline, "changed_rows", changed_rows)
    monkeypatch.setattr(pipeline, "run", run)
