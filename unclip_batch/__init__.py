"""unclip-batch: DALL-E 2 style (unCLIP) generation, variations and inpainting over Parquet manifests on Ray.

The Python API (``unclip_batch.api``, imported on first use so that ``import unclip_batch`` stays light):
``run`` (the job as a function), ``build_processor`` and ``ProcessorConfig`` (the model stage for a Ray Data
pipeline of your own), ``Summary`` and the exceptions a job raises.
"""

from __future__ import annotations

__version__ = "0.1.0"
# The public names of the Python API (unclip_batch.api's __all__ is this list).
API = ["run", "Summary", "curate", "ProcessorConfig", "build_processor", "Processor"]
API += ["SetupError", "StorageUnavailable", "JobFailed", "RowsFailed"]
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    if name in API:
        from unclip_batch import api

        return getattr(api, name)
    raise AttributeError(f"module 'unclip_batch' has no attribute {name!r}")
