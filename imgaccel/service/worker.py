"""Workers: take queued jobs from the store and run ``ImageConverter`` on them.

Each attempt converts in a child process held to the configured memory and time limits
(``isolated_job``). A failed attempt is retried with exponential backoff and jitter up to the
configured number of attempts, except one that broke those limits: it fails at once, as does a
job the service was stopped in the middle of too often (a restart never loops on a poisoned
job). ``NotConvertible`` images (Helm charts, signatures, our own output) are ``skipped``.
Progress is kept on the job and published to live watchers. The converter pushes the tag last,
so a worker killed at any moment leaves no tag on a half-pushed image, and the job, still
``running`` in the store, is requeued when the service starts again.

When the job's rule has ``profile:``, a successful conversion is followed by the profile step
(``auto_profile``: the image's entrypoint run in a sandbox, the chunks it read pushed as a
profile) before the job is marked ``succeeded``. Its outcome is ``job.progress["profile"]``;
it never fails the job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from typing import Any

from imgaccel.converter.errors import ConversionError, NotConvertible
from imgaccel.converter.image_converter import ImageConverter, Progress
from imgaccel.converter.options import ConvertOptions
from imgaccel.formats.layer_index import FORMAT_VERSION
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef, ReferenceError
from imgaccel.service import auto_profile
from imgaccel.service.isolated_job import (
    ConversionLimitError,
    IsolatedResult,
    JobRequest,
    options_to_wire,
    run_isolated,
)
from imgaccel.service.job_store import STORE_ERRORS, Job, JobStore
from imgaccel.service.metrics import ServiceMetrics
from imgaccel.service.service_config import ProfileRule, Rule, ServiceConfig

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
        on_finished: Callable[[Job], Awaitable[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.metrics = metrics
        self.publish = publish
        self.on_finished = on_finished
        self.wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._swept: asyncio.Task[None] | None = None  # leftovers of profile runs, cleared at start

    async def start(self) -> None:
        requeued, failed = await self.store.requeue_running(self.config.retry.attempts)
        if requeued:
            log.warning("resuming %d job(s) that were running when the service stopped", requeued)
        if failed:
            log.warning("%d job(s) failed: the service stopped during each of their attempts", failed)
        self._swept = asyncio.create_task(self._sweep_profile_runs(), name="imgaccel-profile-sweep")
        self._tasks = [
            asyncio.create_task(self._loop(i), name=f"imgaccel-worker-{i}") for i in range(self.config.workers)
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._swept is not None:
            await asyncio.gather(self._swept, return_exceptions=True)

    async def _sweep_profile_runs(self) -> None:
        root = auto_profile.work_root(self.config.data_dir)
        if not root.is_dir():
            return
        try:
            cleared = await asyncio.to_thread(auto_profile.sweep, root)
        except OSError as e:
            log.error("%s: clearing profile runs left by a previous service failed: %s", root, e)
            return
        if cleared:
            log.warning("cleared %d profile run(s) left by a previous service: %s", len(cleared), ", ".join(cleared))

    async def _loop(self, n: int) -> None:
        while True:
            try:
                job = await self.store.claim(time.time())
            except STORE_ERRORS as e:  # a database outage: claim again shortly
                log.warning("worker %d: %s", n, e)
                job = None
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
            except STORE_ERRORS as e:  # its lease lapses; this or another replica runs it again
                log.error("job %s: the job store failed (%s); the job will run again", job.id, e)
                self.store.release(job.id)
            except Exception:  # never let a bug kill the worker; the job records it
                log.exception("job %s: unexpected error", job.id)
                try:
                    await self._retry_or_fail(job, "internal error (see the service log)")
                except STORE_ERRORS as e:
                    log.error("job %s: the job store failed (%s); the job will run again", job.id, e)
                    self.store.release(job.id)

    async def _convert(self, job: Job, ref: ImageRef, options: ConvertOptions, progress: Progress) -> IsolatedResult:
        isolation = self.config.isolation
        if not isolation.enabled:
            client = await self.clients.get(job.registry)
            r = await ImageConverter(client, options, progress).convert(ref)
            return IsolatedResult(r.target, r.digest, r.layers_converted, r.layers_reused, r.bytes_in, r.bytes_out,
                                  r.size_before, r.size_after)  # fmt: skip
        reg = self.config.registry(job.registry)
        credentials = reg.credentials()
        request = JobRequest(
            registry=job.registry,
            repository=ref.repository,
            tag=ref.tag,
            digest=ref.digest,
            plain_http=reg.use_plain_http(),
            username=credentials.username if credentials else None,
            password=credentials.password if credentials else None,
            request_attempts=self.config.retry.request_attempts,
            max_connections=reg.max_connections,
            options=options_to_wire(options),
            memory_limit=isolation.memory_limit,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return await run_isolated(request, isolation.timeout, progress, job.id)

    async def _run(self, job: Job) -> None:
        self.publish(job)
        started = time.monotonic()
        progress = _JobProgress(job, self.store, self.publish)
        first_tag = job.tags[0] if job.tags else None
        rule = Rule.model_validate(job.options)
        try:
            ref = ImageRef(job.registry, job.repository, tag=first_tag, digest=job.digest)
            options = rule.options(self.config.cache_repo, self.config.limits)
            try:
                result = await self._convert(job, ref, options, progress.callbacks())
            finally:
                await progress.drain()
            client = await self.clients.get(job.registry)
            done = {first_tag}
            while pending := [t for t in await self._stored_tags(job) if t not in done]:  # tags that arrived meanwhile
                for tag in pending:
                    await _retag(client, job, result.digest, f"{tag}{rule.suffix}")
                    done.add(tag)
        except NotConvertible as e:
            job.state, job.skip_reason, job.finished_at = "skipped", str(e), time.time()
            await self.store.save(job)
            self.publish(job)
            return
        except (ConversionLimitError, ReferenceError) as e:  # retrying cannot help
            await self._fail(job, str(e))
            return
        except (ConversionError, RegistryError, OSError) as e:
            await self._retry_or_fail(job, str(e))
            return
        if rule.profile is not None:
            await self._profile(job, rule.profile, result.digest)
        job.state, job.finished_at, job.last_error = "succeeded", time.time(), None
        job.target, job.target_digest = str(result.target), result.digest
        job.layers = result.layers_converted + result.layers_reused
        job.bytes_in, job.bytes_out = result.bytes_in, result.bytes_out
        job.size_before, job.size_after = result.size_before, result.size_after
        await self.store.save(job)
        self.metrics.duration.observe(time.monotonic() - started)
        self.metrics.bytes_in.inc(result.bytes_in)
        self.metrics.bytes_out.inc(result.bytes_out)
        self.publish(job)
        await self.on_finished(job)

    async def _profile(self, job: Job, rule: ProfileRule, digest: str) -> None:
        """The profile step (``auto_profile``) for the converted image ``digest``: its outcome
        goes to ``job.progress["profile"]`` and one log line; it never fails the job."""
        try:
            outcome = await self._profile_outcome(job, rule, digest)
        except asyncio.CancelledError:
            log.info("job %s: profile %r stopped: the service is stopping", job.id, rule.label)
            raise
        job.progress["profile"] = outcome.to_progress()
        level = logging.WARNING if outcome.state == "failed" else logging.INFO
        log.log(level, "job %s: %s/%s@%s: %s", job.id, job.registry, job.repository, digest, outcome.describe())
        await self.store.save(job)
        self.publish(job)

    async def _profile_outcome(self, job: Job, rule: ProfileRule, digest: str) -> auto_profile.ProfileOutcome:
        if why := auto_profile.missing_prerequisite():
            return auto_profile.ProfileOutcome("skipped", rule.label, error=why)
        job.progress["profile"] = {"state": "running", "label": rule.label}
        self.publish(job)
        if self._swept is not None:
            await asyncio.shield(self._swept)
        try:
            run_dir, runc_root = auto_profile.new_run(auto_profile.work_root(self.config.data_dir))
        except OSError as e:
            return auto_profile.ProfileOutcome("failed", rule.label, error=f"cannot create a run directory: {e}")
        reg = self.config.registry(job.registry)
        credentials = reg.credentials()
        request = auto_profile.ProfileRequest(
            registry=job.registry,
            repository=job.repository,
            digest=digest,
            plain_http=reg.use_plain_http(),
            username=credentials.username if credentials else None,
            password=credentials.password if credentials else None,
            request_attempts=self.config.retry.request_attempts,
            max_connections=reg.max_connections,
            label=rule.label,
            seconds=rule.seconds,
            memory_limit=rule.memory_limit,
            run_dir=str(run_dir),
            runc_root=str(runc_root),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return await auto_profile.record_profile(request, job.id)

    async def _stored_tags(self, job: Job) -> list[str]:
        stored = await self.store.get(job.id)
        return stored.tags if stored else job.tags

    async def _retry_or_fail(self, job: Job, error: str) -> None:
        job.last_error = error
        retry = self.config.retry
        if job.attempts < retry.attempts:
            backoff = min(retry.base_delay * 2 ** (job.attempts - 1), retry.max_delay)
            job.state, job.next_attempt_at = "queued", time.time() + backoff * random.uniform(0.5, 1.0)
            log.info("job %s attempt %d failed (%s); retrying", job.id, job.attempts, error)
            await self.store.save(job)
            self.publish(job)
            return
        await self._fail(job, error)

    async def _fail(self, job: Job, error: str) -> None:
        job.state, job.finished_at, job.last_error = "failed", time.time(), error
        log.warning("job %s failed after %d attempt(s): %s", job.id, job.attempts, error)
        await self.store.save(job)
        self.publish(job)
        await self.on_finished(job)


async def _retag(client: RegistryClient, job: Job, digest: str, target_tag: str) -> None:
    """Give another source tag of the same digest its own accelerated tag (no conversion)."""
    manifest = await client.get_manifest(job.repository, digest)
    await client.put_manifest(job.repository, target_tag, manifest.data, manifest.media_type)


class _JobProgress:
    """Per-layer progress on the job record, saved and published as it moves. Progress
    callbacks are synchronous: saves run in one background task that writes the job's latest
    state (``drain`` waits for it).

    ``job.progress``: totals (``layers_started``, ``layers_done``, ``layers_reused``,
    ``bytes_total``, ``bytes_done``: downloaded bytes of the layers started) and ``layers``,
    one ``{"digest", "size", "bytes_done", "state"}`` per layer started or reused, in that
    order; ``state`` is ``downloading``, ``converting`` (all bytes in), ``done`` or ``reused``."""

    def __init__(self, job: Job, store: JobStore, publish: Callable[[Job], None]) -> None:
        self.job, self.store, self.publish = job, store, publish
        job.progress = {"layers_started": 0, "layers_done": 0, "layers_reused": 0, "bytes_total": 0, "bytes_done": 0,
                        "layers": []}  # fmt: skip
        self._layers: dict[str, dict[str, Any]] = {}
        self._last = 0.0
        self._dirty = False
        self._saving: asyncio.Task[None] | None = None

    def callbacks(self) -> Progress:
        return Progress(on_layer_start=self._start, on_bytes=self._bytes, on_layer_done=self._done)

    def _layer(self, digest: str, size: int, state: str) -> dict[str, Any]:
        layer = self._layers.get(digest)
        if layer is None:
            layer = self._layers[digest] = {"digest": digest, "size": size, "bytes_done": 0, "state": state}
            self.job.progress["layers"].append(layer)
        return layer

    def _start(self, digest: str, size: int) -> None:
        self.job.progress["layers_started"] += 1
        self.job.progress["bytes_total"] += size
        self._layer(digest, size, "downloading")
        self._save()

    def _bytes(self, digest: str, n: int) -> None:
        self.job.progress["bytes_done"] += n
        layer = self._layer(digest, 0, "downloading")
        layer["bytes_done"] += n
        if layer["bytes_done"] >= layer["size"]:
            layer["state"] = "converting"
        if time.monotonic() - self._last > 0.5:
            self._last = time.monotonic()
            self._save()  # (other replicas' watchers read progress from the store)

    def _done(self, digest: str, reused: bool) -> None:
        self.job.progress["layers_done"] += 1
        if reused:
            self.job.progress["layers_reused"] += 1
        self._layer(digest, 0, "reused")["state"] = "reused" if reused else "done"
        self._save()

    def _save(self) -> None:
        self.publish(self.job)
        self._dirty = True
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.store.save(self.job)
            except STORE_ERRORS as e:  # progress only: the job's own saves report the outage
                log.warning("job %s: progress not saved: %s", self.job.id, e)

    async def drain(self) -> None:
        if self._saving is not None:
            await self._saving
