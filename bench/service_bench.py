"""Event intake throughput and push-to-tag latency of ``imgaccel serve``.

    .venv/bin/python -m bench.service_bench [--events 5000] [--concurrency 16]

1. Intake: POSTs distribution-format manifest-push events, each for a new digest (so every
   one writes a job to SQLite before it is answered), from a client in this process to the
   service process; prints events/s and the p50/p99 request latency (targets: >= 500/s, p99
   <= 20 ms). The events name a registry port nobody listens on, so workers fail fast.
2. Push to tag: a real registry notifies the service; a small image is pushed with skopeo and
   the time from skopeo's exit to the accelerated tag existing is printed next to the job's
   own conversion time (target: <= 2 s plus conversion time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from fixtures.build_images import push, unique_image
from tests.registry import free_port, start_registry
from tests.service import make_service

TOKEN = "bench"


async def intake(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json", "Authorization": f"Bearer {TOKEN}"}
    counter = iter(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            event = {
                "events": [
                    {
                        "action": "push",
                        "target": {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": f"sha256:{i:064x}",
                            "repository": f"bench/repo{i % 50}",
                            "tag": f"t{i}",
                        },
                        "request": {"host": "127.0.0.1:1"},
                    }
                ]
            }
            t = time.perf_counter()
            async with session.post(url, data=json.dumps(event), headers=headers) as resp:
                await resp.read()
                assert resp.status == 202, resp.status
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgaccel-svcbench-"))
    try:
        config = {
            "workers": 1,
            "events_auth": {"token": {"value": TOKEN}},
            "retry": {"attempts": 1, "request_attempts": 1},
            "reconcile_interval": 0,
        }
        svc = make_service(work / "intake", config).start()
        try:
            elapsed, lat = asyncio.run(intake(f"{svc.url}/events", args.events, args.concurrency))
        finally:
            svc.stop()
        lat.sort()
        print(f"intake: {args.events} events in {elapsed:.2f}s = {args.events / elapsed:.0f} events/s "
              f"(target >= 500); latency p50 {1000 * statistics.median(lat):.1f} ms, "
              f"p99 {1000 * lat[int(0.99 * len(lat))]:.1f} ms (target <= 20 ms)")  # fmt: skip

        port = free_port()
        notify = f"""notifications:
  endpoints:
    - {{name: imgaccel, url: "http://127.0.0.1:{port}/events", timeout: 2s, threshold: 3, backoff: 1s}}
"""
        reg = start_registry(work / "registry", notify)
        svc = make_service(work / "push", {"registries": [{"endpoint": reg.host}], "reconcile_interval": 0}, port=port)
        svc.start()
        try:
            layout = unique_image(work, "bench-push")
            for attempt in range(3):
                tag = f"v{attempt}"
                push(layout, "v1", f"{reg.host}/bench/app:{tag}")
                pushed = time.perf_counter()
                while f"{tag}_accelerated" not in reg.tags("bench/app"):
                    time.sleep(0.01)
                seen = time.perf_counter() - pushed
                job = next(j for j in svc.jobs("bench/app") if tag in j["tags"])
                conv = (job["finished_at"] or 0) - (job["started_at"] or 0)
                print(f"push -> {tag}_accelerated visible: {seen:.2f}s (the job itself ran {conv:.2f}s; "
                      f"overhead {seen - conv:.2f}s, target <= 2 s)")  # fmt: skip
        finally:
            svc.stop()
            reg.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
