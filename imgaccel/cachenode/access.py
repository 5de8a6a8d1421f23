"""Who may read what: every request for a repository's content must show pull access to that
repository, whether or not the bytes are already in the store.

* ``Authorization: Bearer <cluster token>`` (node daemons; also accepted as the password of
  ``Basic`` credentials, for clients that only speak Basic): read of every configured upstream.
  Compared in constant time against every configured token.
* ``Authorization: Basic <user:password>``: the client's own registry credentials. The node
  asks the upstream registry whether they can pull the repository (a HEAD of the manifest or
  blob at hand with them, through the registry's own auth flow) and keeps the yes/no for
  ``auth_ttl`` seconds, keyed by (keyed hash of the credentials, registry, repository). A
  registry that answers without asking for credentials has checked none: such credentials
  count as no credentials.
* no credentials: allowed only for an upstream configured ``anonymous: true``, and then only
  where the registry lets anonymous clients pull (checked the same way). Otherwise 401 with
  ``WWW-Authenticate: Basic realm=...``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from imgaccel.cachenode.flight import SingleFlight, TTLCache
from imgaccel.cachenode.metrics import Metrics
from imgaccel.cachenode.upstream import Probe, Upstream
from imgaccel.pusher.auth import Credentials

REALM = "imgaccel-cachenode"


@dataclass(frozen=True)
class Grant:
    how: Literal["cluster", "credentials", "anonymous"]

    @property
    def every_repository(self) -> bool:
        """A cluster token reads every repository of every upstream, so the node need not ask
        upstream whether a stored digest belongs to the repository named."""
        return self.how == "cluster"


class Denied(Exception):
    """The client may not read; ``status`` is 401 (with a challenge) or 403."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class Access:
    def __init__(self, cluster_tokens: list[str], ttl: float, metrics: Metrics) -> None:
        self._tokens = [hashlib.sha256(t.encode()).digest() for t in cluster_tokens]
        self._key = secrets.token_bytes(32)  # credentials are kept only as keyed hashes
        self._decisions: TTLCache[tuple[bytes, str, str], Probe] = TTLCache(ttl)
        self._probes: SingleFlight[tuple[bytes, str, str], Probe] = SingleFlight()
        self.metrics = metrics

    def is_cluster_token(self, token: str) -> bool:
        given = hashlib.sha256(token.encode()).digest()
        found = False
        for t in self._tokens:  # no early exit: the time taken does not tell which token matched
            found |= hmac.compare_digest(given, t)
        return found

    async def check(
        self, authorization: str | None, upstream: Upstream | None, repo: str | None, kind: str, reference: str
    ) -> Grant:
        """The grant for reading ``kind`` ("manifests" or "blobs") ``reference`` of ``repo`` on
        ``upstream``; ``repo`` None is the ``/v2/`` base check (Basic credentials are then taken
        as given: they are checked per repository on every read). ``Denied`` otherwise."""
        try:
            grant = await self._check(authorization, upstream, repo, kind, reference)
        except Denied:
            self.metrics.access.labels("denied").inc()
            raise
        self.metrics.access.labels(grant.how).inc()
        return grant

    async def _check(
        self, authorization: str | None, upstream: Upstream | None, repo: str | None, kind: str, reference: str
    ) -> Grant:
        scheme, _, value = (authorization or "").strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            if self.is_cluster_token(value):
                return Grant("cluster")
            raise Denied("invalid cluster token")
        if scheme == "basic":
            creds = _basic(value)
            if self.is_cluster_token(creds.password):
                return Grant("cluster")
            if upstream is None or repo is None:
                return Grant("credentials")
            key = hmac.new(self._key, f"{creds.username}:{creds.password}".encode(), "sha256").digest()
            found = await self._decide((key, upstream.host, repo), upstream, creds, repo, kind, reference)
            if found == "authenticated" or (found == "open" and upstream.config.anonymous):
                return Grant("credentials")
            if found == "open":
                raise Denied(f"{upstream.host} does not check credentials and anonymous reads are not enabled")
            raise Denied(f"these credentials cannot pull {upstream.host}/{repo}", 403 if found == "forbidden" else 401)
        if scheme:
            raise Denied(f"unsupported authorization scheme {scheme[:20]!r}")
        if upstream is None or not upstream.config.anonymous:
            raise Denied("authentication required")
        if repo is None:
            return Grant("anonymous")
        if await self._decide((b"", upstream.host, repo), upstream, None, repo, kind, reference) != "open":
            raise Denied(f"{upstream.host}/{repo} cannot be pulled anonymously")
        return Grant("anonymous")

    async def _decide(
        self, key: tuple[bytes, str, str], upstream: Upstream, creds: Credentials | None, repo: str, kind: str,
        reference: str,
    ) -> Probe:  # fmt: skip
        cached = self._decisions.get(key)
        if cached is not None:
            return cached

        async def probe() -> Probe:
            found = await upstream.probe(creds, repo, kind, reference)
            self._decisions.put(key, found)
            return found

        return await self._probes.run(key, probe)


def _basic(value: str) -> Credentials:
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Denied("malformed Basic credentials") from None
    if not sep:
        raise Denied("malformed Basic credentials")
    return Credentials(user, password)
