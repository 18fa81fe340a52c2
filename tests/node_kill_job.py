"""Run by test_faults.py in its own process: a 3-node Ray cluster on this machine (ray.cluster_utils),
a job on it, and the worker node that hosts the model actor killed mid-job.

    python tests/node_kill_job.py MANIFEST OUTPUT STEPS PRIOR_STEPS
"""

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

from unclip_batch.config import JobConfig
from unclip_batch.job import run_job


def main(manifest: str, output: str, steps: str, prior_steps: str) -> None:
    # The head only drives. Its GCS declares a silent node dead after 2 missed health checks 1 s apart
    # (Ray's defaults: 5, 3 s apart): the same path, sooner (the suite's time).
    quick = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": quick})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    killed = []

    def kill_the_model_node():
        images = Path(output) / "images"
        while not killed:
            if images.exists() and len(list(images.rglob("*.png"))) >= 6:
                for node in nodes:  # the node whose raylet started the model actor's process
                    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
                    if any("UnclipPredictor" in " ".join(p.cmdline()) + p.name() for p in raylet.children(True)):
                        cluster.remove_node(node, allow_graceful=False)
                        killed.append(node.unique_id)
                        return
            time.sleep(0.2)

    threading.Thread(target=kill_the_model_node, daemon=True).start()
    config = JobConfig(
        manifests=(manifest,),
        output=output,
        model="tiny",
        batch_size=4,
        device="cpu",
        defaults={"num_inference_steps": int(steps), "prior_num_inference_steps": int(prior_steps)},
    )
    summary = run_job(config)
    report = Path(output).parent / "node_kill_report.json"  # stdout carries Ray's worker logs too
    report.write_text(json.dumps({"killed": killed, "summary": summary}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
