"""The Ray wiring (pipeline.py) apart from Ray itself: where the model actors go, which addresses it joins."""

import pytest
from helpers import job

from unclip_batch.errors import SetupError


def test_placement_uses_gpus_only_when_there_and_wanted():
    from unclip_batch.pipeline import Placement, placement

    gpus = {"CPU": 32.0, "GPU": 4.0}
    assert placement(job(["m"], "o", device="auto"), gpus) == Placement("cuda", 4, 1.0, None)
    assert placement(job(["m"], "o", device="auto", workers=2), gpus) == Placement("cuda", 2, 1.0, None)
    assert placement(job(["m"], "o", device="cpu"), gpus).device == "cpu"  # GPUs there, CPU asked for
    cpus = {"CPU": 2.0}
    assert placement(job(["m"], "o", device="auto"), cpus) == Placement("cpu", 1, 0.5, 2)
    assert placement(job(["m"], "o", device="auto", workers=2), cpus) == Placement("cpu", 2, 0.25, 1)
    assert placement(job(["m"], "o", device="cpu", cpus_per_worker=1.5), {"CPU": 16.0}).worker_cpus == 1.5
    with pytest.raises(SetupError, match="no GPU"):
        placement(job(["m"], "o", device="cuda"), cpus)


def test_a_ray_client_address_is_refused_and_others_pass(monkeypatch):
    from unclip_batch.pipeline import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None and ray_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) == "10.0.0.1:6379"
    with pytest.raises(SetupError, match="ray job submit --address http://head:8265"):
        ray_address("ray://head:10001")
