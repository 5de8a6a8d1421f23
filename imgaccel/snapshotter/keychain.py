"""Registry credentials that Kubernetes pulls brought, kept in memory for a while: ``Keychain``.

Under Kubernetes the kubelet hands pull credentials (imagePullSecrets, credential provider
plugins) only to the CRI ``PullImage`` call. The CRI image-service proxy (``cri_proxy``) reads
them there and ``put``s them under the image's registry host (``host[:port]``) with a time to
live; ``ErofsLayers`` asks ``get`` when it opens an image of that registry lazily. One entry per
registry: the newest replaces the older. Nothing is written to disk, and nothing here logs
credentials (``Credentials``' repr leaves the password out).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from imgaccel.pusher.auth import Credentials


@dataclass(frozen=True)
class _Entry:
    credentials: Credentials
    expires: float  # on the keychain's clock


class Keychain:
    """Credentials per registry host, each forgotten ``ttl`` seconds after it was put.

    A lock guards the table, so the asyncio daemon may also call it from worker threads.
    ``clock`` (monotonic seconds) is there for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def put(self, registry: str, credentials: Credentials, ttl: float) -> None:
        """Keep ``credentials`` for ``registry`` for ``ttl`` seconds (replacing what it held)."""
        if not ttl > 0:
            raise ValueError(f"credential ttl must be positive, not {ttl!r}")
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            self._entries[registry] = _Entry(credentials, now + ttl)

    def get(self, registry: str) -> Credentials | None:
        """The newest credentials put for ``registry``, unless they expired."""
        with self._lock:
            entry = self._entries.get(registry)
            if entry is None:
                return None
            if entry.expires <= self._clock():
                del self._entries[registry]
                return None
            return entry.credentials

    def expires_in(self, registry: str) -> float | None:
        """Seconds until ``registry``'s credentials are forgotten (None: it has none)."""
        with self._lock:
            entry = self._entries.get(registry)
            left = entry.expires - self._clock() if entry is not None else 0.0
            return left if left > 0 else None

    def forget(self, registry: str) -> None:
        with self._lock:
            self._entries.pop(registry, None)

    def registries(self) -> list[str]:
        """The registries holding unexpired credentials, sorted."""
        with self._lock:
            self._drop_expired(self._clock())
            return sorted(self._entries)

    def _drop_expired(self, now: float) -> None:
        for registry in [r for r, e in self._entries.items() if e.expires <= now]:
            del self._entries[registry]


@runtime_checkable
class UsesKeychain(Protocol):
    """A ``RemoteLayers`` that takes registry credentials from a keychain (``ErofsLayers``): the
    daemon hands it the keychain its CRI proxy fills."""

    keychain: Keychain | None
