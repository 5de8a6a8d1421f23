"""A node daemon's chunk-cache stats in its prewarm polls: a real ``PrewarmAgent`` over a real
``ChunkCache`` (hits, misses, a damaged entry) polling a real ``imgaccel serve``, which keeps
them with the node (``GET /api/v1/prewarm/nodes``); an agent given no stats sends none; the
poll API refuses malformed stats and the OpenAPI document describes them. (The agent's
assignments are exercised end to end by tests/test_prewarm.py, with whole node daemons.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.snapshotter.config import PrewarmAgentConfig
from imgaccel.snapshotter.prewarm_agent import PrewarmAgent, chunk_cache_stats
from tests.service import ServiceProcess, make_service

pytestmark = pytest.mark.timeout(60)
API_TOKEN = "agent-stats-api-token-0123"
NODE_TOKEN = "agent-stats-node-token-0123"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = make_service(tmp_path_factory.mktemp("agent-stats"), {
        "reconcile_interval": 0, "rules": [{"repository": "none", "enabled": False}],
        "api_auth": {"token": {"value": API_TOKEN}},
        "prewarm": {"node_token": {"value": NODE_TOKEN}, "node_poll_seconds": 0.2},
    }, token=API_TOKEN).start()  # fmt: skip
    try:
        yield service
    finally:
        service.stop()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _never(*args: object) -> Any:
    raise AssertionError("no assignment was expected")


async def node_record(service: ServiceProcess, name: str, until: Any) -> dict[str, Any]:
    """The service's record of node ``name`` once ``until(record)`` holds."""
    deadline = time.monotonic() + 15
    while True:
        status, body = await asyncio.to_thread(service.api, "GET", "/api/v1/prewarm/nodes")
        assert status == 200, body
        record = next((n for n in body["nodes"] if n["name"] == name), None)
        if record is not None and until(record):
            return dict(record)
        assert time.monotonic() < deadline, f"node {name}: {record}; log: {service.log_path.read_text()[-2000:]}"
        await asyncio.sleep(0.1)


def agent_for(service: ServiceProcess, name: str, cache: ChunkCache | None) -> PrewarmAgent:
    config = PrewarmAgentConfig.model_validate({
        "service": service.url, "token": {"value": NODE_TOKEN}, "node_name": name, "labels": {"region": "r1"},
        "poll_seconds": 0.2,
    })  # fmt: skip
    return PrewarmAgent(config, _never, _never, partial(chunk_cache_stats, cache) if cache is not None else None)


async def test_polls_carry_the_chunk_cache_stats(service: ServiceProcess, tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    a, b, bad = os.urandom(70_000), os.urandom(5_000), os.urandom(1_000)
    cache.put(digest(a), a)
    cache.put(digest(b), b)
    damaged = tmp_path / "cache" / "chunks" / digest(bad)[7:9] / digest(bad)[7:]
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(os.urandom(1_000))  # not the bytes its name says
    assert cache.get(digest(a)) == a  # a hit
    assert cache.get(digest(b"never stored")) is None  # a miss
    assert cache.get(digest(bad)) is None  # damaged: dropped, a miss too
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())
    assert on_disk == 75_000

    agent = agent_for(service, "agent-1", cache)
    agent.start()
    try:
        record = await node_record(service, "agent-1", lambda r: r["chunk_cache"] is not None)
        assert record["chunk_cache"] == {"cached_bytes": 75_000, "hits": 1, "misses": 2}
        assert record["labels"]["region"] == "r1"
        assert cache.get(digest(b)) == b  # a second hit, reported by a later poll
        c = os.urandom(3_000)
        cache.put(digest(c), c)
        record = await node_record(service, "agent-1", lambda r: r["chunk_cache"]["hits"] == 2)
        assert record["chunk_cache"] == {"cached_bytes": 78_000, "hits": 2, "misses": 2}
        assert agent.last_error is None and agent.polls >= 2
    finally:
        await agent.close()

    quiet = agent_for(service, "agent-2", None)  # given no stats: sends none (the field left out)
    quiet.start()
    try:
        record = await node_record(service, "agent-2", lambda r: True)
        assert record["chunk_cache"] is None and quiet.last_error is None
    finally:
        await quiet.close()


def test_malformed_stats_are_refused_and_the_schema_names_them(service: ServiceProcess) -> None:
    poll = "/api/v1/prewarm/nodes/n-bad/poll"
    for stats, where in (
        ({"cached_bytes": -1, "hits": 0, "misses": 0}, "chunk_cache.cached_bytes"),
        ({"cached_bytes": 1, "hits": 0}, "chunk_cache.misses"),
        ({"cached_bytes": 1, "hits": 0, "misses": 0, "ratio": 1}, "chunk_cache.ratio"),
        ({"cached_bytes": "lots", "hits": 0, "misses": 0}, "chunk_cache.cached_bytes"),
    ):
        status, body = service.api("POST", poll, {"labels": {}, "chunk_cache": stats}, NODE_TOKEN)
        assert status == 400 and body["error"].startswith(where), (stats, body)
    status, body = service.api("POST", poll, {"labels": {}, "chunk_cache": None}, NODE_TOKEN)
    assert status == 200, body  # null: no stats
    status, spec = service.api("GET", "/openapi.json")
    assert status == 200
    schemas = spec["components"]["schemas"]
    assert set(schemas["NodeCacheStats"]["properties"]) == {"cached_bytes", "hits", "misses"}
    assert schemas["NodeCacheStats"]["additionalProperties"] is False
    assert "NodeCacheStats" in str(schemas["NodePoll"]["properties"]["chunk_cache"])
