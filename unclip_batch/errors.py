"""The two levels of failure: setup errors stop a job before any work; row errors become records.

Row error codes are part of the public contract (users filter ``errors/*.parquet`` by them): add new
codes freely, never rename one.
"""

from __future__ import annotations

from typing import Any


class SetupError(Exception):
    """A problem with the job as a whole (manifest, output, model, storage): raised before any compute."""


class ConfigError(SetupError, ValueError):
    """The job's options contradict each other or are out of range (JobConfig's checks)."""


class ManifestError(SetupError):
    """The manifest cannot be used at all: unreadable, no ``id`` column, a column of the wrong type."""


class JobFailed(Exception):
    """The job stopped part-way for a reason that is not any row's fault; rerunning it resumes."""


class RowsFailed(Exception):
    """The job completed, every row accounted for, but some rows are error records (the CLI's exit 4);
    ``summary`` says how many, by code. ``run(..., allow_failures=True)`` returns instead."""

    def __init__(self, summary: Any) -> None:
        self.summary = summary
        super().__init__(
            f"{summary.failed} rows failed ({', '.join(f'{c}: {n}' for c, n in summary.errors_by_code.items())}); "
            f"their records are in {summary.output}/errors/"
        )


class StorageUnavailable(JobFailed):
    """Object storage kept failing past the retry window (an outage, not a missing object)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the job saves the rows it finished and stops. A KeyboardInterrupt, so no
    ``except Exception`` swallows it and a caller's ``except KeyboardInterrupt`` sees SIGTERM too."""

    def __init__(self, signum: int, saved: int = 0):
        super().__init__(signum, saved)
        self.signum, self.saved = signum, saved


def caused_by(exc: BaseException, kind: type) -> BaseException | None:
    """The innermost exception of ``kind`` in a chain. Ray wraps a task's error in a RayTaskError that is
    also an instance of the error's class, whose message is the whole remote traceback: the innermost
    one is the error as our code raised it."""
    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            found = exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found


def storage_outage(exc: BaseException) -> StorageUnavailable | None:
    """The storage outage behind ``exc`` as our own error, whose message is the one line our code wrote
    (Ray's wrapper's message is the whole remote traceback); None if storage is not why it failed."""
    outage = caused_by(exc, StorageUnavailable)
    return None if outage is None else StorageUnavailable(str(outage))


class RowError(ValueError):
    """One manifest row cannot be done; the job records it and goes on."""

    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise KeyError(f"unregistered error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


# code -> when it happens; STAGES says in which stage: validate (in the read tasks, before compute), load
# (reading sources), predict (the model), write (encoding images). docs/errors.md is generated from both.
CODES = {
    "invalid_id": "id is missing, too long, or has characters outside [A-Za-z0-9._-] (or starts with '.')",
    "duplicate_id": "an earlier row of the manifests has the same id, compared ignoring case; only the first is run",
    "unknown_task": "task is not one of generate, variation, inpaint, interpolate, text_diff",
    "missing_prompt": "generate and inpaint need a non-empty prompt; text_diff both a prompt and a source_prompt",
    "prompt_too_long": "prompt or negative_prompt is longer than the limit",
    "invalid_value": "a field has the wrong type, is not a whole number where one is needed, or is NaN",
    "invalid_num_images": "num_images is outside 1-16",
    "invalid_seed": "seed is negative or too large",
    "unsupported_size": "width/height is not a multiple the model supports, or is too small or too large",
    "invalid_steps": "num_inference_steps is outside 1-1000, or prior_num_inference_steps outside 2-1000",
    "invalid_guidance": "guidance_scale or prior_guidance_scale is outside 0-100",
    "invalid_best_of": "best_of is outside 1-16, or above 1 on a row without a prompt to rank candidates by, or "
    "on an interpolate row (its frames share one noise)",
    "missing_image": "variation, inpaint and text_diff need an image",
    "missing_source": "interpolate needs two ends: image or prompt, and image2 or prompt2",
    "ambiguous_source": "an interpolate end is given both as an image and as a prompt",
    "unused_column": "image2, prompt2, source_prompt, a mask or a negative_prompt given to a task that does not use "
    "them (negative_prompt: generate and inpaint only)",
    "invalid_strength": "text_diff's strength or variation_strength is outside 0-1",
    "unexpected_image": "image or mask is given for a task that does not use it",
    "source_not_allowed": "the image or mask names a protocol rows may not use (only local paths, s3/gs/az and "
    "http(s)), a local file from a manifest that is not local, or a link-local or cloud-metadata host",
    "image_unreadable": "the image or mask could not be read (missing object, no access, unreachable)",
    "image_invalid": "the image or mask is not a decodable image (empty, truncated, not an image)",
    "image_too_small": "the image or mask is smaller than 8 px on a side",
    "image_too_large": "the image or mask has more pixels than the limit (decompression bomb guard)",
    "missing_mask": "inpaint needs a mask, or an RGBA image whose transparent pixels mark the area",
    "mask_size_mismatch": "the mask's size differs from the image's",
    "mask_empty": "the mask marks nothing to repaint (all black, or no transparent pixel)",
    "invalid_prompt": "prompt has control characters or U+FFFD (text decoded with the wrong encoding)",
    "model_error": "the model raised on this row, also when run alone",
    "write_failed": "an image could not be encoded for writing",
    "preprocess_failed": "the Python processor's preprocess function raised on this row",
}


STAGES = {code: "validate" for code in CODES} | {
    "source_not_allowed": "validate, load",
    "image_unreadable": "load",
    "image_invalid": "load",
    "image_too_small": "load",
    "image_too_large": "load",
    "missing_mask": "load",
    "mask_size_mismatch": "load",
    "mask_empty": "load",
    "model_error": "predict",
    "write_failed": "write",
    "preprocess_failed": "preprocess",
}
