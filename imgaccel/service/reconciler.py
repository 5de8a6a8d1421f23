"""Reconcile: find images with no accelerated twin by listing the registries, and enqueue them.

Registries drop notifications (distribution keeps them in memory and loses them on restart;
Harbor tries 3 times), so every ``reconcile_interval`` seconds the reconciler lists each
configured registry's repositories (``/v2/_catalog``, filtered by its ``repositories`` globs)
and their tags, and enqueues every tag that a rule matches and whose twin tag is missing.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Awaitable, Callable

from imgaccel.pusher.errors import RegistryError
from imgaccel.service.job_store import JobStore
from imgaccel.service.service_config import ServiceConfig
from imgaccel.service.worker import RegistryClients

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str, str, str | None], Awaitable[object]]  # registry, repository, digest, tag


class Reconciler:
    def __init__(self, config: ServiceConfig, clients: RegistryClients, enqueue: Enqueue, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.enqueue = enqueue
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.config.reconcile_interval > 0 and self.config.registries:
            self._task = asyncio.create_task(self._loop(), name="imgaccel-reconciler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                async with self.store.lock("reconciler") as mine:  # one pass at a time among replicas
                    n = await self.run_once() if mine else 0
                if n:
                    log.info("reconciler enqueued %d image(s) without an accelerated twin", n)
            except Exception:  # keep reconciling on the next round whatever went wrong
                log.exception("reconcile round failed")
            await asyncio.sleep(self.config.reconcile_interval)

    async def run_once(self) -> int:
        found = 0
        for reg in self.config.registries:
            client = await self.clients.get(reg.endpoint)
            try:
                repos = await client.catalog()
            except RegistryError as e:
                log.warning("reconcile: cannot list %s: %s", reg.endpoint, e)
                continue
            for repo in repos:
                if repo == self.config.cache_repo or not any(fnmatch.fnmatchcase(repo, g) for g in reg.repositories):
                    continue
                try:
                    tags = set(await client.list_tags(repo))
                except RegistryError as e:
                    log.warning("reconcile: cannot list tags of %s/%s: %s", reg.endpoint, repo, e)
                    continue
                for tag in sorted(tags):
                    rule = self.config.rule_for(repo, tag)
                    if rule is None or f"{tag}{rule.suffix}" in tags:
                        continue
                    digest = await client.manifest_exists(repo, tag)
                    if digest and digest.startswith("sha256:"):
                        await self.enqueue(reg.endpoint, repo, digest, tag)
                        found += 1
        return found
