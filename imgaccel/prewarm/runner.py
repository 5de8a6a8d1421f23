"""The prewarm scheduler: creates tasks (planned, checked against the quota), runs at most
``max_running`` at once in creation order, fills cache-node targets itself, hands node targets
their assignments through node polls, and keeps every task's status durable and published.

A cache-node target receives the blobs rendezvous hashing gives it, fetched *through* it
(``?ns=<registry>``, the cluster token): whole blobs (``full``: the cache node fills and
verifies them, this side checks the digest again) or the hot chunks in multi-range requests
listing each chunk's digest (``hot``: the cache node verifies and keeps each one). A 429 from
the registry, relayed by the cache node or met while planning, marks the task ``throttled``,
halves its requests in flight and waits for ``Retry-After``. A node target is done when the
node reports every image done; a node silent for ``node_timeout`` fails. After a restart,
tasks that were running run again: finished targets are kept, unfinished ones start over
(what a cache node stored already is answered from its store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from imgaccel.formats.cache_chunks import CHUNKS_HEADER, format_chunks
from imgaccel.formats.prewarm import (
    TERMINAL_TARGET,
    TERMINAL_TASK,
    Assignment,
    BlobPlan,
    ImagePlan,
    ImageProgress,
    NodePoll,
    NodePollAnswer,
    NodeRecord,
    NodeReport,
    Plan,
    TargetProgress,
    Task,
    TaskSpec,
    Template,
    parse_selector,
    selector_matches,
)
from imgaccel.formats.rendezvous import rendezvous_order
from imgaccel.formats.sizes import format_size
from imgaccel.prewarm.config import PrewarmConfig
from imgaccel.prewarm.limits import AdaptiveLimit, Pacer
from imgaccel.prewarm.planner import PlanError, plan_image, summarize
from imgaccel.prewarm.store import PrewarmStore, StoreUnavailable
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RETRY_STATUSES, RegistryClient, RetryPolicy
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ReferenceError, parse_reference
from imgaccel.reader.accelerated_image import host_platform_label

log = logging.getLogger(__name__)
ClientFactory = Callable[[str, Credentials | None], RegistryClient]  # registry endpoint -> a new client
# Registry requests of planning wait out 429s; requests through cache nodes fail fast (a cache
# node that is down fails its share of the task) and hand 429s to the task (``_fetch``).
THROTTLE_RETRY = RetryPolicy(attempts=12, base_delay=0.5, max_delay=60.0)
CACHE_NODE_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=5.0, statuses=RETRY_STATUSES - {429})
MAX_THROTTLED = 30  # 429s one request of a task waits out before its target fails
MAX_THROTTLE_WAIT = 60.0
CACHE_NODE_USER = "imgaccel-prewarm"
BATCH_BYTES = 4 << 20  # hot chunks asked in one multi-range request, together at most this much
BATCH_RANGES = 64
SAVE_INTERVAL = 0.5  # seconds between progress writes of one task
STALE_PLANNING = 600.0  # a task still "planning" this long after creation was abandoned
RESUME_INTERVAL = 2.0  # seconds between looks for tasks whose replica is gone (shared stores)
Batch = list[tuple[int, int, str | None]]  # hot chunks of one request: (offset, length, compressed digest)
_FETCH_ERRORS = (RegistryError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class TaskRefused(Exception):
    """A task cannot be created; ``plan`` is set when it was planned (over the quota)."""

    def __init__(self, message: str, plan: Plan | None = None, task: Task | None = None) -> None:
        super().__init__(message)
        self.plan, self.task = plan, task


@dataclass
class _Running:
    task: Task
    limit: AdaptiveLimit
    pacer: Pacer
    job: asyncio.Task[None] | None = None
    last_save: float = 0.0
    throttles: int = 0
    clients: list[RegistryClient] = field(default_factory=list)
    dirty: bool = False  # progress not yet written
    writer: asyncio.Task[None] | None = None


class PrewarmRunner:
    def __init__(self, config: PrewarmConfig, store: PrewarmStore, make_client: ClientFactory,
                 publish: Callable[[Task], None]) -> None:  # fmt: skip
        self.config = config
        self.store = store
        self.make_client = make_client
        self.publish = publish
        self.platform = config.platform or host_platform_label()
        self.wakeup = asyncio.Event()
        self._running: dict[str, _Running] = {}
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.store.start()
        for task in await self.store.in_states(("planning",)):
            if time.time() - task.created_at > STALE_PLANNING:
                await self._finish(task, "failed", "the service stopped while planning it; create it again")
        await self._resume()
        self._loop_task = asyncio.create_task(self._loop())

    async def _resume(self) -> None:
        """Tasks whose replica is gone (this one, restarted, or another) run again."""
        for task in await self.store.resume():
            task.message = "resumed: the service that ran it stopped"
            for t in task.targets:
                if t.kind == "cachenode" and t.state not in TERMINAL_TARGET:
                    t.state, t.bytes_done, t.error = "pending", 0, None
            await self.store.save(task)
            log.info("prewarm %s: resumed", task.id)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        runs = list(self._running.values())
        for run in runs:
            if run.job is not None:
                run.job.cancel()
        for run in runs:
            for work in (run.job, run.writer):  # the last progress write too, before the store closes
                if work is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
        await self.store.close()

    async def _loop(self) -> None:
        last_resume = time.monotonic()
        while True:
            try:
                while task := await self.store.claim(self.config.max_running):
                    await self._launch(task)
                if self.store.shared and time.monotonic() - last_resume > RESUME_INTERVAL:
                    last_resume = time.monotonic()
                    await self._resume()
            except StoreUnavailable as e:  # a database outage: try again shortly
                log.warning("prewarm: %s", e)
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), 1.0)

    async def _launch(self, task: Task) -> None:
        task.state, task.message, task.attempts = "running", None, task.attempts + 1
        task.started_at = task.started_at or time.time()
        task.concurrency = task.spec.registry_concurrency or self.config.registry_concurrency
        run = _Running(task, AdaptiveLimit(task.concurrency), Pacer(task.spec.bandwidth))
        self._running[task.id] = run
        await self.store.save(task)
        self.publish(task)
        run.job = asyncio.create_task(self._run(run))

    # -- creating ------------------------------------------------------------------------

    async def create(self, spec: TaskSpec, dry_run: bool = False) -> tuple[Task, Plan]:
        """Plan ``spec`` and store it as a queued task (``dry_run``: plan only). TaskRefused."""
        spec = await self._with_template(spec)
        if not spec.images:
            raise TaskRefused("no images: name at least one reference or a template")
        if spec.credentials is not None and spec.credentials not in self.config.credentials:
            raise TaskRefused(f"credentials {spec.credentials!r} are not configured (prewarm.credentials)")
        kind, targets = await self._targets(spec)
        task = Task(id=uuid.uuid4().hex[:12], spec=spec, state="planning", created_at=time.time())
        if not dry_run:
            await self.store.save(task)
        try:
            images = await self._plan_images(spec, need_accelerated=kind == "node")
        except TaskRefused as e:
            if not dry_run:
                await self._finish(task, "failed", str(e))
            raise TaskRefused(str(e), task=task) from None
        plan = summarize(images, targets, kind, self.config.quota)
        if plan.total_bytes > plan.quota:
            message = (
                f"the plan moves {format_size(plan.total_bytes)} ({plan.total_bytes} bytes) to {len(targets)} "
                f"target(s), over the per-task quota of {format_size(plan.quota)} ({plan.quota} bytes)"
            )
            if not dry_run:
                task.plan = plan
                await self._finish(task, "failed", f"refused: {message}")
            raise TaskRefused(message, plan, task)
        task.plan = plan
        task.targets = [self._target(name, kind, images, plan) for name in targets]
        task.state = "queued"
        if not dry_run:
            await self.store.save(task)
            self.publish(task)
            self.wakeup.set()
        return task, plan

    async def _with_template(self, spec: TaskSpec) -> TaskSpec:
        if spec.template is None:
            return spec
        template = await self.store.template(spec.template)
        if template is None:
            raise TaskRefused(f"no template named {spec.template!r}")
        given = spec.model_dump(include=spec.model_fields_set - {"template"})
        if not given.get("images"):
            given.pop("images", None)
        return template.spec.model_copy(update=given)

    async def _targets(self, spec: TaskSpec) -> tuple[str, list[str]]:
        if spec.nodes is None:
            if not self.config.cache_nodes:
                raise TaskRefused("no cache nodes are configured (prewarm.cache_nodes) and no node selector was given")
            return "cachenode", [c.address for c in self.config.cache_nodes]
        requirements = parse_selector(spec.nodes)
        seen = await self.store.nodes(time.time() - self.config.node_seen_seconds)
        names = [n.name for n in seen if selector_matches(requirements, n.labels)]
        if not names:
            known = ", ".join(f"{n.name} {n.labels}" for n in seen[:10]) or "none"
            raise TaskRefused(f"no node matches {spec.nodes!r} (nodes seen in the last "
                              f"{self.config.node_seen_seconds:.0f} s: {known})")  # fmt: skip
        return "node", names

    async def _plan_images(self, spec: TaskSpec, need_accelerated: bool) -> list[ImagePlan]:
        platform = spec.platform or self.platform
        credentials = self.config.credentials[spec.credentials].get() if spec.credentials else None
        images = []
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[str, RegistryClient] = {}
            for text in spec.images:
                try:
                    ref = parse_reference(text)
                except ReferenceError as e:
                    raise TaskRefused(f"image {text!r}: {e}") from None
                if ref.registry not in clients:
                    clients[ref.registry] = await stack.enter_async_context(self.make_client(ref.registry, credentials))
                try:
                    images.append(await plan_image(clients[ref.registry], ref, text, spec.mode, spec.label,
                                                   platform, need_accelerated))  # fmt: skip
                except PlanError as e:
                    raise TaskRefused(str(e)) from None
        return images

    def _target(self, name: str, kind: str, images: list[ImagePlan], plan: Plan) -> TargetProgress:
        progress = []
        for image in images:
            mine = [b for b in image.blobs if kind == "node" or rendezvous_order(plan.targets, b.digest)[0] == name]
            progress.append(ImageProgress(reference=image.reference, bytes_total=sum(b.bytes for b in mine)))
        return TargetProgress(name=name, kind=kind, images=progress,  # type: ignore[arg-type]
                              bytes_total=sum(i.bytes_total for i in progress))  # fmt: skip

    # -- user actions --------------------------------------------------------------------

    async def cancel(self, task_id: str) -> Task | None:
        """Cancel ``task_id`` (run here or by another replica, which sees it at its next save)."""
        task = await self.store.get(task_id)
        if task is None or task.state in TERMINAL_TASK:
            return task
        run = self._running.get(task_id)
        if run is not None and run.job is not None:
            run.job.cancel()
            task = run.task
        for t in task.targets:
            if t.state not in TERMINAL_TARGET:
                t.state = "cancelled"
        await self._finish(task, "cancelled", None)
        return task

    async def save_template(self, task_id: str, name: str) -> Template:
        task = await self.store.get(task_id)
        if task is None:
            raise KeyError(task_id)
        images = [i.reference for i in task.plan.images] if task.plan else task.spec.images
        spec = task.spec.model_copy(update={"images": images, "template": None})
        template = Template(name=name, spec=spec, source_task=task.id, created_at=time.time())
        await self.store.save_template(template)
        return template

    # -- node polls ----------------------------------------------------------------------

    async def node_poll(self, name: str, poll: NodePoll) -> NodePollAnswer:
        """Any replica answers: the node's reports are stored (the replica running the task
        merges them), its assignments read from the running tasks."""
        now = time.time()
        await self.store.save_node(NodeRecord(name=name, labels=poll.labels, last_seen=now,
                                              chunk_cache=poll.chunk_cache))  # fmt: skip
        done: set[tuple[str, str]] = set()
        for report in poll.reports:
            await self.store.add_report(name, report)
            if report.state in TERMINAL_TARGET:
                done.add((report.task_id, report.reference))
            if (run := self._running.get(report.task_id)) is not None:
                self._apply_report(run, name, report, now)
        assignments = []
        for task in await self.store.in_states(("running", "throttled")):
            target = _find_target(task, name)
            if target is None or target.state in TERMINAL_TARGET or task.plan is None:
                continue
            for image, progress in zip(task.plan.images, target.images, strict=True):
                if progress.state in TERMINAL_TARGET or (task.id, image.reference) in done:
                    continue
                assignments.append(Assignment(
                    task_id=task.id, reference=image.reference, top_digest=image.top_digest,
                    platform=task.spec.platform or self.platform, mode=image.mode, label=task.spec.label,
                    bytes_total=progress.bytes_total, bandwidth=task.spec.bandwidth,
                ))  # fmt: skip
        return NodePollAnswer(assignments=assignments, poll_seconds=self.config.node_poll_seconds)

    def _apply_report(self, run: _Running, node: str, report: NodeReport, now: float) -> None:
        task = run.task
        if task.state in TERMINAL_TASK:
            return
        target = _find_target(task, node)
        if target is None or target.state in TERMINAL_TARGET:
            return
        changed = False
        for image in target.images:
            if image.reference == report.reference and image.state not in TERMINAL_TARGET:
                new = (report.state, report.bytes_done, report.error, report.bytes_total or image.bytes_total)
                if new != (image.state, image.bytes_done, image.error, image.bytes_total):
                    image.state, image.bytes_done, image.error, image.bytes_total = new
                    changed = True
        if changed:  # a node silent (or stuck) for node_timeout fails
            _roll_up(target)
            target.updated_at = now
            self._save(run)

    # -- running -------------------------------------------------------------------------

    async def _run(self, run: _Running) -> None:
        task = run.task
        try:
            kinds = {t.kind for t in task.targets}
            if kinds == {"cachenode"}:
                await self._fill_cache_nodes(run)
            else:
                await self._await_nodes(run)
            failed = [t for t in task.targets if t.state != "succeeded"]
            if failed:
                detail = "; ".join(f"{t.name}: {t.error or t.state}" for t in failed[:5])
                await self._finish(task, "failed", f"{len(failed)} of {len(task.targets)} targets failed: {detail}")
            else:
                await self._finish(task, "succeeded", None)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as e:  # its lease lapses: this or another replica runs it again
            log.error("prewarm %s: the store failed (%s); the task will run again", task.id, e)
            self.store.release(task.id)
        except Exception as e:  # a bug must not leave the task "running" forever
            log.exception("prewarm %s: failed", task.id)
            await self._finish(task, "failed", f"internal error: {type(e).__name__}: {e}")
        finally:
            for client in run.clients:
                await client.close()
            self._running.pop(task.id, None)
            self.wakeup.set()

    async def _finish(self, task: Task, state: str, error: str | None) -> None:
        task.state, task.error, task.finished_at = state, error, time.time()  # type: ignore[assignment]
        await self.store.save(task)
        self.publish(task)
        log.info("prewarm %s: %s%s", task.id, state, f": {error}" if error else "")

    def _save(self, run: _Running, force: bool = False) -> None:
        """Publish the task's progress, and write it (at most every ``SAVE_INTERVAL`` s unless
        ``force``) in the run's one background writer. A write the store refuses (the task was
        cancelled through another replica) stops the run."""
        self.publish(run.task)
        now = time.monotonic()
        if force or now - run.last_save >= SAVE_INTERVAL:
            run.last_save = now
            run.dirty = True
            if run.writer is None or run.writer.done():
                run.writer = asyncio.ensure_future(self._write(run))

    async def _write(self, run: _Running) -> None:
        while run.dirty:
            run.dirty = False
            try:
                saved = await self.store.save(run.task)
            except StoreUnavailable as e:
                log.warning("prewarm %s: progress not saved: %s", run.task.id, e)
                continue
            if not saved and run.job is not None and not run.job.done():
                log.info("prewarm %s: ended elsewhere (cancelled); stopping here", run.task.id)
                run.job.cancel()

    def _throttled(self, run: _Running, retry_after: float | None) -> float:
        """A 429 came back: show it, halve the requests in flight; the seconds to wait."""
        delay = min(retry_after if retry_after is not None else 1.0, MAX_THROTTLE_WAIT)
        run.throttles += 1
        before, after = run.limit.limit, run.limit.reduce()
        run.task.state, run.task.concurrency = "throttled", after
        run.task.message = (f"throttled by the registry (429, {run.throttles} so far): retrying in {delay:.1f} s "
                            f"with {after} request(s) in flight (was {before})")  # fmt: skip
        log.warning("prewarm %s: %s", run.task.id, run.task.message)
        self._save(run, force=True)
        return delay

    def _unthrottled(self, run: _Running) -> None:
        if run.task.state == "throttled":
            run.task.state = "running"
            run.task.message = f"was throttled by the registry {run.throttles} time(s); continuing"
            self._save(run, force=True)

    # cache-node targets

    async def _fill_cache_nodes(self, run: _Running) -> None:
        task = run.task
        assert task.plan is not None
        addresses = task.plan.targets
        async with asyncio.TaskGroup() as group:
            for target in task.targets:
                if target.state not in TERMINAL_TARGET:
                    group.create_task(self._fill_one(run, target, addresses))

    async def _fill_one(self, run: _Running, target: TargetProgress, addresses: list[str]) -> None:
        task = run.task
        assert task.plan is not None
        target.state, target.bytes_done, target.error = "running", 0, None
        node = next(c for c in self.config.cache_nodes if c.address == target.name)
        token = self.config.cache_node_token.get() if self.config.cache_node_token else None
        clients: dict[str, RegistryClient] = {}
        try:
            async with asyncio.TaskGroup() as group:
                for image, progress in zip(task.plan.images, target.images, strict=True):
                    mine = [b for b in image.blobs if rendezvous_order(addresses, b.digest)[0] == target.name]
                    if image.registry not in clients:
                        client = RegistryClient(
                            node.address, plain_http=node.plain_http, docker_config=False, namespace=image.registry,
                            credentials=Credentials(CACHE_NODE_USER, token) if token else None,
                            retry=CACHE_NODE_RETRY, max_connections=64,
                        )  # fmt: skip
                        clients[image.registry] = await client.__aenter__()
                        run.clients.append(client)
                    group.create_task(self._fill_image(run, target, progress, clients[image.registry], image, mine))
        except* _FETCH_ERRORS as eg:
            error = _first(eg)
            target.state, target.error = "failed", f"cache node {target.name}: {' '.join(str(error).split())[:300]}"
            for p in target.images:
                if p.state not in TERMINAL_TARGET:
                    p.state = "failed"
            log.warning("prewarm %s: %s", task.id, target.error)
        else:
            target.state = "succeeded"
        target.updated_at = time.time()
        self._save(run, force=True)

    async def _fill_image(self, run: _Running, target: TargetProgress, progress: ImageProgress,
                          client: RegistryClient, image: ImagePlan, blobs: list[BlobPlan]) -> None:  # fmt: skip
        progress.state, progress.bytes_done = "running", 0

        def moved(n: int) -> None:
            progress.bytes_done += n
            target.bytes_done += n
            self._save(run)

        try:
            async with asyncio.TaskGroup() as group:
                for blob in blobs:
                    for batch in _batches(blob):
                        group.create_task(self._fetch(run, client, image.repository, blob, batch, moved))
        except* _FETCH_ERRORS as eg:
            progress.state, progress.error = "failed", " ".join(str(_first(eg)).split())[:500]
            raise
        progress.state = "succeeded"

    async def _fetch(self, run: _Running, client: RegistryClient, repo: str, blob: BlobPlan,
                     batch: Batch | None, moved: Callable[[int], None]) -> None:  # fmt: skip
        for throttled in range(MAX_THROTTLED + 1):
            try:
                async with run.limit:
                    n = await self._fetch_once(client, repo, blob, batch, moved)
                break
            except RegistryError as e:
                if e.status != 429 or throttled == MAX_THROTTLED:
                    raise
                await asyncio.sleep(self._throttled(run, e.retry_after))
        self._unthrottled(run)
        await run.pacer.spent(n)

    @staticmethod
    async def _fetch_once(client: RegistryClient, repo: str, blob: BlobPlan, batch: Batch | None,
                          moved: Callable[[int], None]) -> int:  # fmt: skip
        """One request through a cache node; the bytes it moved."""
        if batch is None:  # the whole blob: the cache node fills it; its digest is checked here too
            got = 0

            def counted(n: int) -> None:
                nonlocal got
                got += n
                moved(n)

            try:
                await client.download_blob(repo, blob.digest, os.devnull, blob.size, progress=counted)
            except BaseException:
                moved(-got)  # a retry starts the blob again
                raise
            return blob.size
        listed = [(o, n, d) for o, n, d in batch if d is not None]
        headers = {CHUNKS_HEADER: format_chunks(listed)} if listed else None
        datas = await client.fetch_ranges(repo, blob.digest, [(o, o + n) for o, n, _ in batch], headers=headers)
        got = sum(len(d) for d in datas)
        moved(got)
        return got

    # node targets

    async def _await_nodes(self, run: _Running) -> None:
        task = run.task
        started = time.time()
        for t in task.targets:
            if t.state not in TERMINAL_TARGET:
                t.updated_at = max(t.updated_at, started)
        while True:
            now = time.time()
            try:  # reports that reached other replicas (the ones this replica got are applied already)
                for node, report in await self.store.reports(task.id):
                    self._apply_report(run, node, report, now)
            except StoreUnavailable as e:
                log.warning("prewarm %s: %s", task.id, e)
            for t in task.targets:
                if t.state not in TERMINAL_TARGET and now - t.updated_at > self.config.node_timeout:
                    t.state = "failed"
                    t.error = f"node {t.name}: no report for {self.config.node_timeout:.0f} s"
                    for p in t.images:
                        if p.state not in TERMINAL_TARGET:
                            p.state = "failed"
                    self._save(run, force=True)
            if all(t.state in TERMINAL_TARGET for t in task.targets):
                return
            await asyncio.sleep(1.0)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) task group's failure."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _find_target(task: Task, name: str) -> TargetProgress | None:
    return next((t for t in task.targets if t.kind == "node" and t.name == name), None)


def _roll_up(target: TargetProgress) -> None:
    target.bytes_done = sum(i.bytes_done for i in target.images)
    target.bytes_total = sum(i.bytes_total for i in target.images)
    states = {i.state for i in target.images}
    if states <= TERMINAL_TARGET:
        target.state = "succeeded" if states <= {"succeeded"} else "failed"
        failed = [i for i in target.images if i.state != "succeeded"]
        target.error = "; ".join(f"{i.reference}: {i.error or i.state}" for i in failed[:3]) or None
    elif "throttled" in states:
        target.state = "throttled"
    else:
        target.state = "running"


def _batches(blob: BlobPlan) -> list[Batch | None]:
    """Requests for one blob: ``[None]`` for the whole blob, else groups of its chunks."""
    if blob.chunks is None:
        return [None]
    out: list[Batch | None] = []
    batch: Batch = []
    size = 0
    end = -1
    for c in blob.chunks:
        overlaps = c.offset < end  # gzip chunks may share a byte: ranges of one request may not
        if batch and (overlaps or size + c.length > BATCH_BYTES or len(batch) >= BATCH_RANGES):
            out.append(batch)
            batch, size = [], 0
        batch.append((c.offset, c.length, c.digest))
        size += c.length
        end = c.offset + c.length
    if batch:
        out.append(batch)
    return out
