"""Command line: ``unclip-batch run`` and ``unclip-batch validate``. Builds the JobConfig in one place."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections import Counter

from unclip_batch import __version__, sampling
from unclip_batch.config import COMPILE_MODES, DEVICES, DTYPES, FORMATS, SCHEDULERS, JobConfig, default
from unclip_batch.errors import JobFailed, SetupError, StorageUnavailable

# Exit codes (README, "Resume, failures and exit codes"). 1 stays Python's own: an unexpected error, a bug to report.
EXIT_SETUP = 2  # the job could not start: bad manifest, model, output or options; nothing was computed
EXIT_STORAGE = 3  # object storage stayed unavailable past --storage-retry-seconds; rerunning resumes
EXIT_ROWS_FAILED = 4  # every row is accounted for, but some are error records (validate: invalid rows)
EXIT_STOPPED = 5  # the job stopped part-way for another reason (cluster, model actor); finished rows are kept


RUN_EXAMPLES = """examples:
  unclip-batch run manifests/demo.parquet --output out/demo
  unclip-batch run s3://bucket/manifests/ --output s3://bucket/out/run1 --model kandinsky-community \\
      --batch-size 16 --storage-options '{"endpoint_url": "http://minio:9000"}'   # keys: the AWS_* variables
  unclip-batch run s3://bucket/manifests/ --output s3://bucket/out/run1 --storage-options @storage.json
  unclip-batch run manifests/demo.parquet --output out/demo --retry-errors   # resume, redoing failed rows

