"""``RegistryClient``: the OCI distribution API over one aiohttp session.

Everything imgaccel says to a registry goes through here: manifests (exact bytes in and out,
digests checked), blobs (streamed to disk with the digest checked, resumed with Range after a
dropped connection), Range reads for lazy readers, uploads streamed from files, cross-repository
mounts, tags, and OCI 1.1 referrers with the tag-schema fallback. 429 (``Retry-After``
honoured), 5xx and dropped connections are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from imgaccel import __version__
from imgaccel.formats import oci
from imgaccel.pusher.auth import Challenge, Credentials, load_docker_credentials, parse_challenge
from imgaccel.pusher.errors import AuthError, DigestMismatchError, NotFoundError, RegistryError
from imgaccel.pusher.reference import (
    ImageRef,
    ReferenceError,
    check_digest,
    check_reference,
    check_registry_host,
    check_repository,
    check_tag,
    is_digest,
    is_loopback,
    show,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RETRY_EXCEPTIONS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
MAX_MANIFEST_SIZE = 4 << 20
MAX_ERROR_BODY = 4096  # bytes of an error answer read for its message
_LINK_NEXT = re.compile(r"<([^>]*)>")
USER_AGENT = f"imgaccel/{__version__}"  # the event service ignores notifications for its own pushes
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 30.0
    # Answers retried; a mirror that passes a 429 on to its own clients drops 429 from these.
    statuses: frozenset[int] = RETRY_STATUSES

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        backoff = min(self.base_delay * float(2**attempt), self.max_delay)
        return backoff / 2 + random.uniform(0, backoff / 2)


@dataclass
class Manifest:
    """A manifest or index exactly as the registry stored it."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        if not isinstance(value, dict):
            raise ValueError("manifest is not a JSON object")
        return value


@dataclass
class _TokenCache:
    tokens: dict[str, str] = field(default_factory=dict)  # scope -> Authorization header


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


