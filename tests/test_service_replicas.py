"""Three ``imgaccel serve`` replicas sharing one PostgreSQL (issue 12), real parts only.

A real PostgreSQL cluster (``tests.postgres``), two real registries (``notify`` sends its
notifications, ``quiet`` sends none), a ``FaultProxy`` that holds downloads from ``quiet`` to a
slow rate (so a conversion can be caught running), a webhook receiver, and a round-robin HTTP
proxy that the ``notify`` registry's notifications (and the tests' own event POSTs) go
through: it hands each request to the next replica in turn, skipping one that is down, as a
load balancer would.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from fixtures.build_images import Layout, Member, push, tar_bytes
from tests.fault_proxy import FaultProxy
from tests.helpers import ROOT, run_cli
from tests.postgres import PASSWORD, Postgres, missing, start_postgres
from tests.registry import Registry, free_port, start_registry
from tests.service import ServiceProcess, WebhookReceiver, make_service, wait_for
from tests.threaded_app import ThreadedApp

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "PostgreSQL runs here")

TOKEN = "replica-events-secret"
LEASE = 3  # seconds: a dead replica's job runs again this soon
SLOW_RATE = 4_000_000  # bytes/s of blob downloads through the slow proxy
# The layer of "slow" images: ~4.7 s to download at SLOW_RATE, and large enough for byte progress
# to show mid-download (a conversion child reports downloaded bytes in 8 MiB steps).
SLOW_SIZE = 18 << 20
EVENT_TYPE = "application/vnd.docker.distribution.events.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


# -- the round-robin proxy ---------------------------------------------------------------------


@dataclass
class RoundRobin:
    """A real aiohttp server on 127.0.0.1 that forwards each request to the next backend in
    turn; a backend that refuses the connection is skipped (the next one gets the request)."""

    backends: list[str]  # http://127.0.0.1:PORT
    port: int = 0
    forwarded: list[tuple[int, bytes, int]] = field(default_factory=list)  # (backend, body, status)
    _turn: Iterator[int] = field(default_factory=itertools.count)
    _server: ThreadedApp = field(init=False)
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        first = next(self._turn)
        for k in range(len(self.backends)):
            i = (first + k) % len(self.backends)
            try:
                async with self._session.request(
                    request.method, self.backends[i] + request.path_qs, data=body, headers=headers
                ) as up:
                    data = await up.read()
                    self.forwarded.append((i, body, up.status))
                    return web.Response(status=up.status, body=data, content_type=up.content_type)
            except aiohttp.ClientConnectionError:
                continue  # that replica is down: the next one
        return web.Response(status=502, text="no replica answered")

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def start(self) -> RoundRobin:
        app = web.Application(client_max_size=1 << 22)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_cleanup.append(self._close)
        self._server = ThreadedApp(app)
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


# -- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    pg: Postgres
    notify: Registry  # notifies the round-robin proxy
    quiet: Registry  # no notifications: the tests post the events themselves
    slow: FaultProxy  # quiet's blobs at SLOW_RATE
    hook: WebhookReceiver
    proxy: RoundRobin
    replicas: list[ServiceProcess]
    work: Path

    def sql(self, query: str) -> str:
        return self.pg.psql(query).strip()

    def post_event(self, body: dict[str, Any], url: str | None = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"{url or self.proxy.url}/events", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": EVENT_TYPE, "Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, dict(json.loads(raw))
        except (ValueError, TypeError):
            return status, {"raw": raw.decode(errors="replace")}

    def job(self, job_id: str, via: ServiceProcess | None = None) -> dict[str, Any]:
        for svc in [via] if via else self.alive():
            status, body = svc.api("GET", f"/api/v1/jobs/{job_id}")
            if status == 200:
                return dict(body)
        raise AssertionError(f"job {job_id}: no replica answered")

    def alive(self) -> list[ServiceProcess]:
        return [s for s in self.replicas if s.process is not None and s.process.poll() is None]

    def runner_of(self, timeout: float = 30) -> ServiceProcess:
        """The replica with a conversion child process (the one running the only job)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [s for s in self.alive() if _children(s)]
            if len(running) == 1:
                return running[0]
            time.sleep(0.05)
        raise AssertionError("no single replica runs a conversion")

    def logs(self) -> str:
        return "\n".join(f"--- replica {i}:\n{s.log_path.read_text()[-2500:]}" for i, s in enumerate(self.replicas))


