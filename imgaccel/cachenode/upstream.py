"""The configured upstream registries, each reached through one ``RegistryClient`` with the node's
own credentials: which one a request means (``?ns=`` or the only one), whole blobs copied into a
store writer (resumed with Range after a dropped connection), byte ranges read in bounded pieces,
referrers passed through, and pull-access probes made with a client's credentials."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

import aiohttp

from imgaccel.cachenode.config import CacheNodeConfig, UpstreamConfig
from imgaccel.cachenode.store import VerifyError, Writer
from imgaccel.formats.oci import ACCEPT_MANIFESTS
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import MAX_MANIFEST_SIZE, RETRY_STATUSES, RegistryClient, RetryPolicy
from imgaccel.pusher.errors import AuthError, RegistryError
from imgaccel.pusher.reference import show

PIECE = 4 << 20  # at most this many bytes of a range held in memory per upstream request part
BATCH_BYTES = 8 << 20  # pieces asked for in one multi-range request, together at most this much
BATCH_RANGES = 64
PROBE_RETRY = RetryPolicy(attempts=2, base_delay=0.2)
# Upstream answers retried by the cache node itself: not a 429, which is answered to the client
# with its Retry-After, so whoever asked (a prewarm task, a node) slows down instead of waiting
# unaware while the registry throttles.
RELAYED_RETRY = RetryPolicy(statuses=RETRY_STATUSES - {429})
_DROPPED = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
Probe = Literal["authenticated", "open", "unauthorized", "forbidden"]
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


class UnknownUpstream(LookupError):
    """A request names no configured upstream; the message says what to do."""


@dataclass
class Referrers:
    body: bytes
    content_type: str
    filters_applied: str | None


class Upstream:
    def __init__(
        self, config: UpstreamConfig, credentials: Credentials | None, on_bytes: Callable[[int], None]
    ) -> None:
        self.config = config
        self.host = config.host
        self.on_bytes = on_bytes  # bytes received from upstream (metrics)
        self.client = _client(config, credentials, config.max_connections)

    async def copy_blob(self, repo: str, digest: str, sink: Writer, notify: Callable[[], None]) -> None:
        """Stream the whole blob into ``sink`` (resumed with Range after a dropped connection;
        restarted when the registry answers a resume with the whole blob); ``notify`` after
        each block. A body longer or shorter than ``sink.size`` fails (``VerifyError``)."""
        what = f"{self.host}/{repo}@{digest}"
        retry = self.client.retry
        for attempt in range(retry.attempts):
            headers = {"Range": f"bytes={sink.written}-"} if sink.written else {}
            try:
                async with self.client.request(
                    "GET", f"/v2/{repo}/blobs/{digest}", scope=self.client.pull_scope(repo), what=what,
                    headers=headers, ok=(200, 206), redirects=True,
                ) as resp:  # fmt: skip
                    got = resp.headers.get("Content-Range", "")
                    if resp.status == 200 and sink.written:
                        sink.restart()
                        notify()
                    elif resp.status == 206 and not got.startswith(f"bytes {sink.written}-"):
                        raise RegistryError(f"{what}: resumed at byte {sink.written}, answered {show(got)}")
                    async for block in resp.content.iter_chunked(1 << 20):
                        sink.write(block)
                        self.on_bytes(len(block))
                        notify()
                if sink.written < sink.size:  # the body ended cleanly: the blob is shorter
                    raise VerifyError(f"{what}: the registry sent {sink.written} bytes, {sink.size} expected")
                return
            except _DROPPED as e:
                if attempt + 1 >= retry.attempts:
                    raise RegistryError(f"{what}: download failed after {sink.written} bytes: {e}") from e
                await asyncio.sleep(retry.delay(attempt))

    async def read_spans(self, repo: str, digest: str, spans: list[tuple[int, int]]) -> AsyncGenerator[bytes, None]:
        """The bytes of ``spans`` in order, as pieces of at most ``PIECE`` bytes (unverified:
        the client checks its chunks). Small neighbouring pieces share one multi-range request."""
        pieces = [(p, min(p + PIECE, end)) for start, end in spans for p in range(start, end, PIECE)]
        batch: list[tuple[int, int]] = []
        for piece in [*pieces, None]:
            if batch and (
                piece is None
                or len(batch) >= BATCH_RANGES
                or sum(e - s for s, e in batch) + piece[1] - piece[0] > BATCH_BYTES
                or any(s < piece[1] and piece[0] < e for s, e in batch)
            ):
                for data in await self.client.fetch_ranges(repo, digest, batch):
                    self.on_bytes(len(data))
                    yield data
                batch = []
            if piece is not None:
                batch.append(piece)

    async def referrers(self, repo: str, digest: str, artifact_type: str | None) -> Referrers:
        """The registry's referrers answer, as is (``NotFoundError`` when it has no referrers
        API: clients then read the ``<alg>-<hex>`` tag, which is served like any tag)."""
        path = f"/v2/{repo}/referrers/{digest}"
        if artifact_type is not None and _MEDIA_TYPE.fullmatch(artifact_type):
            path += "?" + urlencode({"artifactType": artifact_type})
        what = f"{self.host}/{repo} referrers of {digest}"
        async with self.client.request("GET", path, scope=self.client.pull_scope(repo), what=what) as resp:
            body = await resp.content.read(MAX_MANIFEST_SIZE + 1)
            while len(body) <= MAX_MANIFEST_SIZE and (more := await resp.content.read(MAX_MANIFEST_SIZE + 1)):
                body += more
            if len(body) > MAX_MANIFEST_SIZE:
                raise RegistryError(f"{what}: more than {MAX_MANIFEST_SIZE} bytes")
            return Referrers(body, resp.headers.get("Content-Type", "application/json"),
                             resp.headers.get("OCI-Filters-Applied"))  # fmt: skip

    async def probe(self, credentials: Credentials | None, repo: str, kind: str, reference: str) -> Probe:
        """Whether ``credentials`` (None: anonymous) may pull ``repo``: a HEAD of the manifest or
        blob at hand with them, through the registry's own auth flow (basic, or a bearer token
        for ``repository:<repo>:pull``). "authenticated": the registry asked for credentials and
        took these (also when the object itself is missing); "open": it answered without asking
        for any, so it checked none; "unauthorized" (401) or "forbidden" (403). Any other
        failure raises ``RegistryError``."""
        path = f"/v2/{repo}/{'blobs' if kind == 'blobs' else 'manifests'}/{reference}"
        headers = {} if kind == "blobs" else {"Accept": ACCEPT_MANIFESTS}
        async with _client(self.config, credentials, 1, PROBE_RETRY, 30.0) as client:
            try:
                async with client.request(
                    "HEAD", path, scope=client.pull_scope(repo), what=f"{self.host}/{repo}", headers=headers,
                    ok=(200, 404), redirects=kind == "blobs",
                ) as resp:  # fmt: skip
                    first = resp.history[0] if resp.history else resp  # before any redirect to storage
                    presented = "Authorization" in first.request_info.headers
            except AuthError as e:
                return "forbidden" if e.status == 403 else "unauthorized"
        return "authenticated" if presented else "open"


class Upstreams:
    def __init__(self, config: CacheNodeConfig, on_bytes: Callable[[int], None]) -> None:
        self.all = [Upstream(u, u.credentials(config.docker_config), on_bytes) for u in config.upstreams]
        self._by_name = {name.lower(): u for u in self.all for name in {u.config.host, u.config.target}}

    async def start(self) -> None:
        for u in self.all:
            await u.client.__aenter__()

    async def close(self) -> None:
        for u in self.all:
            await u.client.close()

    def choose(self, ns: str | None) -> Upstream:
        """The upstream ``ns`` names (containerd's mirror query parameter), or the only one."""
        if ns is None:
            if len(self.all) == 1:
                return self.all[0]
            raise UnknownUpstream("several upstream registries are configured: name one with ?ns=<registry host>")
        found = self._by_name.get(ns.lower())
        if found is None:
            raise UnknownUpstream(f"registry {show(ns)} is not an upstream of this cache node")
        return found


def _client(
    config: UpstreamConfig,
    credentials: Credentials | None,
    max_connections: int,
    retry: RetryPolicy | None = None,
    timeout: float = 300.0,
) -> RegistryClient:
    """A client that uses exactly ``credentials`` (None: none at all, not the Docker config's).
    A 429 is not waited out here: it goes back to the client (``RELAYED_RETRY``)."""
    return RegistryClient(
        config.target, plain_http=config.use_plain_http(), credentials=credentials, docker_config=False,
        retry=retry or RELAYED_RETRY, max_connections=max_connections, timeout=timeout,
    )  # fmt: skip