class RegistryClient:
    """One registry. Use as ``async with RegistryClient("127.0.0.1:5000") as reg: ...``."""

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool | None = None,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        max_connections: int = 8,
        timeout: float = 300.0,
        docker_config: bool = True,
        namespace: str | None = None,
    ) -> None:
        """``credentials``: used as given; when None, the Docker config file's for ``registry``
        unless ``docker_config`` is False (then none at all). ``namespace``: ``?ns=<it>`` on
        every request (``registry`` is then a mirror, e.g. a cache node, of that registry)."""
        self.registry = check_registry_host(registry, "registry")
        if plain_http is None:
            plain_http = is_loopback(registry)
        self.base_url = f"{'http' if plain_http else 'https'}://{registry}"
        self._origin = URL(self.base_url).origin()
        if credentials is None and docker_config:
            credentials = load_docker_credentials(registry)
        self.credentials = credentials
        self.namespace = check_registry_host(namespace, "namespace") if namespace is not None else None
        self.retry = retry or RetryPolicy()
        self._connections = max_connections
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._auth = _TokenCache()
        self.range_unsupported = False  # set when the registry answered 200 to a Range GET
        self.multi_range_unsupported = False  # set when a multi-range GET was not answered part by part
        self._uploads: dict[str, str] = {}  # local file -> upload session location
        self._spools: dict[str, str] = {}  # blob digest -> local copy (registries that ignore Range)
        self._spool_dir: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> RegistryClient:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self._timeout),
            auto_decompress=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._spool_dir is not None:
            self._spool_dir.cleanup()
            self._spool_dir = None
            self._spools.clear()

    def set_credentials(self, credentials: Credentials | None) -> None:
        """Authenticate with ``credentials`` from now on: the Authorization values obtained with the
        previous ones (basic headers, bearer tokens) are dropped, so the next request asks again."""
        self.credentials = credentials
        self._auth.tokens.clear()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        return self._session

    # -- requests, auth and retries -------------------------------------------------------

    def _registry_url(self, value: str, what: str, source: str, path_prefix: str = "/v2/") -> str:
        """``value`` (a path or a URL the registry handed back, e.g. an upload Location or a
        ``Link`` header) resolved against the registry, as long as it stays on the registry
        (same scheme, host and port) and under ``path_prefix`` with no dot segments."""
        problem = None
        try:
            url = URL(self.base_url).join(URL(value))
        except ValueError:
            problem = "not a URL"
        else:
            if url.origin() != self._origin or url.user is not None or url.password is not None:
                problem = f"it points to another host than {self.base_url}"
            elif _dot_segments(value) or not _safe_path(url.raw_path, path_prefix):
                problem = f"its path is not under {path_prefix}"
        if problem:
            raise RegistryError(f"{what}: refusing the {source} {show(value)}: {problem}")
        return str(url)

    def _check(self, repo: str, *, reference: str | None = None, digest: str | None = None) -> None:
        """Refuse a repository name, tag or digest that could build a URL outside
        ``/v2/<name>/`` (``ReferenceError``, a ``RegistryError``)."""
        check_repository(repo, f"{self.registry}: repository")
        if reference is not None:
            check_reference(reference, f"{self.registry}/{repo}: reference")
        if digest is not None:
            check_digest(digest, f"{self.registry}/{repo}: digest")

    async def _authorize(self, challenge: Challenge, scope: str) -> str:
        if challenge.scheme == "basic":
            if not self.credentials:
                raise AuthError(f"{self.registry}: authentication required and no credentials configured", 401)
            return self.credentials.basic_header()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthError(f"{self.registry}: unsupported authentication challenge {challenge.scheme!r}", 401)
        query = {"service": challenge.params.get("service", "")}
        query["scope"] = challenge.params.get("scope") or scope
        headers = {"Authorization": self.credentials.basic_header()} if self.credentials else {}
        url = _token_realm(challenge.params["realm"], self.registry).extend_query(query)
        async with self.session.get(url, headers=headers) as resp:
            if resp.status in (401, 403):
                raise AuthError(f"{self.registry}: token service refused the credentials ({resp.status})", resp.status)
            if resp.status != 200:
                raise RegistryError(f"{self.registry}: token service answered {resp.status}", resp.status)
            body = await resp.json(content_type=None)
        token = body.get("token") or body.get("access_token")
        if not token:
            raise AuthError(f"{self.registry}: token service returned no token", 401)
        return f"Bearer {token}"

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        data: Any = None,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
        redirects: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request with auth and retries; yields a response whose status is in ``ok``.

        ``data`` may be a callable returning a fresh body for each attempt. ``what`` names
        the object in error messages (e.g. ``127.0.0.1:5000/app@sha256:...``). The URL must
        stay on the registry, under ``/v2/``. Redirects are followed only with ``redirects``
        (blob GET/HEAD, which registries send to their storage; aiohttp drops the
        Authorization header on a redirect to another origin).
        """
        url = self._registry_url(path, what, "request URL")
        if self.namespace is not None:
            url = str(URL(url, encoded=True).extend_query(ns=self.namespace))
        attempt = 0
        auth_tries = 0
        while True:
            hdrs = dict(headers or {})
            if scope in self._auth.tokens:
                hdrs["Authorization"] = self._auth.tokens[scope]
            body = data() if callable(data) else data
            try:
                resp = await self.session.request(method, url, headers=hdrs, data=body, allow_redirects=redirects)
            except _RETRY_EXCEPTIONS as e:
                if not retry or attempt + 1 >= self.retry.attempts:
                    raise RegistryError(f"{what}: {method} failed: {type(e).__name__}: {e}") from e
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            try:
                if resp.status == 401 and auth_tries < 2 and "WWW-Authenticate" in resp.headers:
                    auth_tries += 1
                    if auth_tries == 2:
                        raise AuthError(f"{what}: the registry rejected the credentials (401)", 401)
                    challenge = parse_challenge(resp.headers["WWW-Authenticate"])
                    self._auth.tokens[scope] = await self._authorize(challenge, scope)
                    continue
                if resp.status in ok:
                    yield resp
                    return
                if resp.status in self.retry.statuses and retry and attempt + 1 < self.retry.attempts:
                    delay = self.retry.delay(attempt, _retry_after(resp) if resp.status == 429 else None)
                    log.info("%s: %s answered %d, retrying in %.2fs", what, method, resp.status, delay)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                raise await self._error(resp, method, what)
            finally:
                resp.release()

    async def _error(self, resp: aiohttp.ClientResponse, method: str, what: str) -> RegistryError:
        text = (await _read_limited(resp, MAX_ERROR_BODY)).decode(errors="replace")[:300].strip()
        detail = text
        try:
            errs = json.loads(text).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs) or text
        except (ValueError, AttributeError):
            pass
        detail = " ".join(detail.split())  # one line
        msg = f"{what}: {method} answered {resp.status}" + (f" ({detail})" if detail else "")
        if resp.status == 404:
            return NotFoundError(msg, 404)
        if resp.status in (401, 403):
            return AuthError(msg, resp.status)
        return RegistryError(msg, resp.status, _retry_after(resp) if resp.status in (429, 503) else None)

    async def _fetch(
        self,
        path: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        limit: int,
        redirects: bool = False,
    ) -> tuple[bytes, int, dict[str, str]]:
        """GET a whole (bounded) body; a connection dropped mid-body is retried."""
        for attempt in range(self.retry.attempts):
            try:
                async with self.request(
                    "GET", path, scope=scope, what=what, headers=headers, ok=ok, redirects=redirects
                ) as resp:
                    data = await _read_limited(resp, limit)
                    return data, resp.status, dict(resp.headers)
            except _RETRY_EXCEPTIONS as e:
                if attempt + 1 >= self.retry.attempts:
                    raise RegistryError(f"{what}: GET failed mid-body: {type(e).__name__}: {e}") from e
                await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    @staticmethod
    def pull_scope(repo: str) -> str:
        return f"repository:{repo}:pull"

    @staticmethod
    def push_scope(repo: str) -> str:
        return f"repository:{repo}:pull,push"

    # -- manifests ------------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        self._check(repo, reference=reference)
        what = f"{self.registry}/{repo}{'@' if is_digest(reference) else ':'}{reference}"
        data, _, headers = await self._fetch(
            f"/v2/{repo}/manifests/{reference}",
            scope=self.pull_scope(repo),
            what=what,
            headers={"Accept": oci.ACCEPT_MANIFESTS},
            limit=MAX_MANIFEST_SIZE,
        )
        media_type = headers.get("Content-Type", "").split(";")[0].strip()
        if len(data) > MAX_MANIFEST_SIZE:
            raise RegistryError(f"{what}: manifest is larger than {MAX_MANIFEST_SIZE} bytes")
        digest = oci.sha256_digest(data)
        if is_digest(reference) and oci.digest_of(data, reference) != reference:
            raise DigestMismatchError(f"{what}: manifest bytes hash to {oci.digest_of(data, reference)}")
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            raise RegistryError(f"{what}: manifest is not JSON") from None
        return Manifest(data, declared or media_type, digest)

    async def _head(
        self, repo: str, path: str, what: str, headers: dict[str, str] | None = None, redirects: bool = False
    ) -> dict[str, str] | None:
        """Response headers of a HEAD request, or None on 404."""
        try:
            async with self.request(
                "HEAD", path, scope=self.pull_scope(repo), what=what, headers=headers, redirects=redirects
            ) as resp:
                return dict(resp.headers)
        except NotFoundError:
            return None

    async def manifest_exists(self, repo: str, reference: str) -> str | None:
        """The digest ``reference`` resolves to, or None."""
        self._check(repo, reference=reference)
        what = f"{self.registry}/{repo}:{reference}"
        headers = await self._head(repo, f"/v2/{repo}/manifests/{reference}", what, {"Accept": oci.ACCEPT_MANIFESTS})
        if headers is None:
            return None
        digest = headers.get("Docker-Content-Digest") or reference
        return check_digest(digest, f"{what}: Docker-Content-Digest") if is_digest(digest) else digest

    async def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        self._check(repo, reference=reference)
        digest = oci.sha256_digest(data)
        what = f"{self.registry}/{repo}:{reference}"
        async with self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scope=self.push_scope(repo),
            what=what,
            headers={"Content-Type": media_type},
            data=data,
            ok=(201, 200),
        ) as resp:
            got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatchError(f"{what}: registry stored the manifest as {show(got)}, expected {digest}")
        return digest

    async def _paginated(self, path: str, key: str, scope: str, what: str) -> list[Any]:
        """Every item of ``key`` over the pages of ``path``, following ``Link: <...>; rel="next"``
        only while it stays on the registry and on ``path``."""
        items: list[Any] = []
        endpoint = path.split("?", 1)[0]
        url: str | None = path
        while url:
            async with self.request("GET", url, scope=scope, what=what) as resp:
                body = await resp.json(content_type=None)
                link = resp.headers.get("Link", "")
            page = body.get(key) if isinstance(body, dict) else None
            items.extend(page if isinstance(page, list) else [])
            found = _LINK_NEXT.search(link)
            url = self._registry_url(found.group(1), what, "Link header", endpoint) if found else None
            if url and URL(url).raw_path != endpoint:
                raise RegistryError(f"{what}: refusing the Link header {show(link)}: its path is not {endpoint}")
        return items

    async def catalog(self) -> list[str]:
        """Every repository the registry lists (``/v2/_catalog``, paginated); names that are
        not valid repository names are left out (with a warning)."""
        what = f"{self.registry} catalog"
        names = await self._paginated("/v2/_catalog?n=1000", "repositories", "registry:catalog:*", what)
        return _valid(names, check_repository, what)

    async def list_tags(self, repo: str) -> list[str]:
        """Every tag of ``repo``; names that are not valid tags are left out (with a warning)."""
        self._check(repo)
        what = f"{self.registry}/{repo}"
        tags = await self._paginated(f"/v2/{repo}/tags/list?n=1000", "tags", self.pull_scope(repo), what)
        return _valid(tags, check_tag, f"{what} tags")

    # -- blobs ----------------------------------------------------------------------------

    async def blob_size(self, repo: str, digest: str) -> int | None:
        """Size of the blob if ``repo`` has it, else None."""
        self._check(repo, digest=digest)
        what = f"{self.registry}/{repo}@{digest}"
        headers = await self._head(repo, f"/v2/{repo}/blobs/{digest}", what, redirects=True)
        if headers is None:
            return None
        length = headers.get("Content-Length", "-1")
        if not length.isdigit():
            return -1
        return int(length)

    async def read_blob(self, repo: str, digest: str, max_size: int = 64 << 20) -> bytes:
        """A small blob (config, index) in memory, digest-checked."""
        self._check(repo, digest=digest)
        what = f"{self.registry}/{repo}@{digest}"
        data, _, _ = await self._fetch(
            f"/v2/{repo}/blobs/{digest}", scope=self.pull_scope(repo), what=what, limit=max_size, redirects=True
        )
        if len(data) > max_size:
            raise RegistryError(f"{what}: blob is larger than {max_size} bytes")
        if oci.digest_of(data, digest) != digest:
            raise DigestMismatchError(f"{what}: blob bytes hash to {oci.digest_of(data, digest)}")
        return data

    async def download_blob(
        self, repo: str, digest: str, path: str, expected_size: int | None = None, progress: ProgressFn | None = None
    ) -> int:
        """Stream a blob to ``path``, checking its digest; resumes after dropped connections.

        With ``expected_size`` (the descriptor's size) a registry that announces another size
        (Content-Length, or the total of a Content-Range) fails at once, before the body is
        read, and so does a body that ends cleanly short of it or runs past it (no more than
        one byte past it is read): only a dropped connection is retried.
        """
        self._check(repo, digest=digest)
        what = f"{self.registry}/{repo}@{digest}"

        def sizes_differ(sent: int | str) -> DigestMismatchError:
            blob = f"{self.registry}/{repo}: blob {digest}"
            return DigestMismatchError(f"{blob}: registry sends {sent} bytes, the descriptor says {expected_size}")

        h = oci.hasher(digest)
        got = 0
        with open(path, "wb") as f:
            for attempt in range(self.retry.attempts):
                headers = {"Range": f"bytes={got}-"} if got else {}
                try:
                    async with self._blob_get(repo, digest, what, headers) as resp:
                        if got and resp.status == 200:  # no resume: start again
                            f.seek(0)
                            f.truncate()
                            h, got = oci.hasher(digest), 0
                        announced = _announced_size(resp, got)
                        if expected_size is not None and announced is not None and announced != expected_size:
                            raise sizes_differ(announced)
                        while expected_size is None or got < expected_size:
                            want = 1 << 20 if expected_size is None else min(1 << 20, expected_size - got)
                            block = await resp.content.read(want)
                            if not block:
                                break
                            f.write(block)
                            h.update(block)
                            got += len(block)
                            if progress:
                                progress(len(block))
                        if expected_size is not None and got >= expected_size and await resp.content.read(1):
                            raise sizes_differ(f"more than {expected_size}")
                    if expected_size is not None and got < expected_size:
                        raise sizes_differ(got)  # the body ended cleanly: the blob is shorter
                    break
                except RegistryError:
                    raise
                except _RETRY_EXCEPTIONS as e:
                    if attempt + 1 >= self.retry.attempts:
                        raise RegistryError(f"{what}: download failed after {got} bytes: {e}") from e
                    log.info("%s: connection dropped after %d bytes, resuming", what, got)
                    await asyncio.sleep(self.retry.delay(attempt))
        actual = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if actual != digest:
            raise DigestMismatchError(f"{what}: downloaded bytes hash to {actual}")
        return got

    def _blob_get(
        self, repo: str, digest: str, what: str, headers: dict[str, str]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """GET a blob (whole or a Range), answered 200 or 206 (redirects to storage followed)."""
        self._check(repo, digest=digest)
        path = f"/v2/{repo}/blobs/{digest}"
        return self.request(
            "GET", path, scope=self.pull_scope(repo), what=what, headers=headers, ok=(200, 206), redirects=True
        )

    async def fetch_range(
        self, repo: str, digest: str, start: int, end: int, *, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """Blob bytes ``[start, end)`` with one Range GET (not verified here: callers verify);
        ``headers`` are sent with it."""
        self._check(repo, digest=digest)
        what = f"{self.registry}/{repo}@{digest}"
        if end <= start:
            return b""
        if digest in self._spools:
            return _read_file_range(self._spools[digest], start, end)
        for attempt in range(self.retry.attempts):
            try:
                ask = {**(headers or {}), "Range": f"bytes={start}-{end - 1}"}
                async with self._blob_get(repo, digest, what, ask) as resp:
                    if resp.status == 200:  # the registry ignored Range: keep the whole blob, once
                        if not self.range_unsupported:
                            log.warning(
                                "%s: registry ignores Range requests; each blob is downloaded once to a local "
                                "spool file and read from there", self.registry,
                            )  # fmt: skip
                        self.range_unsupported = True
                        path = await self._spool(resp, what, digest)
                        return _read_file_range(path, start, end)
                    else:
                        data = await _read_limited(resp, end - start)
                break
            except (*_RETRY_EXCEPTIONS, asyncio.IncompleteReadError) as e:
                if attempt + 1 >= self.retry.attempts:
                    raise RegistryError(f"{what}: range {start}-{end - 1} failed: {type(e).__name__}: {e}") from e
                await asyncio.sleep(self.retry.delay(attempt))
        if len(data) != end - start:
            raise RegistryError(f"{what}: range {start}-{end - 1} returned {len(data)} bytes")
        return data

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        headers: Mapping[str, str] | None = None,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        """Blob bytes of each ``[start, end)`` in ``ranges`` (not overlapping): one multi-range
        GET answered ``multipart/byteranges`` when there are several, else one Range GET each.
        A registry (or the storage it redirects to) that answers a multi-range GET with the
        whole blob is detected from the status line, before its body is read: the connection
        is dropped and this client asks one range at a time from then on; so it does after a
        malformed multipart answer. Not verified here: callers verify. ``headers`` are sent with
        every request (a cache node's ``Imgaccel-Chunks``). (``fresh`` and ``chunks`` change
        nothing: the registry is the origin and has no use for chunk digests.)"""
        self._check(repo, digest=digest)
        if len(ranges) > 1 and not self.multi_range_unsupported and digest not in self._spools:
            what = f"{self.registry}/{repo}@{digest}"
            header = "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)
            why = ""
            for attempt in range(self.retry.attempts):
                try:
                    async with self._blob_get(repo, digest, what, {**(headers or {}), "Range": header}) as resp:
                        try:
                            return await _read_byteranges(resp, ranges)
                        except ValueError as e:
                            resp.close()  # whatever is left of the body is not read
                            why = str(e)
                            break
                except (*_RETRY_EXCEPTIONS, asyncio.IncompleteReadError) as e:
                    if attempt + 1 >= self.retry.attempts:
                        raise RegistryError(f"{what}: {len(ranges)} ranges failed: {type(e).__name__}: {e}") from e
                    await asyncio.sleep(self.retry.delay(attempt))
            log.warning("%s: a multi-range request was answered with %s; asking one range per request from now on",
                        self.registry, why)  # fmt: skip
            self.multi_range_unsupported = True
        return [await self.fetch_range(repo, digest, start, end, headers=headers) for start, end in ranges]

    async def _spool(self, resp: aiohttp.ClientResponse, what: str, digest: str) -> str:
        """Write a whole-blob response to a temporary file, digest-checked; remember it."""
        if self._spool_dir is None:
            self._spool_dir = tempfile.TemporaryDirectory(prefix="imgaccel-spool-")
        check_digest(digest, what)  # it names a local file
        path = os.path.join(self._spool_dir.name, digest.replace(":", "-"))
        h = oci.hasher(digest)
        with open(path, "wb") as f:
            async for block in resp.content.iter_chunked(1 << 20):
                f.write(block)
                h.update(block)
        actual = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if actual != digest:
            os.unlink(path)
            raise DigestMismatchError(f"{what}: blob bytes hash to {actual}")
        self._spools[digest] = path
        return path

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True when the registry mounted it."""
        self._check(repo, digest=digest)
        self._check(from_repo)
        query = urlencode({"mount": digest, "from": from_repo})
        async with self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{query}",
            scope=f"{self.push_scope(repo)} {self.pull_scope(from_repo)}",
            what=f"{self.registry}/{repo}@{digest}",
            ok=(201, 202),
        ) as resp:
            return resp.status == 201

    async def upload_blob(
        self, repo: str, digest: str, source: str | bytes, progress: ProgressFn | None = None
    ) -> None:
        """Upload a file (streamed) or bytes as ``digest`` unless the repository has it already."""
        self._check(repo, digest=digest)
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        if await self.blob_size(repo, digest) == size:
            return
        what = f"{self.registry}/{repo}@{digest}"
        for attempt in range(self.retry.attempts):
            async with self.request(
                "POST", f"/v2/{repo}/blobs/uploads/", scope=self.push_scope(repo), what=what, ok=(202,)
            ) as resp:
                location = self._upload_location(resp, repo, what)
            sep = "&" if "?" in location else "?"

            def body() -> Any:
                return source if isinstance(source, bytes) else _file_sender(source, progress)

            try:
                async with self.request(
                    "PUT",
                    f"{location}{sep}{urlencode({'digest': digest})}",
                    scope=self.push_scope(repo),
                    what=what,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    data=body,
                    ok=(201,),
                    retry=False,
                ):
                    pass
                break
            except RegistryError as e:
                if (e.status is not None and e.status not in RETRY_STATUSES) or attempt + 1 >= self.retry.attempts:
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
        if await self.blob_size(repo, digest) != size:
            raise RegistryError(f"{what}: upload finished but the registry does not hold {size} bytes")

    async def upload_growing_file(
        self, repo: str, path: str, written: Callable[[], int], finished: asyncio.Event, min_chunk: int = 8 << 20
    ) -> None:
        """Stream a file that another thread is still writing into an upload session.

        PATCHes each new ``min_chunk`` bytes as ``written()`` grows, and everything left once
        ``finished`` is set; the caller then calls ``commit_upload`` with the final digest.
        Raises ``RegistryError`` if the session fails; the caller falls back to ``upload_blob``.
        """
        self._check(repo)
        what = f"{self.registry}/{repo} (streamed upload)"
        async with self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", scope=self.push_scope(repo), what=what, ok=(202,)
        ) as resp:
            self._uploads[path] = self._upload_location(resp, repo, what)
        sent = 0
        with open(path, "rb") as f:
            while True:
                done = finished.is_set()
                available = written()
                if available - sent >= min_chunk or (done and available > sent):
                    f.seek(sent)
                    data = f.read(min(available - sent, 2 * min_chunk))
                    async with self.request(
                        "PATCH",
                        self._uploads[path],
                        scope=self.push_scope(repo),
                        what=what,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{sent}-{sent + len(data) - 1}",
                            "Content-Length": str(len(data)),
                        },
                        data=data,
                        ok=(202,),
                        retry=False,
                    ) as resp:
                        self._uploads[path] = self._upload_location(resp, repo, what)
                    sent += len(data)
                    continue
                if done:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), 0.05)

    async def commit_upload(self, repo: str, path: str, digest: str, size: int) -> None:
        """Finish a ``upload_growing_file`` session as ``digest`` and check the result."""
        self._check(repo, digest=digest)
        location = self._uploads.pop(path)
        sep = "&" if "?" in location else "?"
        what = f"{self.registry}/{repo}@{digest}"
        async with self.request(
            "PUT", f"{location}{sep}{urlencode({'digest': digest})}", scope=self.push_scope(repo), what=what,
            headers={"Content-Length": "0"}, ok=(201,), retry=False,
        ):  # fmt: skip
            pass
        if await self.blob_size(repo, digest) != size:
            raise RegistryError(f"{what}: streamed upload finished but the registry does not hold {size} bytes")

    async def cancel_upload(self, repo: str, path: str) -> None:
        """Abandon a streamed upload session (best effort)."""
        self._check(repo)
        location = self._uploads.pop(path, None)
        if location is None:
            return
        try:
            async with self.request(
                "DELETE", location, scope=self.push_scope(repo), what=repo, ok=(204, 200, 404), retry=False
            ):
                pass
        except (RegistryError, *_RETRY_EXCEPTIONS):
            pass

    def _upload_location(self, resp: aiohttp.ClientResponse, repo: str, what: str) -> str:
        """The upload session URL from an answer's Location header: on the registry, under
        ``/v2/<repo>/``, or ``RegistryError``."""
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: {resp.method} answered {resp.status} without a Location header")
        return self._registry_url(location, what, "upload Location", f"/v2/{repo}/")

    # -- referrers ------------------------------------------------------------------------

    async def add_referrer(self, repo: str, subject_digest: str, referrer: oci.Descriptor) -> None:
        """Make ``referrer`` discoverable from ``subject_digest`` (OCI 1.1).

        With a referrers API the registry indexes the pushed manifest by its ``subject``
        itself; without one (distribution 2.8) keep the ``sha256-<hex>`` tag index current.
        """
        self._check(repo, digest=subject_digest)
        what = f"{self.registry}/{repo} referrers of {subject_digest}"
        try:
            async with self.request(
                "GET", f"/v2/{repo}/referrers/{subject_digest}", scope=self.pull_scope(repo), what=what
            ) as resp:
                if resp.headers.get("Content-Type", "").startswith(oci.OCI_INDEX):
                    return
        except NotFoundError:
            pass
        tag = _referrers_tag(subject_digest)
        try:
            existing = await self.get_manifest(repo, tag)
            index = oci.ImageIndex.model_validate_json(existing.data)
        except NotFoundError:
            index = oci.ImageIndex(schemaVersion=2, mediaType=oci.OCI_INDEX, manifests=[])
        if any(m.digest == referrer.digest for m in index.manifests):
            return
        index.manifests.append(referrer)
        body = oci.canonical_json(index.model_dump(by_alias=True, exclude_none=True))
        await self.put_manifest(repo, tag, body, oci.OCI_INDEX)

    async def referrers(self, repo: str, subject_digest: str) -> list[oci.Descriptor]:
        self._check(repo, digest=subject_digest)
        try:
            async with self.request(
                "GET", f"/v2/{repo}/referrers/{subject_digest}", scope=self.pull_scope(repo), what=repo
            ) as resp:
                if resp.headers.get("Content-Type", "").startswith(oci.OCI_INDEX):
                    return oci.ImageIndex.model_validate_json(await resp.read()).manifests
        except NotFoundError:
            pass
        try:
            m = await self.get_manifest(repo, _referrers_tag(subject_digest))
        except NotFoundError:
            return []
        return oci.ImageIndex.model_validate_json(m.data).manifests


