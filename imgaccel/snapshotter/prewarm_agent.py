"""The node daemon's side of prewarm tasks: poll the service, warm what it assigns.

Every ``poll_seconds`` the agent sends the node's labels, the progress of its assignments and
its chunk cache's stats (for the console's nodes page) to ``POST
<service>/api/v1/prewarm/nodes/<name>/poll`` and gets back the assignments still to do (the
node takes no inbound connection). Each assignment is an image pinned by digest: the
agent opens it lazily, as a pull would (through the cache nodes, into the node's chunk cache),
and fetches the chunks of its profile (``hot``) or every chunk (``full``, at the assignment's
bandwidth if any). An assignment that disappears from the answers (the task was cancelled or
finished) is stopped. A service that cannot be reached is retried at the next poll; the
assignments already running go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import Awaitable, Callable

import aiohttp
from pydantic import ValidationError

from imgaccel.formats.prewarm import (
    TERMINAL_TARGET,
    Assignment,
    NodeCacheStats,
    NodePoll,
    NodePollAnswer,
    NodeReport,
)
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef, ReferenceError, parse_reference
from imgaccel.reader.accelerated_image import AcceleratedImage, ImageOpenError
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.prefetch import fetch_rest, replay_profile
from imgaccel.reader.profiles import find_profile
from imgaccel.snapshotter.config import PrewarmAgentConfig
from imgaccel.snapshotter.status import PrewarmStatus

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (task id, image reference)
# What the agent needs of the daemon: the image opened lazily, and its registry client.
OpenImage = Callable[[ImageRef, str], Awaitable[AcceleratedImage]]
ClientFor = Callable[[str], Awaitable[RegistryClient]]
CacheStatsOf = Callable[[], NodeCacheStats]  # called in a thread (it may walk the cache directory)
REPORT_INTERVAL = 1.0  # seconds between progress updates kept for the next poll
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class PollError(Exception):
    """The service refused or could not answer a poll; one line."""


def chunk_cache_stats(cache: ChunkCache) -> NodeCacheStats:
    """What a poll reports of the node's chunk cache: its bytes on disk (walked: call it in a
    thread), and this process's lookups: hits (from memory or disk), misses (no entry, or a
    damaged one that was dropped)."""
    s = cache.stats
    return NodeCacheStats(cached_bytes=cache.size(), hits=s.hits, misses=s.misses + s.corrupt)


class PrewarmAgent:
    def __init__(self, config: PrewarmAgentConfig, open_image: OpenImage, client_for: ClientFor,
                 cache_stats: CacheStatsOf | None = None) -> None:  # fmt: skip
        self.config = config
        self.open_image = open_image
        self.client_for = client_for
        self.cache_stats = cache_stats  # None: polls carry no chunk-cache stats
        self.labels = {"kubernetes.io/arch": _ARCH.get(platform.machine(), platform.machine()), **config.labels}
        self.poll_seconds = config.poll_seconds
        self.polls = 0
        self.last_error: str | None = None
        self._work: dict[Key, asyncio.Task[None]] = {}
        self._reports: dict[Key, NodeReport] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._work.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.token.get()}"} if self.config.token else {}
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                try:
                    self._apply(await self._poll(session))
                    if self.last_error is not None:
                        log.info("prewarm: %s answers again", self.config.service)
                    self.last_error = None
                except (PollError, aiohttp.ClientError, TimeoutError) as e:
                    why = str(e) or type(e).__name__
                    if why != self.last_error:
                        log.warning("prewarm: cannot poll %s: %s", self.config.service, why)
                    self.last_error = why
                await asyncio.sleep(self.poll_seconds)

    async def _poll(self, session: aiohttp.ClientSession) -> NodePollAnswer:
        sent = dict(self._reports)
        stats = await asyncio.to_thread(self.cache_stats) if self.cache_stats is not None else None
        poll = NodePoll(labels=self.labels, reports=list(sent.values()), chunk_cache=stats)
        # Without stats the field is left out, not null: what services older than it accept.
        body = poll.model_dump(mode="json", exclude={"chunk_cache"} if stats is None else None)
        url = f"{self.config.service}/api/v1/prewarm/nodes/{self.config.node_name}/poll"
        async with session.post(url, json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise PollError(f"POST {url} answered {resp.status}: {' '.join(text.split())[:200]}")
        try:
            answer = NodePollAnswer.model_validate_json(text)
        except ValidationError as e:
            raise PollError(f"POST {url}: not a poll answer: {e.errors()[0]['msg']}") from None
        self.polls += 1
        for key, report in sent.items():  # delivered: a finished one need not be sent again
            if report.state in TERMINAL_TARGET and self._reports.get(key) is report:
                del self._reports[key]
        return answer

    def _apply(self, answer: NodePollAnswer) -> None:
        self.poll_seconds = answer.poll_seconds
        wanted = {(a.task_id, a.reference): a for a in answer.assignments}
        for key, work in list(self._work.items()):
            if key not in wanted:
                if not work.done():
                    log.info("prewarm %s: %s no longer assigned; stopped", *key)
                    work.cancel()
                del self._work[key]
        for key, a in wanted.items():
            if key not in self._work:
                self._work[key] = asyncio.create_task(self._warm(a))

    async def _warm(self, a: Assignment) -> None:
        key = (a.task_id, a.reference)
        report = NodeReport(task_id=a.task_id, reference=a.reference, state="running", bytes_total=a.bytes_total)
        self._reports[key] = report
        image: AcceleratedImage | None = None
        try:
            ref = parse_reference(a.reference)
            image = await self.open_image(ref.with_digest(a.top_digest), a.platform)
            progress = asyncio.create_task(self._follow(report, image))
            try:
                await self._fetch(a, image)
            finally:
                progress.cancel()
            report.state = "succeeded"
            log.info("prewarm %s: %s warmed (%s, %d bytes fetched)", a.task_id, a.reference, a.mode,
                     image.bytes_fetched())  # fmt: skip
        except (ImageOpenError, RegistryError, ReferenceError, ValueError, OSError) as e:
            report.state, report.error = "failed", f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            log.warning("prewarm %s: %s: %s", a.task_id, a.reference, report.error)
        finally:
            if image is not None:
                report.bytes_done = image.bytes_fetched()
            self._reports[key] = report.model_copy()

    async def _fetch(self, a: Assignment, image: AcceleratedImage) -> None:
        if a.mode == "hot":
            client = await self.client_for(image.ref.registry)
            profile = await find_profile(client, image, a.label)
            if profile is None:
                raise ValueError(f"{a.reference}: no profile labelled {a.label!r} for this platform")
            cached = await replay_profile(image, profile)
            if cached < len(profile.chunks):
                missing = len(profile.chunks) - cached
                raise ValueError(f"{a.reference}: {missing} of the profile's {len(profile.chunks)} chunks "
                                 "could not be fetched (see the daemon's log)")  # fmt: skip
        else:
            await fetch_rest(image, float(a.bandwidth) if a.bandwidth else float("inf"))

    async def _follow(self, report: NodeReport, image: AcceleratedImage) -> None:
        key = (report.task_id, report.reference)
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            report.bytes_done = image.bytes_fetched()
            self._reports[key] = report.model_copy()

    def describe(self) -> PrewarmStatus:
        """For ``node status``."""
        return PrewarmStatus(service=self.config.service, node_name=self.config.node_name, labels=self.labels,
                             polls=self.polls, last_error=self.last_error,
                             assignments=list(self._reports.values()))  # fmt: skip