exit codes: 0 all rows done, 2 nothing computed (bad options/manifest/model/output), 3 storage outage,
4 some rows failed (--allow-failures: 0), 5 stopped by another failure, 130/143 Ctrl-C/SIGTERM;
rerunning the same command resumes after 3, 5, 130 and 143.
"""


BUILD_EXAMPLES = """examples:
  unclip-batch manifest build prompts.txt -o prompts.parquet --num-images 4
  unclip-batch manifest build manifests/demo.jsonl -o manifests/demo.parquet
  unclip-batch manifest build classes.txt -o synth.parquet --num-images 8 \\
      --template "a photo of a {}" --template "a drawing of a {}"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip-batch",
        description="DALL-E 2 style batch image generation, variations and inpainting over Parquet manifests, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parser.add_argument("--version", action="version", version=f"unclip-batch {__version__}")
    run = sub.add_parser(
        "run",
        help="run manifests through the model and write images + metadata",
        description="Run manifests through the model; write images, metadata and error "
        "records under --output. A rerun on the same output resumes.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("manifests", nargs="+", metavar="MANIFEST", help="Parquet file or folder (any fsspec URL)")
    run.add_argument("--output", "-o", required=True, help="output folder URL (local path, s3://bucket/prefix ...)")
    run.add_argument(
        "--address",
        help="Ray cluster to join: auto, HOST:6379 (default: $RAY_ADDRESS, else a new "
        "local Ray for this job alone). Ray Client (ray://) does not work with Ray Data: use "
        "`ray job submit` (docs/operators.md)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=default("batch_size"),
        help=f"images per model call, a power of two (default {default('batch_size')})",
    )
    run.add_argument("--workers", type=int, help="model actors (default: one per GPU, or 1 without a GPU)")
    run.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per model actor (default: 1 with a GPU; without one, a quarter of the cluster's CPUs "
        "shared among the actors, at least 0.25 and at most 1 each)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard earlier results under --output (default: resume, skipping rows already done)",
    )
    run.add_argument(
        "--retry-errors",
        action="store_true",
        help="redo the rows that earlier runs recorded as errors (default: a resumed job skips them)",
    )
    run.add_argument(
        "--redo-changed",
        action="store_true",
        help="redo rows whose manifest values changed under "
        "the same id since an earlier run recorded them (default: such a rerun is refused)",
    )
    run.add_argument(
        "--allow-failures",
        action="store_true",
        help=f"exit 0 when the job completes even if some rows failed (default: exit {EXIT_ROWS_FAILED})",
    )
    run.add_argument("--limit", type=int, help="run only the first N manifest rows")
    run.add_argument(
        "--device",
        default=default("device"),
        choices=DEVICES,
        help="where the model runs: auto = one actor per GPU when the cluster has GPUs, else CPU",
    )
    run.add_argument(
        "--dtype",
        default=default("dtype"),
        choices=DTYPES,
        help="model weights' type: auto = float16 on CUDA, float32 on CPU",
    )
    run.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=default("compile"),
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the model in each actor, in MODE: default (--compile alone), reduce-overhead (adds "
        "CUDA graphs) or max-autotune (CUDA graphs and more kernels, none chosen by timing); off (the default). "
        "Each actor compiles once per call shape (task, size, guidance) in its first call of it: the summary's "
        "warm_up. A compiled job resumes to the same bytes; its images differ from an eager job's in few "
        "pixels, by a few levels (docs/operators.md, 'Compiled models')",
    )
    run.add_argument(
        "--scheduler",
        default=default("scheduler"),
        choices=SCHEDULERS,
        help="decoder sampler: the checkpoint's own (default: DDPM for Kandinsky 2.2), ddpm, ddim or dpm++ "
        "(DPM-Solver++ 2M: on the embedded model as good in 20 steps as DDPM in far more; set "
        "--num-inference-steps too, it does not lower them by itself; part of the job record)",
    )
    run.add_argument(
        "--embeddings",
        action="store_true",
        help="store each image's CLIP image embedding in the metadata (column embedding, float32), for "
        "deduplication and nearest-neighbour search",
    )
    run.add_argument(
        "--format",
        default=default("format"),
        choices=FORMATS,
        help="files: a PNG per image (images/<id>/<k>.png); webdataset: tar shards (shards/*.tar: <key>.png, "
        ".json, .txt) for open_clip and webdataset; parquet: data/*.parquet with the images' bytes, for "
        "Hugging Face datasets",
    )
    run.add_argument(
        "--rows-per-shard",
        type=int,
        default=default("rows_per_shard"),
        help=f"manifest rows per shard: each is read by one task and written as one output shard, whole "
        f"(default {default('rows_per_shard')})",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines")
    run.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also show Ray's and Ray Data's own lines on the terminal (they always go to Ray's log folder)",
    )
    run.add_argument(
        "--flush-seconds",
        type=float,
        default=default("flush_every_s"),
        help="commit unfinished "
        f"shards at least this often: the most work a killed run loses (default {default('flush_every_s'):g})",
    )
    run.add_argument(
        "--storage-retry-seconds",
        type=float,
        default=default("storage_retry_s"),
        help="retry "
        f"object-storage failures this long before stopping the job (default {default('storage_retry_s'):g})",
    )
    for setting in sampling.SETTINGS:
        run.add_argument(
            f"--{setting.name.replace('_', '-')}", type=sampling.KINDS[setting.name], help=setting.metadata["help"]
        )
    val = sub.add_parser(
        "validate",
        help="check manifests without loading a model",
        description="Check every row of the manifests against the model named by --model (its sizes and "
        "settings: Kandinsky 2.2 takes multiples of 64 up to 1024), and that local source files exist, "
        "without loading weights. Exit 4 when some rows are invalid.",
    )
    val.add_argument("manifests", nargs="+", metavar="MANIFEST", help="Parquet file or folder (any fsspec URL)")
    val.add_argument("--show", type=int, default=20, help="bad rows to list (default 20)")
    manifest = sub.add_parser("manifest", help="manifest tools (build a Parquet manifest from text files)")
    tools = manifest.add_subparsers(dest="tool", required=True)
    build = tools.add_parser(
        "build",
        help="a Parquet manifest from .txt (a prompt a line), .csv or .jsonl files",
        description="Build a Parquet manifest from .txt (a prompt a line), .csv or .jsonl files. Rows without "
        "an id get one from their file's name and line (prompts-000041).",
        epilog=BUILD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("sources", nargs="+", metavar="SOURCE", help=".txt, .csv or .jsonl file (any fsspec URL)")
    build.add_argument("--output", "-o", required=True, help="the Parquet manifest to write (any fsspec URL)")
    build.add_argument(
        "--template",
        action="append",
        default=[],
        help="a prompt template with {} for the class (repeatable): the sources are then class lists, a class a "
        "line, and every class x template is a row with the class in a 'label' column",
    )
    build.add_argument("--num-images", type=int, help="images per row, for rows that leave num_images empty")
    build.add_argument("--seed", type=int, help="seed for rows that leave seed empty (default: derived from the id)")
    report = sub.add_parser(
        "report",
        help="write OUTPUT/report/index.html: summary, contact sheets per task, errors by code",
        description="Write OUTPUT/report/index.html: the summary, a contact sheet per task (each image with its "
        "prompt, and for variations and inpaints the source and mask), and the error records by code. Open it "
        "from disk, or serve the output folder as it is.",
    )
    report.add_argument("output", metavar="OUTPUT", help="a job's output folder (local path or any fsspec URL)")
    curate = _curate_parser(sub)
    run.add_argument(
        "--max-source-bytes",
        type=int,
        default=default("max_source_bytes"),
        help="a source image or mask larger than this many bytes is its row's error, image_too_large "
        f"(default {default('max_source_bytes'):,}: a 64 Mpx 16-bit RGBA image)",
    )
    for p in (run, val, build, report, curate):
        p.add_argument(
            "--storage-options",
            type=storage_options_arg,
            default=None,
            metavar="JSON|@FILE",
            help="fsspec options for the job's own stores (output, manifests, model), as JSON without "
            'secrets, e.g. \'{"endpoint_url": "http://host:8333"}\', or @FILE, a JSON file that may hold them '
            "(default: $UNCLIP_BATCH_STORAGE_OPTIONS, else none: credentials from the AWS_* variables, a "
            "profile or the node's role). Rows' sources on other stores get none of them",
        )
    for p in (run, val):
        p.add_argument(
            "--model",
            "-m",
            default=default("model"),
            help="model spec: default, tiny, a local folder, a Hub "
            "namespace or an object-storage URL, optionally FAMILY:LOCATION (default: default)",
        )
    return parser


CURATE_EXAMPLES = """examples:
  unclip-batch curate s3://bucket/synth --min-clip-score 0.25
  unclip-batch curate s3://bucket/synth --export s3://bucket/synth-curated --format webdataset

exit codes: 0 done, 2 nothing computed (not a finished unclip-batch output, bad options or --export folder),
3 storage outage; rerunning the same command resumes after the stages it finished.
"""


def _curate_parser(sub) -> argparse.ArgumentParser:
    from unclip_batch.curation import NEAR_DUPLICATE
    from unclip_batch.writer import FORMATS

    curate = sub.add_parser(
        "curate",
        help="filter a finished output by CLIP score, remove exact and near-duplicates; export the kept samples",
        description="Write OUTPUT/curation/: a record per image (kept, or why not: low_clip_score, exact_duplicate, "
        "near_duplicate) and _SUCCESS, a summary. Near-duplicates are found as SemDeDup finds them: k-means on the "
        "CLIP image embeddings, pairs compared within each cluster; of a group of duplicates the image with the "
        "highest clip_score is kept. An output made without --embeddings has them computed from its images by its "
        "model's CLIP (kept in curation/embeddings/).",
        epilog=CURATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    curate.add_argument(
        "output", metavar="OUTPUT", help="a finished job's output folder (local path or any fsspec URL)"
    )
    curate.add_argument(
        "--min-clip-score",
        type=float,
        metavar="T",
        help="drop images whose clip_score is under this (default: none dropped)",
    )
    curate.add_argument(
        "--near-duplicate",
        type=float,
        default=NEAR_DUPLICATE,
        metavar="S",
        help=f"cosine similarity at or above which two images are one (default {NEAR_DUPLICATE}, measured: "
        "benchmarks/README.md, Curation)",
    )
    curate.add_argument("--clusters", type=int, metavar="K", help="k-means clusters (default: one per 1,000 images)")
    curate.add_argument("--seed", type=int, default=0, help="seed of the k-means sample and start (default 0)")
    curate.add_argument("--export", metavar="DEST", help="write the kept samples and their metadata to DEST as shards")
    curate.add_argument("--format", choices=list(FORMATS), help="the export's format (default: the output's)")
    curate.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a Ray of its own)")
    curate.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="for embeddings computed from the images"
    )
    curate.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    return curate


def _curate(args) -> int:
    from unclip_batch.curation import CurateConfig, curate

    config = CurateConfig(
        output=output_location(args.output),
        min_clip_score=args.min_clip_score,
        near_duplicate=args.near_duplicate,
        clusters=args.clusters,
        seed=args.seed,
        export=output_location(args.export) if args.export else None,
        format=args.format,
        address=args.address,
        device=args.device,
        storage_options=_storage_options(args),
        verbose=args.verbose,
    )
    summary = curate(config)
    reasons = ", ".join(f"{n} {reason}" for reason, n in summary["by_reason"].items())
    print(f"curated {summary['images']} images: {reasons}")
    print(f"records: {storage_redact(config.output)}/curation/records/")
    if "export" in summary:
        print(f"exported {summary['export']['images']} images to {storage_redact(config.export or '')}")
    return 0


def storage_redact(url: str) -> str:
    from unclip_batch.storage import redact

    return redact(url)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    defaults = {name: getattr(args, name) for name in sampling.NAMES if getattr(args, name) is not None}
    return JobConfig(
        max_source_bytes=args.max_source_bytes,
        manifests=tuple(args.manifests),
        output=output_location(args.output),
        model=args.model,
        storage_options=_storage_options(args),
        address=args.address,
        batch_size=args.batch_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        overwrite=args.overwrite,
        limit=args.limit,
        retry_errors=args.retry_errors,
        redo_changed=args.redo_changed,
        defaults=defaults,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        scheduler=args.scheduler,
        progress_bar=False if args.quiet else None,
        verbose=args.verbose,
        embeddings=args.embeddings,
        format=args.format,
        rows_per_shard=args.rows_per_shard,
        flush_every_s=args.flush_seconds,
        storage_retry_s=args.storage_retry_seconds,
    )


def output_location(output: str) -> str:
    """A local output as an absolute path: Ray's workers (and a Ray job's driver) run in other folders.

    Inside a Ray job the working directory is Ray's temporary copy of the job's files, deleted with it:
    a relative output there is refused rather than written where nobody will look."""
    if "://" in output or os.path.isabs(output):
        return output
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray for a submitted job's entrypoint
        raise SetupError(
            f"--output {output} is a relative path, and this is a Ray job: it would land in Ray's "
            f"temporary working directory ({os.getcwd()}), deleted with the job. Give an "
            "object-storage URL (s3://...) or an absolute path on storage every node shares"
        )
    return os.path.abspath(output)


# Option names that hold a secret (fsspec's s3fs, gcsfs, adlfs; botocore's own names): refused on a command
# line, where Ray's job table, `ps`, shell history and a RayJob's spec would keep them.
SECRET_OPTIONS = {
    "key",
    "secret",
    "token",
    "password",
    "account_key",
    "sas_token",
    "client_secret",
    "credential",
    "credentials",
    "connection_string",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "session_token",
}
ENV_OPTIONS = "UNCLIP_BATCH_STORAGE_OPTIONS"


def secret_keys(options: dict) -> list[str]:
    """The names of secret-bearing options, nested ones (client_kwargs) included."""
    found = []
    for name, value in options.items():
        lowered = str(name).lower()
        if lowered in SECRET_OPTIONS or "secret" in lowered or "password" in lowered:
            found.append(str(name))
        if isinstance(value, dict):
            found += [f"{name}.{inner}" for inner in secret_keys(value)]
    return found


def _parse_options(text: str, where: str) -> dict:
    """Options as JSON; a message that quotes none of the text (it may hold a secret)."""
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a JSON object")
    return options


def storage_options_arg(value: str) -> dict:
    """--storage-options: JSON without secrets, or @FILE (curl's convention) whose JSON may hold them."""
    try:
        if value.startswith("@"):
            try:
                with open(os.path.expanduser(value[1:]), encoding="utf-8") as f:
                    return _parse_options(f.read(), f"the file {value[1:]}")
            except OSError as exc:
                raise ValueError(f"the file {value[1:]} could not be read ({exc.strerror})") from None
        options = _parse_options(value, "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    secrets = secret_keys(options)
    if secrets:
        raise argparse.ArgumentTypeError(
            f"{', '.join(secrets)}: secrets are not taken on the command line, where the shell history, `ps` "
            f"and Ray's job table keep them. Put the options in a file and pass --storage-options @FILE, or "
            f"put them in ${ENV_OPTIONS}, or leave the keys out and let the provider chain find them (the "
            "AWS_* variables, a profile, the node's role)"
        )
    return options


def _storage_options(args) -> dict:
    if args.storage_options is not None:
        return args.storage_options
    try:
        return _parse_options(os.environ.get(ENV_OPTIONS, "{}"), f"${ENV_OPTIONS}")
    except ValueError as exc:
        raise SetupError(str(exc)) from None


def _stores(args, *urls: str):
    from unclip_batch.models import ModelSpec
    from unclip_batch.storage import Stores

    model = getattr(args, "model", None)
    return Stores(_storage_options(args), [*urls, *([ModelSpec.url_of(model)] if model else [])])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # On a terminal the progress bar and the summary say what the log lines would: warnings only, unless -v.
    quiet = getattr(args, "quiet", False) or (args.command == "run" and sys.stderr.isatty() and not args.verbose)
    quiet = quiet or (args.command == "curate" and not args.verbose)  # it prints what it did
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "manifest":
            return _build(args)
        if args.command == "report":
            from unclip_batch.report import write_report

            try:
                output = _stores(args, args.output).location(args.output)
            except ValueError as exc:
                raise SetupError(f"report: {exc}") from exc
            print(write_report(output, _stores(args, args.output)))
            return 0
        if args.command == "validate":
            return _validate(args)
        if args.command == "curate":
            return _curate(args)
        config = config_from_args(args)
        from unclip_batch.job import run_job

        summary = run_job(config)
    except SetupError as exc:  # a ConfigError too; any other ValueError is a bug, not the user's
        print(f"unclip-batch: error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except StorageUnavailable as exc:
        print(f"unclip-batch: job stopped: object storage unavailable: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except JobFailed as exc:
        print(
            f"unclip-batch: job stopped: {exc}. The rows finished so far are saved: once the cause is fixed, "
            "the same command resumes after them",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as errors.Interrupted
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"unclip-batch: interrupted ({signal.Signals(signum).name}): {getattr(exc, 'saved', 0)} rows saved "
            "by this run; rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + signum  # the shell's convention for a process ended by a signal
    print(format_summary(summary))
    if summary["rows"]["failed"] and not args.allow_failures:
        return EXIT_ROWS_FAILED
    return 0


def _build(args) -> int:
    from unclip_batch.build import build

    table = build(
        args.sources,
        args.output,
        templates=args.template,
        num_images=args.num_images,
        seed=args.seed,
        stores=_stores(args, *args.sources, args.output),
    )
    print(f"{args.output}: {table.num_rows} rows, columns {', '.join(table.column_names)}")
    print(f"check it with: unclip-batch validate {args.output}")
    return 0


def _validate(args) -> int:
    from unclip_batch.manifest import SizeRule, UnknownWords, read_manifests, validate
    from unclip_batch.models import describe_model

    stores = _stores(args, *args.manifests)
    spec, info = describe_model(args.model, stores)
    table = read_manifests(args.manifests, stores)
    size = SizeRule.of(info)
    good, bad, codes, words = 0, [], Counter(), UnknownWords(info.vocabulary)
    for rows, errors in validate(table, info.defaults, size):
        words.check(rows)
        errors += missing_local_sources(rows)
        good += len(rows) - len({e["row"] for e in errors if e["stage"] == "load"})
        codes.update(e["code"] for e in errors)
        bad.extend(errors[: max(0, args.show - len(bad))])
    total_bad = sum(codes.values())
    print(f"{table.num_rows} rows: {good} valid, {total_bad} invalid")
    for code, n in sorted(codes.items()):
        print(f"  {code}: {n}")
    for e in bad:
        print(f"  row {e['row']} id={e['id']!r}: [{e['code']}] {e['message']}")
    if words.rows:  # a warning: these rows are valid, and run
        print(f"warning: {words.message(spec.spec)}")
    return EXIT_ROWS_FAILED if total_bad else 0


def missing_local_sources(rows) -> list[dict]:
    """Records for valid rows whose image or mask is a local file that is not there, as the job would
    record them (image_unreadable); remote sources are left to the job, which retries storage."""
    from unclip_batch import storage

    records = []
    for row in rows:
        for what in ("image", "mask"):
            url = getattr(row, what)
            path = storage.local_path(url) if url else None
            if path is not None and not os.path.exists(path):
                records.append(
                    {
                        "id": row.id,
                        "task": row.task,
                        "stage": "load",
                        "code": "image_unreadable",
                        "message": f"{what} {url} does not exist",
                        "row": row.row,
                    }
                )
                break
    return records


def format_summary(summary: dict) -> str:
    rows = summary["rows"]
    lines = [
        f"unclip-batch: {summary['status']} in {summary['wall_s']:.1f}s -> {summary['output']}",
        f"  manifest rows   {rows['manifest']:>8}",
        f"  done earlier    {rows['done_before']:>8}",
        f"  succeeded       {rows['succeeded']:>8}  ({summary['images']} images, "
        f"{summary['images_per_s'] or 0:.2f} images/s)",
        f"  failed          {rows['failed']:>8}",
    ]
    lines += [f"    {code:<22}{n:>6}" for code, n in summary["errors_by_code"].items()]
    warm_up = summary["warm_up"]
    if warm_up["compile"] != "off":
        lines.append(
            f"  compiled ({warm_up['compile']}): {warm_up['calls']} first calls of a shape took "
            f"{warm_up['s']:.1f}s, compiling included"
        )
    errors = f" (errors: {summary['output'].rstrip('/')}/errors/)" if rows["total_failed"] else ""
    lines.append(f"  all runs: {rows['total_succeeded']} succeeded, {rows['total_failed']} failed{errors}")
    skipped = rows.get("skipped_errors", 0)
    if skipped:
        lines.append(
            f"  {skipped} rows recorded as errors by earlier runs were skipped: fix them in the manifest "
            "and rerun with --retry-errors to redo them"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