def _safe_path(raw_path: str, prefix: str) -> bool:
    """True when a URL's (still percent-encoded) path is under ``prefix`` with no dot segment,
    encoded dot, backslash or empty segment that a server could resolve elsewhere."""
    if not raw_path.startswith(prefix) or "\\" in raw_path or "%2e" in raw_path.lower():
        return False
    segments = raw_path[1:].split("/")
    return not any(seg in (".", "..") for seg in segments) and "" not in segments[:-1]


def _dot_segments(value: str) -> bool:
    """True when the path of ``value`` (a URL or a path, as received, before any resolution
    would remove them) has a ``.`` or ``..`` segment, plain or percent-encoded, or a backslash."""
    path = value.split("?", 1)[0].split("#", 1)[0]
    return "\\" in path or "%2e" in path.lower() or any(seg in (".", "..") for seg in path.split("/"))


def _token_realm(realm: str, registry: str) -> URL:
    """The token service URL a Bearer challenge names (on any host: that is how bearer auth
    works), as long as it is a plain http(s) URL."""
    try:
        url = URL(realm)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or url.user or url.password or url.fragment:
        raise AuthError(f"{registry}: refusing the token realm {show(realm)}: not an http(s) URL", 401)
    return url


def _referrers_tag(digest: str) -> str:
    """The OCI 1.1 tag-schema referrers tag: ``<alg>-<hex>``, the hex cut to 64 characters."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart[:64]}"


def _announced_size(resp: aiohttp.ClientResponse, offset: int) -> int | None:
    """The whole blob's size as an answer announces it before its body: Content-Length of a
    200, the total of a 206's Content-Range (or ``offset`` + its Content-Length)."""
    length = resp.headers.get("Content-Length", "")
    if resp.status == 206:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit():
            return int(total)
        return offset + int(length) if length.isdigit() else None
    return int(length) if length.isdigit() else None


