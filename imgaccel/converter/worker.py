"""Workers: take queued jobs from the store and run ``ImageConverter`` on them.

A failed attempt is retried with exponential backoff and jitter up to the configured number of
attempts; ``NotConvertible`` images (Helm charts, signatures, our own output) are ``skipped``.
Progress is kept on the job and published to live watchers. The converter pushes the tag last,
so a worker killed at any moment leaves no tag on a half-pushed image, and the job, still
``running`` in the store, is requeued when the service starts again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress

from imgaccel.converter.errors import ConversionError, NotConvertible
from imgaccel.converter.image_converter import ImageConverter, Progress
from imgaccel.converter.job_store import Job, JobStore
from imgaccel.converter.metrics import ServiceMetrics
from imgaccel.converter.service_config import Rule, ServiceConfig
from imgaccel.formats.layer_index import FORMAT_VERSION
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef

log = logging.getLogger(__name__)


def job_key(registry: str, repository: str, digest: str, mode: str) -> str:
    return f"{registry}/{repository}@{digest}|{mode}|v{FORMAT_VERSION}"


class RegistryClients:
    """One long-lived ``RegistryClient`` per registry endpoint."""

    def __init__(self, config: ServiceConfig) -> None:
        self._config = config
        self._clients: dict[str, RegistryClient] = {}
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()

    async def get(self, endpoint: str) -> RegistryClient:
        async with self._lock:
            return await self._get(endpoint)

    async def _get(self, endpoint: str) -> RegistryClient:
        if endpoint not in self._clients:
            reg = self._config.registry(endpoint)
            client = RegistryClient(
                endpoint,
                plain_http=reg.use_plain_http(),
                credentials=reg.credentials(),
                retry=self._config.retry.request_policy(),
                max_connections=reg.max_connections,
            )
            self._clients[endpoint] = await self._stack.enter_async_context(client)
        return self._clients[endpoint]

    async def close(self) -> None:
        await self._stack.aclose()


class JobRunner:
    def __init__(
        self,
        config: ServiceConfig,
        store: JobStore,
        clients: RegistryClients,
        metrics: ServiceMetrics,
        publish: Callable[[Job], None],
        on_finished: Callable[[Job], None],
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.metrics = metrics
        self.publish = publish
        self.on_finished = on_finished
        self.wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        requeued = self.store.requeue_running()
        if requeued:
            log.warning("resuming %d job(s) that were running when the service stopped", requeued)
        self._tasks = [
            asyncio.create_task(self._loop(i), name=f"imgaccel-worker-{i}") for i in range(self.config.workers)
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, n: int) -> None:
        while True:
            job = self.store.claim(time.time())
            if job is None:
                self.wakeup.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), 1.0)
                continue
            self.wakeup.set()  # there may be more: let another idle worker look
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug kill the worker; the job records it
                log.exception("job %s: unexpected error", job.id)
                self._retry_or_fail(job, "internal error (see the service log)")

    async def _run(self, job: Job) -> None:
        self.publish(job)
        options = Rule.model_validate(job.options).options(self.config.cache_repo)
        started = time.monotonic()
        progress = _JobProgress(job, self.store, self.publish)
        client = await self.clients.get(job.registry)
        converter = ImageConverter(client, options, progress.callbacks())
        first_tag = job.tags[0] if job.tags else None
        try:
            result = await converter.convert(ImageRef(job.registry, job.repository, tag=first_tag, digest=job.digest))
            done = {first_tag}
            while pending := [t for t in self._stored_tags(job) if t not in done]:  # tags that arrived meanwhile
                for tag in pending:
                    await _retag(client, job, result.digest, f"{tag}{options.suffix}")
                    done.add(tag)
        except NotConvertible as e:
            job.state, job.skip_reason, job.finished_at = "skipped", str(e), time.time()
            self.store.save(job)
            self.publish(job)
            return
        except (ConversionError, RegistryError, OSError) as e:
            self._retry_or_fail(job, str(e))
            return
        job.state, job.finished_at, job.last_error = "succeeded", time.time(), None
        job.target, job.target_digest = str(result.target), result.digest
        job.layers = result.layers_converted + result.layers_reused
        job.bytes_in, job.bytes_out = result.bytes_in, result.bytes_out
        job.size_before, job.size_after = result.size_before, result.size_after
        self.store.save(job)
        self.metrics.duration.observe(time.monotonic() - started)
        self.metrics.bytes_in.inc(result.bytes_in)
        self.metrics.bytes_out.inc(result.bytes_out)
        self.publish(job)
        self.on_finished(job)

    def _stored_tags(self, job: Job) -> list[str]:
        stored = self.store.get(job.id)
        return stored.tags if stored else job.tags

    def _retry_or_fail(self, job: Job, error: str) -> None:
        job.last_error = error
        retry = self.config.retry
        if job.attempts < retry.attempts:
            backoff = min(retry.base_delay * 2 ** (job.attempts - 1), retry.max_delay)
            job.state, job.next_attempt_at = "queued", time.time() + backoff * random.uniform(0.5, 1.0)
            log.info("job %s attempt %d failed (%s); retrying", job.id, job.attempts, error)
            self.store.save(job)
            self.publish(job)
            return
        job.state, job.finished_at = "failed", time.time()
        log.warning("job %s failed after %d attempts: %s", job.id, job.attempts, error)
        self.store.save(job)
        self.publish(job)
        self.on_finished(job)


async def _retag(client: RegistryClient, job: Job, digest: str, target_tag: str) -> None:
    """Give another source tag of the same digest its own accelerated tag (no conversion)."""
    manifest = await client.get_manifest(job.repository, digest)
    await client.put_manifest(job.repository, target_tag, manifest.data, manifest.media_type)


class _JobProgress:
    """Per-layer progress on the job record, saved and published as it moves."""

    def __init__(self, job: Job, store: JobStore, publish: Callable[[Job], None]) -> None:
        self.job, self.store, self.publish = job, store, publish
        job.progress = {"layers_started": 0, "layers_done": 0, "layers_reused": 0, "bytes_total": 0, "bytes_done": 0}
        self._last = 0.0

    def callbacks(self) -> Progress:
        return Progress(on_layer_start=self._start, on_bytes=self._bytes, on_layer_done=self._done)

    def _start(self, digest: str, size: int) -> None:
        self.job.progress["layers_started"] += 1
        self.job.progress["bytes_total"] += size
        self._save()

    def _bytes(self, n: int) -> None:
        self.job.progress["bytes_done"] += n
        if time.monotonic() - self._last > 0.5:
            self.publish(self.job)
            self._last = time.monotonic()

    def _done(self, digest: str, reused: bool) -> None:
        self.job.progress["layers_done"] += 1
        if reused:
            self.job.progress["layers_reused"] += 1
        self._save()

    def _save(self) -> None:
        self.store.save(self.job)
        self.publish(self.job)