def _children(svc: ServiceProcess) -> list[int]:
    """Pids of the replica's child processes (a job converts in one)."""
    assert svc.process is not None
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == svc.process.pid:
            out.append(int(stat.parent.name))
    return out


def replica_config(pg: Postgres, registries: list[str], hook_url: str, workers: int = 2) -> dict[str, Any]:
    return {
        "workers": workers,
        "registries": [{"endpoint": host} for host in registries],
        "rules": [{"repository": "*", "mode": "index"}],
        "cache_repo": None,
        "events_auth": {"token": {"value": TOKEN}},
        "reconcile_interval": 0,
        "retry": {"attempts": 5, "base_delay": 0.5, "max_delay": 2},
        "webhooks": [{"url": hook_url}],
        "store": {"url": pg.url, "password": {"value": PASSWORD}, "lease_seconds": LEASE, "timeout": 5,
                  "pool_max": 5},
    }  # fmt: skip


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def cluster(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("replicas")
    with contextlib.ExitStack() as stack:
        ports = [free_port() for _ in range(3)]
        proxy = RoundRobin([f"http://127.0.0.1:{p}" for p in ports]).start()
        stack.callback(proxy.stop)
        notify = start_registry(work / "notify", f"""notifications:
  events:
    includereferences: true
  endpoints:
    - name: imgaccel
      url: {proxy.url}/events
      headers:
        Authorization: [Bearer {TOKEN}]
      timeout: 5s
      threshold: 3
      backoff: 1s
""")  # fmt: skip
        stack.callback(notify.stop)
        quiet = start_registry(work / "quiet")
        stack.callback(quiet.stop)
        slow = FaultProxy(quiet.host, lambda method, path, n: None, rate=SLOW_RATE).start()
        stack.callback(slow.stop)
        hook = WebhookReceiver().start()
        stack.callback(hook.stop)
        config = replica_config(pg, [notify.host, quiet.host, slow.host], hook.url)
        replicas = [make_service(work / f"replica{i}", config, port=port) for i, port in enumerate(ports)]
        for svc in replicas:
            stack.callback(svc.stop)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(ServiceProcess.start, replicas))
        yield Cluster(pg, notify, quiet, slow, hook, proxy, replicas, work)


# -- images and events ---------------------------------------------------------------------------


def small_image(out: Path, salt: str, size: int = 2048) -> tuple[Path, str]:
    """A one-layer gzip image of its own (``size`` random bytes); (layout, manifest digest)."""
    layout = Layout(out / f"img-{salt}")
    data = random.Random(salt).randbytes(size)
    layer = gzip.compress(tar_bytes([Member("salt.txt", salt.encode()), Member("data.bin", data)]), 1)
    desc = layout.image([(GZIP_LAYER, layer)])
    layout.tag(desc, "v1")
    return layout.root, str(desc["digest"])


def push_event(host: str, repository: str, digest: str, tag: str | None) -> dict[str, Any]:
    target = {"mediaType": OCI_MANIFEST, "digest": digest, "repository": repository, "tag": tag}
    return {"events": [{"action": "push", "target": target, "request": {"host": host}}]}


def manifest_pushes(body: bytes, prefix: str) -> int:
    """How many manifest push events for repositories under ``prefix`` a notification body holds."""
    try:
        events = json.loads(body).get("events", [])
    except (ValueError, AttributeError):
        return 0
    return sum(
        1 for e in events
        if e.get("action") == "push" and e["target"].get("mediaType") == OCI_MANIFEST
        and e["target"].get("repository", "").startswith(prefix) and e["target"].get("tag") == "v1"
    )  # fmt: skip


def hooks_for(hook: WebhookReceiver, prefix: str) -> list[dict[str, Any]]:
    out = []
    for _, body, _ in list(hook.requests):
        payload = json.loads(body)
        if f"/{prefix}" in payload["source"]["reference"]:
            out.append(payload)
    return out


