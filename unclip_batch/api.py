"""The Python API: the job as a function (``run``), and the model stage as a Ray Data processor in
``ray.data.llm``'s shape (``build_processor``).

``run`` is what ``unclip-batch run`` runs, with the same options, guarantees and exit conditions (as
exceptions). ``build_processor`` drops the job's stages (validation, source loading, the model actor, PNG
encoding) into a Ray Data pipeline of your own: rows in, a row per image out, a bad row as data (an
``error_code``), never a crashed pipeline. The same row gives the same PNG bytes either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from unclip_batch import API, sampling
from unclip_batch.config import JobConfig, ModelOptions
from unclip_batch.errors import ConfigError, RowsFailed
from unclip_batch.errors import JobFailed as JobFailed  # re-exported: the exceptions a job raises
from unclip_batch.errors import SetupError as SetupError
from unclip_batch.errors import StorageUnavailable as StorageUnavailable

__all__ = list(API)

Record = dict[str, Any]


@dataclass(frozen=True)
class Summary:
    """What a job did: its ``_SUCCESS`` summary, the main figures as attributes (``raw``: all of it)."""

    output: str
    model: str
    succeeded: int  # rows this run made images for
    failed: int  # rows this run recorded as errors
    done_before: int  # rows earlier runs had recorded (a resume)
    images: int
    images_per_second: float
    wall_s: float
    errors_by_code: dict[str, int]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, summary: dict[str, Any]) -> Summary:
        rows = summary["rows"]
        return cls(
            output=summary["output"],
            model=summary["model"],
            succeeded=rows["succeeded"],
            failed=rows["failed"],
            done_before=rows["done_before"],
            images=summary["images"],
            images_per_second=summary["images_per_s"] or 0.0,
            wall_s=summary["wall_s"],
            errors_by_code=dict(summary["errors_by_code"]),
            raw=summary,
        )


def run(manifests: str | Sequence[str], *, output: str, allow_failures: bool = False, **options: Any) -> Summary:
    """Run a job to completion, or resume it: ``unclip-batch run`` from Python.

    ``options`` are the CLI's, by JobConfig's names (``model``, ``format``, ``batch_size``, ``overwrite``,
    ``storage_options`` ...), and the sampling settings for rows that leave them empty
    (``num_inference_steps=30`` ...). Raises SetupError when the job cannot start (nothing computed),
    StorageUnavailable when object storage stayed away (rerun to resume), JobFailed when it stopped for
    another reason (rerun to resume), and RowsFailed when it completed with some rows recorded as errors
    (unless ``allow_failures``; the summary is on the exception).

    >>> import unclip_batch as ub
    >>> summary = ub.run("s3://b/prompts/", output="s3://b/synth", model="kandinsky-community",
    ...                  format="webdataset", batch_size=16)  # doctest: +SKIP
    >>> summary.succeeded, summary.failed, summary.images_per_second  # doctest: +SKIP
    """
    from unclip_batch.cli import output_location
    from unclip_batch.job import run_job

    settings = {name: options.pop(name) for name in list(options) if name in sampling.NAMES}
    unknown = set(options) - {f.name for f in dataclasses.fields(JobConfig)}
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(sorted(unknown))}; run takes JobConfig's fields "
            f"and the sampling settings ({', '.join(sampling.NAMES)})"
        )
    options["defaults"] = {**options.get("defaults", {}), **settings}
    options.setdefault("progress_bar", False)
    listed = (manifests,) if isinstance(manifests, str) else tuple(manifests)
    config = JobConfig(manifests=listed, output=output_location(output), **options)
    summary = Summary.of(run_job(config))
    if summary.failed and not allow_failures:
        raise RowsFailed(summary)
    return summary


def curate(output: str, **options: Any) -> dict[str, Any]:
    """Curate a finished output, or resume a curation: ``unclip-batch curate`` from Python; its summary
    (``OUTPUT/curation/_SUCCESS``, with ``export`` the export's under ``"export"``).

    ``options`` are the CLI's, by CurateConfig's names: ``min_clip_score``, ``near_duplicate``, ``clusters``,
    ``seed``, ``export`` and ``format``, ``address``, ``device``, ``storage_options``. Raises SetupError
    (a CurationError) before any work when the output cannot be curated as asked.

    >>> import unclip_batch as ub
    >>> summary = ub.curate("s3://b/synth", min_clip_score=0.25, export="s3://b/synth-kept",
    ...                     format="webdataset")  # doctest: +SKIP
    >>> summary["by_reason"], summary["export"]["images"]  # doctest: +SKIP
    """
    from unclip_batch.cli import output_location
    from unclip_batch.curation import CurateConfig
    from unclip_batch.curation import curate as curate_output

    unknown = set(options) - {f.name for f in dataclasses.fields(CurateConfig)} | ({"output"} & set(options))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; curate takes CurateConfig's fields")
    if options.get("export"):
        options["export"] = output_location(options["export"])
    return curate_output(CurateConfig(output=output_location(output), **options))


@dataclass(frozen=True, kw_only=True)
class ProcessorConfig(ModelOptions):
    """The model stage for a Ray Data pipeline of your own: the job's model options (ModelOptions: ``model``,
    ``batch_size``, ``defaults``, ``device``, ``dtype``, ``scheduler``, ``compile``, ``embeddings``,
    ``storage_options``, ``max_source_bytes``) and where the model actors run.

    >>> config = ProcessorConfig(model="kandinsky-community", batch_size=16, concurrency=4, num_gpus=1,
    ...                          defaults={"num_inference_steps": 30})
    """

    concurrency: int = 1  # model actors (ray.data.llm's name)
    num_gpus: float | None = None  # per actor; None: 1 where the device is a GPU (the job's rule), else 0
    num_cpus: float | None = None  # per actor; None: the job's rule (1 with a GPU, else a share of the CPUs)
    # Rows per batch of the CPU stages (validation and sources, PNG encoding): a few full model calls.
    rows_per_batch: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.concurrency < 1 or (self.num_gpus or 0) < 0 or (self.num_cpus or 1) <= 0 or self.rows_per_batch < 1:
            raise ConfigError("concurrency and rows_per_batch must be at least 1; num_gpus and num_cpus not negative")


Preprocess = Callable[[Record], Record]
Postprocess = Callable[[Record], Record]


def build_processor(
    config: ProcessorConfig, preprocess: Preprocess | None = None, postprocess: Postprocess | None = None
) -> Processor:
    """A Processor: ``processor(ds)`` is ``ds`` with a row per image made (``ray.data.llm``'s shape).

    ``preprocess`` maps an input row to a manifest row (``id``, ``task``, ``prompt``, ``image`` ... as in a
    manifest; sources as URLs or as bytes); ``postprocess`` maps each output row. An output row holds the
    input row's columns and ``id``, ``k``, ``seed``, ``candidate``, ``png`` (the image's PNG bytes), ``sha256``,
    ``clip_score``, ``embedding`` (with ``embeddings=True``), ``parameters``, and ``error_stage`` /
    ``error_code`` / ``error_message``: for a row that could not be made, one row with those set and no
    ``png``. A preprocess that raises gives such a row too (``preprocess_failed``); a postprocess that raises
    stops the pipeline with the row's id in the message.

    >>> processor = build_processor(
    ...     ProcessorConfig(model="default"),
    ...     preprocess=lambda row: {"id": row["uid"], "prompt": row["caption"]},
    ...     postprocess=lambda row: {**row, "keep": (row["clip_score"] or 0) > 0.3},
    ... )
    >>> ds = processor(ray.data.from_items([{"uid": "a", "caption": "a red circle"}]))  # doctest: +SKIP
    """
    return Processor(config, preprocess, postprocess)


class Processor:
    """The job's stages over a Ray Data dataset: validate and load (CPU tasks), the model (an actor pool), PNG
    encoding (CPU tasks). Build one with ``build_processor``."""

    def __init__(self, config: ProcessorConfig, preprocess: Preprocess | None, postprocess: Postprocess | None):
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess

    def __call__(self, dataset: Any) -> Any:
        import types

        import ray
        from ray.data import ActorPoolStrategy

        from unclip_batch.manifest import SizeRule
        from unclip_batch.models import ModelSpec, describe_model
        from unclip_batch.pipeline import IO_TASK_CPUS, placement
        from unclip_batch.storage import Stores

        config = self.config
        # The job's placement rule, so that an actor computes as the job's do (on CPU the torch threads per
        # actor decide the last bits of every pixel: same threads, same bytes).
        asked = types.SimpleNamespace(device=config.device, workers=config.concurrency, cpus_per_worker=config.num_cpus)
        place = placement(asked, ray.cluster_resources())
        gpus = config.num_gpus if config.num_gpus is not None else (1 if place.device == "cuda" else 0)
        stores = Stores(config.storage_options, [ModelSpec.url_of(config.model)])
        spec, info = describe_model(config.model, stores)  # a bad model spec fails here, before any row
        prepare = {
            "preprocess": self.preprocess,
            "defaults": {**info.defaults, **config.defaults},
            "size": SizeRule.of(info),
            "stores": stores,
            "max_bytes": config.max_source_bytes,
        }
        dataset = dataset.map_batches(
            _prepare_rows,
            fn_kwargs=prepare,
            batch_size=config.rows_per_batch,
            batch_format="pyarrow",
            num_cpus=IO_TASK_CPUS,
        )
        dataset = dataset.map_batches(
            _ModelStage,
            fn_constructor_kwargs={
                "model": config.model,
                "batch_size": config.batch_size,
                "device": place.device,
                "threads": place.threads,
                "dtype": config.dtype,
                "scheduler": config.scheduler,
                "compile": config.compile,
                "embeddings": config.embeddings,
                "stores": stores,
            },
            compute=ActorPoolStrategy(size=place.workers),
            num_gpus=gpus,
            num_cpus=place.worker_cpus,
            batch_size=None,
            batch_format="numpy",
        )
        return dataset.map_batches(
            _finish_rows,
            fn_kwargs={"model": spec.spec, "postprocess": self.postprocess},
            batch_size=None,
            batch_format="numpy",
            num_cpus=IO_TASK_CPUS,
        )


def _prepare_rows(
    table: Any, preprocess: Preprocess | None, defaults: dict[str, Any], size: Any, stores: Any, max_bytes: int
) -> dict[str, Any]:
    """Validate each row as the job does (a manifest row), load its sources, and hand the model stage a batch
    of model rows; rows that fail here carry their error. Every row keeps its input row (``_input``)."""
    from unclip_batch.batches import rows_of, to_batch
    from unclip_batch.manifest import FIRST, FOLDER, MANIFEST, MANIFEST_ROW, ROW, SOURCE_COLUMNS, parse_records
    from unclip_batch.predict import model_input
    from unclip_batch.sources import BYTES_URL, SourcePolicy, load_sources

    inputs = table.to_pylist()
    records, failed, seen = [], {}, set()
    for position, original in enumerate(inputs):
        try:
            record = dict(preprocess(original)) if preprocess else dict(original)
        except Exception as exc:
            failed[position] = ("preprocess", "preprocess_failed", f"preprocess raised {type(exc).__name__}: {exc}")
            continue
        for name in SOURCE_COLUMNS:  # sources given as bytes: validated as such, decoded from the row
            value = record.get(name)
            if isinstance(value, (bytes, bytearray)):
                url = _url_in(bytes(value))
                if url is not None:
                    record[name] = url
                else:
                    record[f"{name}_bytes"], record[name] = bytes(value), BYTES_URL + name
        key = str(record.get("id")).casefold()
        record.update(
            {ROW: position, FIRST: key not in seen, FOLDER: "processor:", MANIFEST: "", MANIFEST_ROW: position}
        )
        seen.add(key)
        records.append(record)
    rows, errors = parse_records(records, defaults, size)
    for error in errors:
        failed[error["row"]] = (error["stage"], error["code"], error["message"])
    by_position = {r[ROW]: r for r in records}
    model_rows = []
    for row in rows:
        extra = {f"{n}_bytes": by_position[row.row].get(f"{n}_bytes", b"") for n in SOURCE_COLUMNS}
        model_rows.append({**model_input(row), **extra})
    if model_rows:
        model_rows = rows_of(load_sources(to_batch(model_rows), SourcePolicy(stores, max_bytes)))
    template = _template(defaults, size)
    for position, (stage, code, message) in failed.items():
        model_rows.append(
            {
                **template,
                "row": position,
                "id": str(by_position.get(position, inputs[position]).get("id", "")),
                "stage": stage,
                "code": code,
                "message": message,
            }
        )
    for model_row in model_rows:
        model_row["_input"] = pickle.dumps(inputs[model_row["row"]], protocol=5)
        for name in SOURCE_COLUMNS:
            model_row.pop(f"{name}_bytes", None)
    return to_batch(model_rows)


def _url_in(value: bytes) -> str | None:
    """A URL or path that arrived as bytes: Arrow makes a column holding both paths and image bytes (rows of
    ``from_items``) a binary one. An image's bytes never read as one (PNG, JPEG ... start with binary magic)."""
    if len(value) > 4096:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and (text.startswith("/") or "://" in text) else None


