"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path  # filesystem storage
    process: subprocess.Popen[bytes]

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def tags(self, repo: str) -> list[str]:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/{repo}/tags/list") as r:
                import json

                return list(json.load(r).get("tags") or [])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(workdir: Path, extra_config: str = "", port: int | None = None) -> Registry:
    """Start (or restart, with the same ``workdir`` and ``port``) a registry on 127.0.0.1."""
    if shutil.which("docker-registry") is None:
        raise RuntimeError("docker-registry is not installed (scripts/install installs it)")
    port = port or free_port()
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  cache:
    blobdescriptor: ""
http:
  addr: 127.0.0.1:{port}
{extra_config}"""
    )
    log = open(workdir / "registry.log", "ab")  # noqa: SIM115 - the registry process writes it
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=log,
        stderr=log,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1).close()
            break
        except urllib.error.HTTPError as e:
            if e.code == 401:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"registry did not start: {(workdir / 'registry.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return Registry(host, root, proc)
