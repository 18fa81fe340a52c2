"""Ray job entry point: the same arguments as ``unclip-batch run``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_job.py s3://bucket/manifests/ --output s3://bucket/out/run1

Inside a Ray job, RAY_ADDRESS points at the cluster, so the pipeline joins it instead of starting a
local Ray. With ``--working-dir .`` Ray ships this repository to every node; the dependencies must be
in the cluster's image or in the runtime_env (see jobs/runtime_env.yaml).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from unclip_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