def wait_jobs(
    cluster: Cluster, prefix: str, n: int, state: str = "succeeded", timeout: float = 90
) -> list[dict[str, Any]]:
    def done() -> bool:
        return cluster.sql(f"SELECT count(*) FROM jobs WHERE repository LIKE '{prefix}%' AND state = '{state}'") == str(
            n
        )

    try:
        wait_for(done, timeout=timeout, what=f"{n} {state} jobs under {prefix}")
    except AssertionError:
        rows = cluster.sql(f"SELECT repository, state, body FROM jobs WHERE repository LIKE '{prefix}%'")
        raise AssertionError(f"jobs under {prefix}: {rows[-3000:]}\n{cluster.logs()}") from None
    return [j for j in cluster.replicas[0].jobs() if j["repository"].startswith(prefix)]


# -- tests -------------------------------------------------------------------------------------


def test_duplicated_events_make_one_job_per_image(cluster: Cluster, tmp_path: Path) -> None:
    """100 pushes of 20 images (each pushed 5 times: 5 events), plus 20 event bodies posted
    again by hand, spread over three replicas: 20 jobs, 20 twins, 20 webhooks."""
    images = [small_image(tmp_path, f"dup{i}") for i in range(20)]
    pushes = [
        (layout, f"{cluster.notify.host}/dup/app{i}:v1") for _ in range(5) for i, (layout, _) in enumerate(images)
    ]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: push(p[0], "v1", p[1]), pushes))
    # The registry's own duplicates are delivered; post 20 of them again through the proxy.
    wait_for(lambda: sum(manifest_pushes(b, "dup/") for _, b, _ in list(cluster.proxy.forwarded)) >= 100,
             timeout=60, what="the registry's 100 manifest push events")  # fmt: skip
    again = [b for _, b, _ in list(cluster.proxy.forwarded) if manifest_pushes(b, "dup/")][:20]
    for body in again:
        status, answer = cluster.post_event(json.loads(body))
        assert status == 202 and len(answer["jobs"]) == 1, (status, answer)

    wait_jobs(cluster, "dup/", 20)
    for i in range(20):
        wait_for(lambda i=i: "v1_accelerated" in cluster.notify.tags(f"dup/app{i}"), timeout=30, what=f"twin {i}")
    wait_for(lambda: len({p["job_id"] for p in hooks_for(cluster.hook, "dup/")}) == 20, timeout=30,
             what="20 webhooks")  # fmt: skip
    time.sleep(2)  # a second delivery of any of them would arrive meanwhile

    assert cluster.sql("SELECT count(*) FROM jobs WHERE repository LIKE 'dup/%'") == "20"
    assert cluster.sql("SELECT count(DISTINCT key) FROM jobs WHERE repository LIKE 'dup/%'") == "20"
    ids = set(cluster.sql("SELECT id FROM jobs WHERE repository LIKE 'dup/%'").split())
    for svc in cluster.replicas:  # every replica sees the same 20 jobs
        jobs = [j for j in svc.jobs() if j["repository"].startswith("dup/")]
        assert {j["id"] for j in jobs} == ids
        assert all(j["state"] == "succeeded" and j["tags"] == ["v1"] for j in jobs), jobs
    twins = sum(t.endswith("_accelerated") for i in range(20) for t in cluster.notify.tags(f"dup/app{i}"))
    assert twins == 20
    hooks = hooks_for(cluster.hook, "dup/")
    assert len(hooks) == 20 and {p["job_id"] for p in hooks} == ids
    assert all(p["event"] == "conversion.succeeded" for p in hooks)
    # The events really were spread over the three replicas.
    assert {i for i, b, _ in list(cluster.proxy.forwarded) if manifest_pushes(b, "dup/")} == {0, 1, 2}


