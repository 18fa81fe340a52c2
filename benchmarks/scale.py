"""Scale: the same null-model job at growing row counts; memory and time per row must stay flat.

    python benchmarks/scale.py --rows 1000 10000 100000            # one fresh job per size (webdataset)
    python benchmarks/scale.py --rows 100000 --resume-from 0.99      # + resume a 99%-done job

Each size runs ``unclip-batch run --model null`` in its own process on a PartiPrompts manifest (local
disk), while a sampler records the peak RSS of the driver (and its private part, USS: without the object
store's shared pages it maps, until the job has written ``_SUCCESS``; to the process's exit apart) and of
every Ray worker process (RSS, and USS every 2.5 s), and how much
of the driver's RSS is object-store pages (every 10 s). With
``--resume-from F`` the job first runs the first F of the rows (``--limit``), then the whole manifest
again on the same output, timing how long the resume takes to store its first new image.
Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import prompts  # noqa: E402  (same PartiPrompts manifest as the ceiling benchmark)


class PeakMemory:
    """Samples the RSS of a process tree and of Ray's worker processes, keeping each one's peak."""

    def __init__(self, root_pid: int, output: Path, every_s: float = 0.5):
        self.root, self.every, self.peaks, self._stop = root_pid, every_s, {}, threading.Event()
        self.private, self.samples, self.shm = {}, 0, 0
        self.started, self.trace, self.shards = time.perf_counter(), [], output  # the driver every 10 s
        # The driver's private memory is counted until the job has written its _SUCCESS (a new one: a resumed
        # job's output has the last run's until it starts). After it, the job only stops Ray: as Ray's processes
        # exit, the pages of libraries and of the object store that the driver shared with them become its own
        # alone, and its USS jumps with nothing new held (+34 MB in the last second of a 100,000-row job, RSS
        # unchanged). That moment is kept apart, as the peak to exit.
        self.success, self.exit_private = _mtime(output / "_SUCCESS"), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def _run(self):
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                for p in [root, *root.children(recursive=True)]:
                    try:
                        name = "driver" if p.pid == self.root else " ".join(p.cmdline()[:3])[:60]
                        self.peaks[(p.pid, name)] = max(self.peaks.get((p.pid, name), 0), p.memory_info().rss)
                        # Private pages (USS), without the object store's shared ones a process maps: every
                        # sample for the driver, every 5th for workers (reading them costs CPU).
                        if p.pid == self.root or self.samples % 5 == 0:
                            private = p.memory_full_info().uss
                            if p.pid == self.root:
                                self.exit_private = max(self.exit_private, private)
                                if _mtime(self.shards / "_SUCCESS") not in (None, self.success):
                                    continue  # the job is done: Ray is stopping (see __init__)
                            self.private[name] = max(self.private.get(name, 0), private)
                        if p.pid == self.root and self.samples % 20 == 0:
                            self.shm = max(self.shm, _shm_rss(p.pid))
                            self.trace.append(self._sample(p))
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.samples += 1
            self._stop.wait(self.every)

    def _sample(self, driver: psutil.Process) -> dict:
        shards = self.shards / "shards"
        return {
            "s": round(time.perf_counter() - self.started),
            "shards": len(os.listdir(shards)) if shards.is_dir() else None,
            "rss_mb": driver.memory_info().rss >> 20,
            "uss_mb": driver.memory_full_info().uss >> 20,
        }

    def report(self) -> dict:
        driver = max((v for (pid, n), v in self.peaks.items() if n == "driver"), default=0)
        workers = sorted((v, n) for (pid, n), v in self.peaks.items() if "ray::" in n or "default_worker" in n)
        private = sorted((v, n) for n, v in self.private.items() if n != "driver")
        return {
            "driver_peak_mb": round(driver / 2**20),
            "driver_peak_private_mb": round(self.private.get("driver", 0) / 2**20),
            "driver_peak_private_to_exit_mb": round(self.exit_private / 2**20),
            "driver_peak_object_store_mb": round(self.shm / 2**20),
            "worker_peak_mb": round(workers[-1][0] / 2**20) if workers else 0,
            "worker_peak_name": workers[-1][1].strip() if workers else None,
            "worker_peak_private_mb": round(private[-1][0] / 2**20) if private else 0,
            "worker_peak_private_name": private[-1][1].strip() if private else None,
            "workers_seen": len(workers),
        }


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _shm_rss(pid: int) -> int:
    """Bytes of the object store (Ray's /dev/shm file) resident in a process: pages it has touched there,
    shared with every process of the node, counted in its RSS but not held by it."""
    total, in_shm = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    in_shm = "/dev/shm/" in line
                elif in_shm and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:  # the process has ended
        return 0
    return total


def run(
    manifest: Path,
    output: Path,
    format: str,
    limit: int | None = None,
    first_key: Path | None = None,
    trace: Path | None = None,
) -> dict:
    command = [
        sys.executable,
        "-m",
        "unclip_batch.cli",
        "run",
        str(manifest),
        "--output",
        str(output),
        "--model",
        "null",
        "--batch-size",
        "64",
        "--quiet",
        "--format",
        format,
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    first = None
    with PeakMemory(process.pid, output) as memory:
        while process.poll() is None:
            if first_key is not None and first is None and first_key.exists():
                first = time.perf_counter() - started
            time.sleep(0.05)
    out, err = process.communicate()
    if trace is not None:
        trace.write_text("".join(f"{json.dumps(sample)}\n" for sample in memory.trace))
    if process.returncode != 0:
        raise SystemExit(f"run failed:\n{err[-3000:]}")
    summary = json.loads((output / "_SUCCESS").read_text())
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "job_s": summary["wall_s"],
        "images": summary["images"],
        **memory.report(),
        **({"first_new_image_s": round(first, 1) if first else None} if first_key else {}),
    }


def _trace(args, rows: int, part: str) -> Path | None:
    if args.trace is None:
        return None
    args.trace.mkdir(parents=True, exist_ok=True)
    return args.trace / f"{rows}-{part}.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--resume-from", type=float, help="also resume a job this much done (0.99)")
    parser.add_argument("--format", default="webdataset", choices=["files", "webdataset", "parquet"])
    parser.add_argument("--trace", type=Path, help="write the driver's RSS and USS every 10 s here, a file per run")
    args = parser.parse_args()
    texts = prompts()
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "m.parquet"
            pq.write_table(
                pa.table(
                    {"id": [f"p{i:07d}" for i in range(rows)], "prompt": [texts[i % len(texts)] for i in range(rows)]}
                ),
                manifest,
            )
            output = Path(tmp) / "out"
            result = {"rows": rows}
            if args.resume_from:
                done = int(rows * args.resume_from)
                result["first_part"] = run(manifest, output, args.format, limit=done, trace=_trace(args, rows, "first"))
                # The first new image: in files format its PNG; in the shard formats, its shard's part.
                shard = f"{done // 1000:05d}"
                first_new = (
                    output / "images" / f"p{done:07d}" / "0.png"
                    if args.format == "files"
                    else output / "_parts" / shard / "0.parquet"
                )
                result["resume"] = run(
                    manifest, output, args.format, first_key=first_new, trace=_trace(args, rows, "resume")
                )
            else:
                result.update(run(manifest, output, args.format, trace=_trace(args, rows, "job")))
                result["ms_per_row"] = round(1000 * result["job_s"] / rows, 3)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
