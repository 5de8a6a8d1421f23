"""The cache node's HTTP server (aiohttp): the read side of the OCI distribution API plus
``/healthz`` and ``/metrics``.

``GET``/``HEAD`` of ``/v2/``, ``/v2/<name>/manifests/<tag or digest>``,
``/v2/<name>/blobs/<digest>`` (with ``Range``, and ``Imgaccel-Chunks``: see ``chunk_reads``)
and ``/v2/<name>/referrers/<digest>``. The
upstream is the one ``?ns=<registry host>`` names (containerd's mirror convention), or the only
one configured. Every name, tag and digest passes the strict checks of
``imgaccel.pusher.reference`` before it is used; every read passes ``Access`` first; errors are
answered as distribution does (``{"errors": [{"code", "message"}]}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from imgaccel.cachenode.access import REALM, Access, Denied, Grant
from imgaccel.cachenode.chunk_reads import ChunkReads
from imgaccel.cachenode.config import CacheNodeConfig
from imgaccel.cachenode.fills import Fill, Fills
from imgaccel.cachenode.metrics import Metrics
from imgaccel.cachenode.pullthrough import PullThrough
from imgaccel.cachenode.ranges import Unsatisfiable, parse_range
from imgaccel.cachenode.responses import abort, file_pieces, send_spans, send_whole
from imgaccel.cachenode.store import Store, StoreError, VerifyError
from imgaccel.cachenode.upstream import UnknownUpstream, Upstream, Upstreams
from imgaccel.formats.cache_chunks import CHUNKS_HEADER, MAX_HEADER_BYTES, CacheChunk, parse_chunks
from imgaccel.pusher.errors import NotFoundError, RegistryError
from imgaccel.pusher.reference import ReferenceError, check_digest, check_reference, check_repository

log = logging.getLogger(__name__)

_ROUTE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)")
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Request header fields may be this long (name and value): an Imgaccel-Chunks header listing
# MAX_CHUNKS entries must fit (aiohttp's default is 8190 bytes).
MAX_FIELD_SIZE = len(CHUNKS_HEADER) + 2 + MAX_HEADER_BYTES
_STARTED = web.RequestKey("started", web.StreamResponse)  # the response whose status line is out


class StartError(Exception):
    """The cache node cannot start (data directory, listen address); one line."""


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class CacheNode:
    def __init__(self, config: CacheNodeConfig) -> None:
        self.config = config
        self.metrics = Metrics(
            lambda: (self.store.total, len(self.store), self.store.chunk_count(), self.store.max_size)
        )
        self.store = Store(config.data_dir, config.max_size, on_evict=self.metrics.evicted)
        self.upstreams = Upstreams(config, on_bytes=self.metrics.upstream_bytes.inc)
        self.access = Access([t.get() for t in config.cluster_tokens], config.auth_ttl, self.metrics)
        self.fills = Fills(self.store, self.metrics, config.fill_concurrency)
        self.pull = PullThrough(self.store, self.metrics, config.manifest_ttl)
        self.chunk_reads = ChunkReads(self.store, self.metrics)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], handler_args={"max_field_size": MAX_FIELD_SIZE})
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/v2", self._dispatch)
        app.router.add_route("*", "/v2/{tail:.*}", self._dispatch)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        app.on_response_prepare.append(_api_version)
        return app

    async def _start(self, app: web.Application) -> None:
        await self.upstreams.start()

    async def _stop(self, app: web.Application) -> None:
        await self.fills.close()
        await self.upstreams.close()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # -- routing and errors ---------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, "UNSUPPORTED", "this cache node is read-only", {"Allow": "GET, HEAD"})
        tail = request.match_info.get("tail", "")
        auth = request.headers.get("Authorization")
        ns = request.query.get("ns")
        if tail == "":
            upstream = None if ns is None and len(self.upstreams.all) > 1 else self.upstreams.choose(ns)
            await self.access.check(auth, upstream, None, "", "")
            return web.json_response({})
        m = _ROUTE.fullmatch(tail)
        if m is None:
            raise HttpError(404, "UNSUPPORTED", "not a manifest, blob or referrers path")
        repo = _valid(check_repository, m["name"], "NAME_INVALID")
        kind, ref = m["kind"], m["ref"]
        ref = _valid(check_reference if kind == "manifests" else check_digest, ref,
                     "TAG_INVALID" if kind == "manifests" and ":" not in ref else "DIGEST_INVALID")  # fmt: skip
        upstream = self.upstreams.choose(ns)
        grant = await self.access.check(auth, upstream, repo, "blobs" if kind == "blobs" else "manifests", ref)
        if kind == "manifests":
            return await self._manifest(request, upstream, repo, ref, grant)
        if kind == "blobs":
            return await self._blob(request, upstream, repo, ref, grant)
        return await self._referrers(request, upstream, repo, ref)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as e:
            started: web.StreamResponse | None = request.get(_STARTED)
            if started is None:
                return _answer(request, e)
            if not isinstance(e, ConnectionError):  # not just the client hanging up
                log.warning("%s %s: failed mid-body: %s", request.method, request.path, e)
            abort(request)  # a status line is out: the client sees a cut body, never a wrong one
            return started

    # -- manifests and referrers ----------------------------------------------------------

    async def _manifest(self, request: web.Request, upstream: Upstream, repo: str, ref: str,
                        grant: Grant) -> web.StreamResponse:  # fmt: skip
        answer = await self.pull.manifest(upstream, repo, ref, check_link=not grant.every_repository)
        headers = {"Content-Type": answer.media_type, "Docker-Content-Digest": answer.digest,
                   "Content-Length": str(len(answer.data)), "ETag": f'"{answer.digest}"'}  # fmt: skip
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.metrics.served.labels("cache" if answer.cached else "upstream").inc(len(answer.data))
        return web.Response(body=answer.data, headers=headers)

    async def _referrers(self, request: web.Request, upstream: Upstream, repo: str, digest: str) -> web.Response:
        found = await upstream.referrers(repo, digest, request.query.get("artifactType"))
        headers = {"Content-Type": found.content_type}
        if found.filters_applied:
            headers["OCI-Filters-Applied"] = found.filters_applied
        return web.Response(body=b"" if request.method == "HEAD" else found.body, headers=headers)

    # -- blobs ----------------------------------------------------------------------------

    async def _blob(self, request: web.Request, upstream: Upstream, repo: str, digest: str,
                    grant: Grant) -> web.StreamResponse:  # fmt: skip
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes", "ETag": f'"{digest}"',
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if self.store.has("blobs", digest):
            if not grant.every_repository:
                await self.pull.check_link(upstream, repo, "blobs", digest)
            opened = self.store.open("blobs", digest)
            if opened is not None:
                self.metrics.lookups.labels("blob", "hit").inc()
                return await self._stored(request, headers, digest, *opened)
        self.metrics.lookups.labels("blob", "miss").inc()
        size = await self.pull.blob_size(upstream, repo, digest)
        opened = self.store.open("blobs", digest)  # stored meanwhile?
        if opened is not None:
            return await self._stored(request, headers, digest, *opened)
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        spans = self._spans(request, size)
        listed = self._listed(request, size)
        served = self.metrics.served.labels("upstream").inc
        if spans is not None and listed is not None:  # chunk-aware: never a whole-blob fill
            return await self._chunked(request, headers, upstream, repo, digest, size, spans, listed)
        if spans is None:
            fill = self.fills.get(upstream, repo, digest, size, urgent=True)
            assert fill is not None
            # The first bytes (or the fill's failure) before the status line goes out: an upstream
            # refusal, a 429 above all, is then answered as such rather than as a cut 200.
            await fill.wait(0)
            if fill.error is not None and fill.written == 0 and isinstance(fill.error, Exception):
                raise fill.error
            fd = fill.reader()
            try:
                resp, _ = await send_whole(request, headers, fd, size, digest, _follow(fill), served)
            finally:
                os.close(fd)
            return resp
        self.fills.get(upstream, repo, digest, size, urgent=False)  # the whole blob, in the background
        return await send_spans(request, headers, spans, size, upstream.read_spans(repo, digest, spans), served)

    async def _stored(self, request: web.Request, headers: dict[str, str], digest: str, fd: int,
                      size: int) -> web.StreamResponse:  # fmt: skip
        try:
            if request.method == "HEAD":
                return web.Response(headers={**headers, "Content-Length": str(size)})
            spans = self._spans(request, size)
            self._listed(request, size)  # checked, not needed: the whole blob serves every range
            served = self.metrics.served.labels("cache").inc
            if spans is not None:
                return await send_spans(request, headers, spans, size, file_pieces(fd, spans), served)
            resp, ok = await send_whole(request, headers, fd, size, digest, None, served)
            if not ok:
                log.warning("store: blob %s is damaged on disk; dropped (the client saw a cut connection)", digest)
                self.store.remove("blobs", digest)
            return resp
        finally:
            os.close(fd)

    async def _chunked(self, request: web.Request, headers: dict[str, str], upstream: Upstream, repo: str,
                       digest: str, size: int, spans: list[tuple[int, int]],
                       listed: list[CacheChunk]) -> web.StreamResponse:  # fmt: skip
        """Spans of a blob not stored whole, with the chunks the client listed (``chunk_reads``)."""
        read = self.chunk_reads.plan(upstream, repo, digest, spans, listed)
        try:
            async with contextlib.aclosing(read.pieces()) as pieces:
                return await send_spans(request, headers, spans, size, pieces, lambda n: None)  # counted per source
        finally:
            read.close()

    @staticmethod
    def _listed(request: web.Request, size: int) -> list[CacheChunk] | None:
        value = request.headers.get(CHUNKS_HEADER)
        if value is None:
            return None
        try:
            return parse_chunks(value, size)
        except ValueError as e:
            raise HttpError(400, "RANGE_INVALID", str(e)) from None

    @staticmethod
    def _spans(request: web.Request, size: int) -> list[tuple[int, int]] | None:
        try:
            return parse_range(request.headers.get("Range"), size)
        except Unsatisfiable as e:
            raise HttpError(416, "RANGE_INVALID", str(e), {"Content-Range": f"bytes */{size}"}) from None


def _answer(request: web.Request, e: Exception) -> web.Response:
    """The error answer for ``e`` raised before a response was started."""
    if isinstance(e, HttpError):
        return _error(e.status, e.code, str(e), e.headers)
    if isinstance(e, Denied):
        challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'} if e.status == 401 else {}
        return _error(e.status, "UNAUTHORIZED" if e.status == 401 else "DENIED", str(e), challenge)
    if isinstance(e, UnknownUpstream):
        return _error(404, "NAME_UNKNOWN", str(e))
    if isinstance(e, RegistryError) and e.status == 429:
        wait = max(1, round(e.retry_after)) if e.retry_after is not None else 1
        log.info("%s %s: upstream answered 429; passed on (Retry-After %d)", request.method, request.path, wait)
        return _error(429, "TOOMANYREQUESTS", f"upstream: {' '.join(str(e).split())[:300]}",
                      {"Retry-After": str(wait)})  # fmt: skip
    if isinstance(e, NotFoundError):
        return _error(404, "BLOB_UNKNOWN" if "/blobs/" in request.path else "MANIFEST_UNKNOWN", str(e))
    if isinstance(e, RegistryError | VerifyError | aiohttp.ClientError | TimeoutError):
        log.warning("%s %s: upstream failure: %s", request.method, request.path, e)
        return _error(502, "UNKNOWN", f"upstream: {' '.join(str(e).split())[:300]}")
    if isinstance(e, OSError):
        log.error("%s %s: %s", request.method, request.path, e)
        return _error(500, "UNKNOWN", f"cache node: {e.strerror or e}")
    raise e


def _follow(fill: Fill) -> Callable[[int], Awaitable[int]]:
    async def ready(pos: int) -> int:
        await fill.wait(pos)
        if fill.error is not None:
            raise fill.error
        return fill.written

    return ready


def _valid(check: Callable[[object, str | None], str], value: str, code: str) -> str:
    try:
        return check(value, None)
    except ReferenceError as e:
        raise HttpError(400, code, str(e)) from None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"errors": [{"code": code, "message": message}]}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


async def _api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION)
    request[_STARTED] = response


def serve(config: CacheNodeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; ``on_ready`` gets the URL once listening. ``StartError``."""
    try:
        node = CacheNode(config)
    except (StoreError, ValueError) as e:  # the data directory; an unreadable Docker config file
        raise StartError(str(e)) from None
    asyncio.run(_run(node, on_ready))


async def _run(node: CacheNode, on_ready: Callable[[str], None] | None) -> None:
    host, port = node.config.host_port
    runner = web.AppRunner(node.app(), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            raise StartError(f"listen {node.config.listen}: {e.strerror or e}") from None
        bound = runner.addresses[0]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        log.info("cache node listening on %s, store %s", url, node.config.data_dir)
        if on_ready:
            on_ready(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