def _template(defaults: dict[str, Any], size: Any) -> Record:
    """A model row with every column and nothing in it: what a row that failed before the model carries."""
    from unclip_batch.manifest import Row as ManifestRow
    from unclip_batch.predict import model_input

    values: dict[str, Any] = {name: defaults.get(name, sampling.DEFAULTS.get(name)) for name in sampling.NAMES}
    values.update(width=size.default, height=size.default)
    blank = ManifestRow(
        row=0,
        id="x",
        task="generate",
        prompt="x",
        negative_prompt="",
        image="",
        mask="",
        num_images=1,
        seed=0,
        **values,
    )
    return {**model_input(blank), "load_s": 0.0}


class _ModelStage:
    """UnclipPredictor, the job's model actor, on the processor's batches."""

    def __init__(self, **kwargs: Any):
        from unclip_batch.predict import UnclipPredictor

        self.predictor = UnclipPredictor(
            tasks=("generate", "variation", "inpaint", "interpolate", "text_diff"), **kwargs
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.predictor(batch)


def _finish_rows(batch: dict[str, Any], model: str, postprocess: Postprocess | None) -> Any:
    """Each image as an output row: its input row's columns, the PNG (the job's encoding), its figures."""
    import numpy as np
    import pyarrow as pa

    from unclip_batch.batches import image_of, rows_of
    from unclip_batch.writer import PARAMETERS, encode_png

    out = []
    for row in rows_of(batch):
        result: Record = {**pickle.loads(row["_input"]), "id": row["id"], "k": None, "seed": None, "candidate": None}
        result["model"] = model
        result.update(png=None, sha256=None, clip_score=None, embedding=None, parameters=None)
        result.update(error_stage=None, error_code=None, error_message=None)
        if row["code"]:
            result.update(error_stage=row["stage"], error_code=row["code"], error_message=row["message"])
        else:
            png = encode_png(image_of(row))
            score = float(row["clip_score"])
            result.update(
                k=int(row["k"]),
                seed=int(row["seed"]),
                candidate=int(row["candidate"]),
                png=png,
                sha256=hashlib.sha256(png).hexdigest(),
                clip_score=None if np.isnan(score) else score,
                embedding=np.frombuffer(row["embedding"], np.float32).tolist() if row.get("embedding") else None,
                parameters={name: row[name] for name in PARAMETERS.names},
            )
        if postprocess is not None:
            try:
                result = postprocess(result)
            except Exception as exc:
                raise ValueError(
                    f"postprocess raised on row {row['id']!r} (image {result['k']}): {type(exc).__name__}: {exc}"
                ) from exc
        out.append(result)
    return pa.Table.from_pylist(out)
