import os

# No machine of ours reaches a model hub: every load must come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
from helpers import make_sources


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: starting Ray costs seconds, jobs reuse it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level="WARNING", include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from seaweedfs import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def sources(tmp_path) -> Path:
    """A folder with source images and masks, referenced by manifests relative to it."""
    return make_sources(tmp_path / "job")