def test_sigkill_mid_conversion_resumes_on_another_replica(cluster: Cluster, tmp_path: Path) -> None:
    layout, _ = small_image(tmp_path, "crash", SLOW_SIZE)
    push(layout, "v1", f"{cluster.quiet.host}/crash/app:v1")
    status, job = cluster.replicas[0].api("POST", "/api/v1/jobs", {"reference": f"{cluster.slow.host}/crash/app:v1"})
    assert status == 202, job
    victim = cluster.runner_of()
    wait_for(lambda: cluster.job(job["id"])["progress"].get("bytes_done", 0) > 0, timeout=20, what="download")
    try:
        victim.kill()
        killed_at = time.time()
        assert cluster.job(job["id"])["state"] == "running"
        assert "v1_accelerated" not in cluster.quiet.tags("crash/app")  # no tag on a half-done image

        deadline = time.monotonic() + 60
        while (done := cluster.job(job["id"]))["state"] != "succeeded":
            assert done["state"] in ("queued", "running") and time.monotonic() < deadline, (done, cluster.logs())
            time.sleep(0.2)
        assert done["attempts"] == 2
        assert done["started_at"] >= killed_at + LEASE - 1.5  # taken again only once the lease ran out
        assert done["target"] == f"{cluster.slow.host}/crash/app:v1_accelerated"
        assert "v1_accelerated" in cluster.quiet.tags("crash/app")
        assert run_cli("check", f"{cluster.quiet.host}/crash/app:v1_accelerated").code == 0
        assert cluster.sql(f"SELECT lease_owner IS NULL FROM jobs WHERE id = '{job['id']}'") == "t"
    finally:
        victim.start()  # the cluster has three replicas again


