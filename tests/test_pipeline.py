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


@pytest.mark.slow
def test_the_driver_forgets_ray_datas_per_block_stats_as_the_job_goes(ray_local, tmp_path, monkeypatch):
    """ray-project/ray#66016: Ray Data keeps a statistics object per output block in the driver until the
    execution ends, so the driver would grow with the rows done. The job drops them as it goes; this
    fails once the Ray Data internals it reaches into are gone (then the driver grows again)."""
    from helpers import write_manifest

    from unclip_batch import pipeline
    from unclip_batch.job import run_job

    dropped, forget = [], pipeline.forget_block_stats
    monkeypatch.setattr(pipeline, "FORGET_STATS_EVERY", 3)
    monkeypatch.setattr(pipeline, "forget_block_stats", lambda dataset: dropped.append(forget(dataset)))
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "a red circle"} for i in range(24)])
    summary = run_job(job([manifest], tmp_path / "out", model="null", batch_size=1, rows_per_shard=8))
    assert summary["rows"]["succeeded"] == 24
    # 24 rows in blocks of 4 (CALLS_PER_BLOCK calls of one image): 6 reports, a clearing after the 3rd and
    # 6th; each drops what the three operators (read, model, write: no sources to load) output since the
    # last (they run ahead of the driver).
    assert len(dropped) == 2 and dropped[0] >= 3 and sum(dropped) >= 3 * 6 - 3, dropped


@pytest.mark.slow
def test_sources_load_in_a_stage_of_their_own_only_where_a_row_has_one(ray_local, tmp_path):
    """A job with a variation row loads sources in tasks of their own, never inside the model actor, even
    where both ask for the same CPUs (Ray Data would fuse them, and the model would wait on storage); a job
    whose rows all generate has no source stage. The read and its split into a block per model block run as
    one task on an I/O slot, not a whole CPU, and apart from the model too. The operators as Ray Data runs
    them, fused where it fuses (this also fails once the plan internals _a_block_per_row sets move)."""
    from helpers import write_manifest
    from ray.data._internal.logical.optimizers import get_execution_plan

    from unclip_batch import pipeline, plan
    from unclip_batch.manifest import SizeRule, manifest_files
    from unclip_batch.storage import Location, Stores

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red circle"}])
    config = job([manifest], tmp_path / "out", model="null", cpus_per_worker=pipeline.IO_TASK_CPUS)
    shards = plan.plan_shards(manifest_files((str(manifest),), None), 1000)
    work = plan.Work(
        output=Location(str(tmp_path / "out")),
        stores=Stores(None),
        defaults={},
        size=SizeRule(64, 8, 1024),
        batch_size=4,
    )

    def operators(tasks):
        dataset = pipeline._dataset(config, shards, work, tasks)
        op, found = get_execution_plan(dataset._logical_plan)[0].dag, []
        while op is not None:
            found.append((op.name, op._ray_remote_args.get("num_cpus") if hasattr(op, "_ray_remote_args") else None))
            op = op.input_dependencies[0] if op.input_dependencies else None
        return found[::-1][1:]  # past the input

    read = ("MapBatches(read_stage)->StreamingRepartition[num_rows_per_block=1,strict=False]", pipeline.IO_TASK_CPUS)
    load = ("MapBatches(load_sources)", pipeline.IO_TASK_CPUS)
    model = ("MapBatches(UnclipPredictorOnBlocks)", pipeline.IO_TASK_CPUS)
    write = ("MapBatches(write_stage)", pipeline.IO_TASK_CPUS)
    assert operators(("generate", "variation")) == [read, load, model, write]
    assert operators(("generate",)) == [read, model, write]


@pytest.mark.slow
def test_the_read_waits_for_the_model_when_it_is_far_enough_ahead(ray_local, tmp_path):
    """A fast read and a slow model: Ray Data alone lets the read run ahead through everything (its blocks
    are small; the same test without the bound saw it 9 blocks ahead of this model, in a clean-clone CI run
    on 2 cores), and the driver holds each queued block; bound_read_ahead holds it 2 blocks ahead. This
    also fails once the Ray Data internals it reaches into (the policy hook, operator metrics) move."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    )

    from unclip_batch.backpressure import bound_read_ahead

    def _read(batch: dict, log: str) -> dict:  # defined here: the workers get it by value, not by module
        with open(log, "a") as f:
            f.write("r\n")
        return batch

    class _Model:
        def __init__(self, log: str):
            self.log, self.taken = log, 0

        def __call__(self, batch: dict) -> dict:
            import time

            self.taken += 1
            with open(self.log) as f:
                batch["ahead"] = [sum(1 for _ in f) - self.taken] * len(batch["id"])
            time.sleep(0.4)
            return batch

    context, log = DataContext.get_current(), str(tmp_path / "reads")
    open(log, "w").close()
    bound_read_ahead(context, read="_read", model="_Model", blocks=2)
    try:
        # Other CPU asks than the model's, as the job's read has: Ray Data then does not fuse the two.
        ds = ray.data.range(16, override_num_blocks=16)
        ds = ds.map_batches(_read, fn_kwargs={"log": log}, batch_size=None, num_cpus=0.5)
        ds = ds.map_batches(
            _Model,
            fn_constructor_kwargs={"log": log},
            compute=ActorPoolStrategy(size=1),
            batch_size=None,
            num_cpus=0.25,
        )
        ahead = max(row["ahead"] for row in ds.iter_rows())
    finally:
        context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES)
    assert ahead <= 2 + 1, ahead  # the bound (running reads counted), and the model's file count lagging one