def _valid(names: list[Any], check: Callable[[object, str | None], str], what: str) -> list[str]:
    """``names`` that pass ``check``; the others are logged and left out."""
    out = []
    for name in names:
        try:
            out.append(check(name, what))
        except ReferenceError as e:
            log.warning("%s (left out)", e)
    return out


def _read_file_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``limit + 1`` bytes of it when it is longer than ``limit``."""
    parts: list[bytes] = []
    got = 0
    while got <= limit:
        block = await resp.content.read(min(1 << 20, limit + 1 - got))
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


async def _read_multipart_byteranges(
    resp: aiohttp.ClientResponse, want: int, asked: int
) -> list[tuple[int, int, bytes]]:
    """The parts of a ``multipart/byteranges`` body (RFC 9110, section 14.6) as (first, end,
    bytes). Each part's Content-Range gives its exact length, so its bytes are read by count,
    without scanning them for the boundary (aiohttp's MultipartReader reads ahead and pushes
    back up to 1 MiB per part: 0.75 s of the event loop for a 33 MB profile replay)."""
    message = email.message.Message()
    message["Content-Type"] = resp.headers.get("Content-Type", "")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("a multipart answer without a boundary")
    delimiter = b"--" + boundary.encode()
    stream = resp.content
    got: list[tuple[int, int, bytes]] = []
    total = 0
    while True:
        line = await stream.readline()
        skipped = 0
        while line.rstrip() not in (delimiter, delimiter + b"--"):  # a preamble, the CRLF before a delimiter
            skipped += 1
            if not line or skipped > 64:
                raise ValueError("a multipart answer that ends before its closing delimiter")
            line = await stream.readline()
        if line.rstrip() == delimiter + b"--":
            return got
        span = None
        for _ in range(64):
            header = await stream.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                span = _content_range(value.strip())
        if span is None:
            raise ValueError("a part without a valid Content-Range")
        total += span[1] - span[0]
        if total > want or len(got) >= asked:
            raise ValueError(f"parts larger than the {asked} ranges asked for")
        got.append((span[0], span[1], await stream.readexactly(span[1] - span[0])))


def _content_range(value: str | None) -> tuple[int, int] | None:
    """``bytes FIRST-LAST/SIZE`` -> ``(FIRST, LAST + 1)``."""
    unit, _, spec = (value or "").partition(" ")
    first, _, rest = spec.partition("-")
    last = rest.partition("/")[0]
    if unit != "bytes" or not first.isdigit() or not last.isdigit() or int(last) < int(first):
        return None
    return int(first), int(last) + 1


async def _read_byteranges(resp: aiohttp.ClientResponse, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each range from a 206 answer to a multi-range GET: ``multipart/byteranges``
    parts, or one part spanning them all. ``ValueError`` says what else the answer was (a 200
    with the whole blob, parts that miss a range or are longer than they claim); nothing more
    of its body is read then, so memory stays bounded by the ranges' size."""
    if resp.status != 206:
        raise ValueError(f"status {resp.status} (the whole blob)")
    want = sum(end - start for start, end in ranges)
    lowest, highest = min(start for start, _ in ranges), max(end for _, end in ranges)
    if resp.content_type == "multipart/byteranges":
        got = await _read_multipart_byteranges(resp, want, len(ranges))
    else:  # one part: acceptable only if it is exactly the span from the lowest range to the highest
        span = _content_range(resp.headers.get("Content-Range"))
        if span != (lowest, highest):
            raise ValueError(f"one part, {resp.headers.get('Content-Range')!r}")
        data = await _read_limited(resp, highest - lowest)
        if len(data) != highest - lowest:
            raise ValueError(f"a part of {len(data)} bytes, not {highest - lowest}")
        got = [(lowest, highest, data)]
    out = []
    for start, end in ranges:
        piece = next((d[start - lo : end - lo] for lo, hi, d in got if lo <= start and end <= hi), None)
        if piece is None:
            raise ValueError(f"no part holding bytes {start}-{end - 1}")
        out.append(piece)
    return out


async def _file_sender(path: str, progress: ProgressFn | None) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return
            if progress:
                progress(len(block))
            yield block


def client_for(ref: ImageRef, *, plain_http: bool | None = None, **kwargs: Any) -> RegistryClient:
    return RegistryClient(ref.registry, plain_http=plain_http, **kwargs)
