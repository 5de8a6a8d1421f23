"""Run ``imgaccel serve`` as a real process for tests, and a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.helpers import ROOT
from tests.registry import free_port
from tests.threaded_app import ThreadedApp


@dataclass
class ServiceProcess:
    config_path: Path
    port: int
    token: str | None
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the service process writes it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgaccel.cli.main", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"service did not start: {self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, method: str, path: str, body: Any = None, token: str | None = "default") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        tok = self.token if token == "default" else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def jobs(self, repository: str | None = None) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/api/v1/jobs?limit=500" + (f"&repository={repository}" if repository else ""))
        assert status == 200, body
        return list(body["jobs"])

    def wait_job(self, predicate: Any, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job in self.jobs():
                if predicate(job):
                    return job
            time.sleep(0.2)
        raise AssertionError(f"no job matched in {timeout}s: {self.jobs()}; log: {self.log_path.read_text()[-3000:]}")


def write_service_config(workdir: Path, port: int, config: dict[str, Any]) -> Path:
    base = {"listen": f"127.0.0.1:{port}", "data_dir": str(workdir / "data"), "workers": 2}
    path = workdir / "imgaccel.yaml"
    path.write_text(yaml.safe_dump({**base, **config}))
    return path


def make_service(
    workdir: Path, config: dict[str, Any], token: str | None = None, port: int | None = None
) -> ServiceProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    return ServiceProcess(write_service_config(workdir, port, config), port, token, workdir / "service.log")


def wait_for(predicate: Any, timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records requests; answers ``statuses`` in turn (then 200)."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    port: int = 0
    _server: ThreadedApp = field(init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.requests.append((dict(request.headers), await request.read(), status))
        return web.Response(status=status, text="ok" if status == 200 else "nope")

    def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._server = ThreadedApp(app)
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
