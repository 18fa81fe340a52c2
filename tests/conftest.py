import os

# No machine of ours reaches a model hub: every load must come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
from PIL import ImageDraw

from helpers import box_mask, scene


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
    folder = tmp_path / "job"
    (folder / "img").mkdir(parents=True)
    scene().save(folder / "img" / "scene.png")
    scene((30, 160, 60), (240, 220, 40)).save(folder / "img" / "scene2.png")
    box_mask().save(folder / "img" / "mask.png")
    box_mask(box=(0, 0, 20, 63)).save(folder / "img" / "mask2.png")
    rgba = scene().convert("RGBA")
    ImageDraw.Draw(rgba).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 0))
    rgba.save(folder / "img" / "hole.png")
    return folder