def test_job_watched_through_another_replica(cluster: Cluster, tmp_path: Path) -> None:
    """Server-sent events of a job running on replica A, read through B and C: progress from the
    store, then the final state."""
    layout, _ = small_image(tmp_path, "watch", SLOW_SIZE)
    push(layout, "v1", f"{cluster.quiet.host}/watch/app:v1")
    status, job = cluster.replicas[1].api("POST", "/api/v1/jobs", {"reference": f"{cluster.slow.host}/watch/app:v1"})
    assert status == 202, job
    runner = cluster.runner_of()
    others = [s for s in cluster.replicas if s is not runner]
    streams: dict[int, list[dict[str, Any]]] = {}

    def watch(svc: ServiceProcess) -> None:
        got: list[dict[str, Any]] = []
        with urllib.request.urlopen(f"{svc.url}/api/v1/jobs/{job['id']}/events", timeout=60) as r:
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
        streams[svc.port] = got

    threads = [threading.Thread(target=watch, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for svc in others:
        snaps = streams.get(svc.port)
        assert snaps, f"no stream from {svc.url}"
        assert snaps[-1]["state"] == "succeeded" and snaps[-1]["target"].endswith("/watch/app:v1_accelerated")
        running = [s["progress"].get("bytes_done", 0) for s in snaps if s["state"] == "running"]
        assert any(0 < b < SLOW_SIZE for b in running), running  # progress made on A, read from the store
        assert running == sorted(running)
        assert snaps[-1]["progress"]["bytes_done"] == snaps[-1]["progress"]["bytes_total"] > SLOW_SIZE


def test_database_outage_during_intake(cluster: Cluster, tmp_path: Path) -> None:
    """PostgreSQL down for 10 s while events keep coming: 503 (never a false 202) and /readyz
    503 meanwhile; afterwards every accepted event is a job, none lost or doubled, all finish."""
    images = []
    for i in range(8):
        layout, digest = small_image(tmp_path, f"outage{i}")
        push(layout, "v1", f"{cluster.quiet.host}/outage/img{i}:v1")
        images.append((f"outage/img{i}", digest))
    results: list[tuple[float, float, int, int, dict[str, Any]]] = []  # (sent, answered, image, status, body)
    stop = threading.Event()

    def poster() -> None:
        for i in itertools.cycle(range(len(images))):
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                status, body = cluster.post_event(push_event(cluster.quiet.host, *images[i], "v1"))
            except OSError as e:  # recorded: the assertions below show it
                status, body = 0, {"raw": repr(e)}
            results.append((sent, time.monotonic(), i, status, body))
            time.sleep(0.05)

    thread = threading.Thread(target=poster)
    thread.start()
    try:
        time.sleep(1)
        cluster.pg.stop()
        down = time.monotonic()
        for j in range(2):  # pushed to the notifying registry meanwhile: it retries its events
            layout, _ = small_image(tmp_path, f"outage-pushed{j}")
            push(layout, "v1", f"{cluster.notify.host}/outage/pushed{j}:v1")
        for svc in cluster.replicas:
            status, body = svc.api("GET", "/readyz")
            assert status == 503 and "job store" in body["error"], body
        time.sleep(max(0.0, down + 10 - time.monotonic()))
        up = time.monotonic()
        cluster.pg.start()
        wait_for(lambda: {i for s, _, i, st, _ in list(results) if s > up and st == 202} == set(range(8)),
                 timeout=30, what="every image accepted after the outage")  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
        if not cluster.pg.running():
            cluster.pg.start()

    unexpected = [(st, b) for *_, st, b in results if st not in (202, 503)]
    assert not unexpected, (unexpected[:5], cluster.logs())
    during = [st for s, a, _, st, _ in results if s > down and a < up]
    assert len(during) > 20 and set(during) == {503}, during
    assert all(b["error"].startswith("job store unavailable") for *_, st, b in results if st == 503)
    for svc in cluster.replicas:
        assert svc.api("GET", "/readyz")[0] == 200

    accepted = {job_id for *_, st, b in results if st == 202 for job_id in b["jobs"]}
    jobs = wait_jobs(cluster, "outage/", 10)
    by_repo = {j["repository"]: j for j in jobs}
    assert sorted(by_repo) == sorted([r for r, _ in images] + ["outage/pushed0", "outage/pushed1"])
    assert accepted == {by_repo[r]["id"] for r, _ in images}  # every 202 named the one job of its image
    assert cluster.sql("SELECT count(*) FROM jobs WHERE repository LIKE 'outage/%'") == "10"
    for repo in by_repo:
        registry = cluster.notify if "pushed" in repo else cluster.quiet
        assert "v1_accelerated" in registry.tags(repo)
    assert all(s.process is not None and s.process.poll() is None for s in cluster.replicas)


def test_migrate(pg: Postgres, tmp_path: Path) -> None:
    """``serve --migrate`` creates the schema on an empty database and then finds it up to date;
    with ``migrate: off`` and no schema the service does not start, saying so in one line."""
    url = pg.create_database("migrate_test")
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "data_dir": str(tmp_path / "data"), "reconcile_interval": 0,
              "store": {"url": url, "password": {"env": "IMGACCEL_TEST_PGPASSWORD"}, "migrate": "off"}}  # fmt: skip
    path = tmp_path / "imgaccel.yaml"
    path.write_text(yaml.safe_dump(config))

    def serve(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imgaccel.cli.main", "serve", "--config", str(path), *extra],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "IMGACCEL_TEST_PGPASSWORD": PASSWORD},
        )  # fmt: skip

    r = serve()
    errors = [line for line in r.stderr.splitlines() if not line.startswith("INFO ")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "no imgaccel schema" in errors[0] and "--migrate" in errors[0]
    assert pg.psql("SELECT to_regclass('jobs') IS NULL", database="migrate_test").strip() == "t"

    r = serve("--migrate")
    assert r.returncode == 0 and "version 0 -> 1" in r.stdout, (r.stdout, r.stderr)
    assert pg.psql("SELECT version FROM schema_version", database="migrate_test").split() == ["1"]
    r = serve("--migrate")
    assert r.returncode == 0 and "up to date" in r.stdout, (r.stdout, r.stderr)
    assert pg.psql("SELECT count(*) FROM schema_version", database="migrate_test").strip() == "1"

    svc = make_service(tmp_path / "svc", config, port=port)
    try:
        os.environ["IMGACCEL_TEST_PGPASSWORD"] = PASSWORD
        svc.start()  # migrated: now it starts with migrate: off
        assert svc.api("GET", "/readyz")[0] == 200 and svc.jobs() == []
    finally:
        os.environ.pop("IMGACCEL_TEST_PGPASSWORD", None)
        svc.stop()
