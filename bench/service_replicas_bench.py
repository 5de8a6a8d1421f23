"""Event intake of three ``imgaccel serve`` replicas sharing PostgreSQL, next to one replica on SQLite.

    .venv/bin/python -m bench.service_replicas_bench [--events 8000] [--concurrency 16] [--no-fsync]
                                                      [--client lean|aiohttp] [--only postgres|sqlite]
                                                      [--profile DIR]

What is measured: ``POST /events`` as a registry sends it (distribution format, one manifest
push per request, a bearer token), each event for a new image digest, so every request
writes a new job to the store before its 202 (checked afterwards: as many new jobs as
events). 16 concurrent clients, each with keep-alive connections; with PostgreSQL each request
goes to the next of the three replicas in turn, as a load balancer would spread them; with
SQLite all go to the one replica. Printed: events/s, p50/p99/max latency per request, the peak
RSS of each replica process, and the CPU time per event of the replicas, PostgreSQL and the
load generator (targets for the three replicas: >= 1500 events/s, p99 <= 30 ms).

What runs meanwhile: each replica has one worker. The events name a registry that is
configured and accepts TCP connections but never answers, so each worker claims one job and
then waits on it for the whole run: jobs are really created and claimed, but no conversion
competes with intake for the CPU (a busy service converts at the same time; its conversions
run in child processes and take their share of the cores). A warm-up of ``--warmup`` events,
not measured, comes first (connections, prepared statements, the workers' first claim).

Everything shares this machine's cores: the load generator, the replicas, and a PostgreSQL of
its own (``tests.postgres``) with fsync on, as a production server commits (``--no-fsync``:
off). The load generator is by default a minimal HTTP/1.1 client (``--client lean``, ~0.12 ms
of CPU per request here); aiohttp's client (``--client aiohttp``) takes ~0.3 ms per request,
CPU the replicas then do not get. ``--profile DIR`` runs the replicas under cProfile (wall
clock) and writes one .prof per replica there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import ROOT
from tests.postgres import PASSWORD, Postgres, missing, start_postgres
from tests.service import ServiceProcess, make_service

TOKEN = "bench"
HEADERS = {"Content-Type": "application/vnd.docker.distribution.events.v1+json", "Authorization": f"Bearer {TOKEN}"}


@dataclass
class Result:
    store: str
    replicas: int
    events: int
    seconds: float
    latencies: list[float]
    peak_rss: list[int]  # bytes, per replica
    jobs: int  # in the store afterwards
    cpu: dict[str, float]  # CPU seconds of the measured part: replicas, PostgreSQL, the bench client

    def row(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rss = ", ".join(f"{r / 2**20:.0f}" for r in self.peak_rss)
        return (f"| {self.store:<24} | {self.replicas:>8} | {self.events:>6} | {self.events / self.seconds:>8.0f} | "
                f"{1000 * statistics.median(lat):>6.1f} | {1000 * p99:>6.1f} | {1000 * lat[-1]:>6.1f} | "
                f"{self.jobs:>6} | {rss:<14} |")  # fmt: skip


HEADER = (
    "| store                    | replicas | events | events/s | p50 ms | p99 ms | max ms |   jobs | peak RSS MiB   |\n"
    "|--------------------------|----------|--------|----------|--------|--------|--------|--------|----------------|"
)


def event(i: int, registry: str) -> bytes:
    target = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": f"sha256:{i:064x}",
        "repository": f"bench/repo{i % 50}",
        "tag": f"t{i}",
    }
    return json.dumps({"events": [{"action": "push", "target": target, "request": {"host": registry}}]}).encode()


async def post_events(
    urls: list[str], first: int, n: int, concurrency: int, registry: str, client: str = "aiohttp"
) -> tuple[float, list[float]]:
    """``n`` events (numbers ``first`` ..) from ``concurrency`` clients, round robin over ``urls``."""
    if client == "lean":
        return await post_events_lean(urls, first, n, concurrency, registry)
    latencies: list[float] = []
    numbers = iter(range(first, first + n))
    turn = itertools.count()

    async def client(session: aiohttp.ClientSession) -> None:
        for i in numbers:
            url = urls[next(turn) % len(urls)]
            body = event(i, registry)
            t = time.perf_counter()
            async with session.post(url, data=body, headers=HEADERS) as resp:
                await resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


async def post_events_lean(
    urls: list[str], first: int, n: int, concurrency: int, registry: str
) -> tuple[float, list[float]]:
    """As ``post_events`` with a minimal HTTP/1.1 keep-alive client (one connection per client
    and replica), so that the load generator, which shares the cores with what it measures,
    takes less of them than aiohttp's client does."""
    latencies: list[float] = []
    numbers = iter(range(first, first + n))
    turn = itertools.count()
    hosts = [url.split("/")[2] for url in urls]
    heads = [
        (f"POST /{url.split('/', 3)[3]} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {HEADERS['Content-Type']}\r\n"
         f"Authorization: {HEADERS['Authorization']}\r\nContent-Length: ").encode()
        for url, host in zip(urls, hosts, strict=True)
    ]  # fmt: skip

    async def client() -> None:
        conns = []
        try:
            for host in hosts:
                name, _, port = host.rpartition(":")
                conns.append(await asyncio.open_connection(name, int(port)))
            for i in numbers:
                k = next(turn) % len(urls)
                reader, writer = conns[k]
                body = event(i, registry)
                t = time.perf_counter()
                writer.write(b"%s%d\r\n\r\n%s" % (heads[k], len(body), body))
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                answer = await reader.readexactly(length)
                if status != 202:
                    raise RuntimeError(f"{urls[k]}: {status} {answer[:300]!r}")
                latencies.append(time.perf_counter() - t)
        finally:
            for _, writer in conns:
                writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (those that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids(pg: Postgres | None) -> list[int]:
    """The postmaster and its children (backends, WAL writer, ...)."""
    if pg is None:
        return []
    master = int((pg.data / "postmaster.pid").read_text().split()[0])
    out = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def peak_rss(svc: ServiceProcess) -> int:
    assert svc.process is not None
    for line in Path(f"/proc/{svc.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class ProfiledService(ServiceProcess):
    """``imgaccel serve`` under cProfile (the profile is written when it stops on SIGINT)."""

    prof: Path | None = None

    def start(self) -> ProfiledService:
        assert self.prof is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - the service process writes it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(self.prof), "-m", "imgaccel.cli.main", "serve",
             "--config", str(self.config_path)], stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"service did not start: {self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run(
    store: str, work: Path, replicas: int, config: dict[str, Any], args: argparse.Namespace, registry: str,
    count_jobs: Any, pg: Postgres | None = None,
) -> Result:  # fmt: skip
    services: list[ServiceProcess] = []
    try:
        for i in range(replicas):
            svc = make_service(work / f"{store}-{i}", config)
            if args.profile:
                profiled = ProfiledService(svc.config_path, svc.port, svc.token, svc.log_path)
                profiled.prof = Path(args.profile).resolve() / f"{store}-{i}.prof"
                svc = profiled
            services.append(svc)
            svc.start()
        urls = [f"{s.url}/events" for s in services]
        asyncio.run(post_events(urls, 0, args.warmup, args.concurrency, registry, args.client))
        time.sleep(1)  # the workers' first claims are made
        pids = [s.process.pid for s in services if s.process is not None]
        db = postgres_pids(pg)
        before = cpu_seconds(pids), cpu_seconds(db), time.process_time()
        seconds, latencies = asyncio.run(
            post_events(urls, args.warmup, args.events, args.concurrency, registry, args.client)
        )
        after = cpu_seconds(pids), cpu_seconds(postgres_pids(pg)), time.process_time()
        rss = [peak_rss(s) for s in services]
    finally:
        for s in services:
            s.stop()
    cpu = {"replicas": after[0] - before[0], "PostgreSQL": after[1] - before[1], "client": after[2] - before[2]}
    return Result(store, replicas, args.events, seconds, latencies, rss, count_jobs() - args.warmup, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=8000)
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (not durable)")
    ap.add_argument("--profile", metavar="DIR", help="run the replicas under cProfile, write DIR/<store>-<i>.prof")
    ap.add_argument("--only", choices=["postgres", "sqlite"], help="run one of the two")
    ap.add_argument("--client", choices=["lean", "aiohttp"], default="lean",
                    help="the load generator's HTTP client (default: a minimal keep-alive client)")  # fmt: skip
    args = ap.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if why := missing():
        sys.exit(f"cannot run PostgreSQL here: {why}")
    work = Path(tempfile.mkdtemp(prefix="imgaccel-replicabench-"))
    # The registry the events name: configured, accepts connections (the kernel's backlog) and
    # never answers, so a worker that takes a job waits on it and converts nothing.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    registry = f"127.0.0.1:{silent.getsockname()[1]}"
    base = {
        "workers": 1,
        "registries": [{"endpoint": registry}],
        "events_auth": {"token": {"value": TOKEN}},
        "retry": {"attempts": 1, "request_attempts": 1},
        "reconcile_interval": 0,
        "cache_repo": None,
    }
    results = []
    pg: Postgres | None = None
    try:
        if args.only in (None, "postgres"):
            pg = start_postgres(work / "pg", durable=not args.no_fsync)
            config = {**base, "store": {"url": pg.url, "password": {"value": PASSWORD}}}
            label = f"PostgreSQL (fsync {'off' if args.no_fsync else 'on'})"
            db = pg

            def count_pg() -> int:
                return int(db.psql("SELECT count(*) FROM jobs").strip())

            results.append(run("postgres", work, 3, config, args, registry, count_pg, pg))
            pg.remove()
            pg = None
            results[-1].store = label
        if args.only in (None, "sqlite"):

            def count_sqlite() -> int:
                with sqlite3.connect(work / "sqlite-0" / "data" / "jobs.sqlite") as conn:
                    return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])

            results.append(run("sqlite", work, 1, base, args, registry, count_sqlite))
            results[-1].store = "SQLite"
    finally:
        if pg is not None:
            pg.remove()
        silent.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"POST /events, {args.concurrency} concurrent clients, one new image per event "
          f"(after {args.warmup} warm-up events); machine: {len(os.sched_getaffinity(0))} cores")  # fmt: skip
    print(HEADER)
    for r in results:
        print(r.row())
    print("CPU per event (ms; all on the same cores, the clock is the measured part):")
    for r in results:
        parts = ", ".join(f"{k} {1000 * v / r.events:.2f}" for k, v in r.cpu.items())
        print(f"  {r.store}: {parts}; total {1000 * sum(r.cpu.values()) / r.events:.2f} "
              f"= {sum(r.cpu.values()) / r.seconds:.2f} cores busy")  # fmt: skip
    for r in results:
        assert r.jobs == r.events, f"{r.store}: {r.jobs} jobs for {r.events} events"
    pgr = next((r for r in results if r.store.startswith("PostgreSQL")), None)
    if pgr is not None:
        lat = sorted(pgr.latencies)
        rate, p99 = pgr.events / pgr.seconds, 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        verdict = "met" if rate >= 1500 and p99 <= 30 else "MISSED"
        print(f"target (3 replicas on PostgreSQL): >= 1500 events/s, p99 <= 30 ms: {verdict} "
              f"({rate:.0f} events/s, p99 {p99:.1f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
