"""Durable conversion jobs and outbound notification deliveries.

``JobStore`` is the (async) interface the service and workers use; ``SQLiteJobStore`` (WAL
mode, one file in the data directory) is the embedded default for one replica, and
``service.postgres_store.PostgresJobStore`` the store several replicas share (``store.url``).

A job is keyed by (registry, repository, manifest digest, mode, format version): however many
events name an image, it is one job. Tags seen for that digest accumulate on the job.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from imgaccel.prewarm.store import StoreUnavailable as StoreUnavailable
from imgaccel.prewarm.store import open_sqlite  # one error for the jobs' and the tasks' store

# What a store raises when it cannot read or write (the service answers 503 for these).
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, StoreUnavailable)

JobState = Literal["queued", "running", "succeeded", "failed", "skipped"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "skipped"})


@dataclass
class Job:
    id: str
    key: str
    state: JobState
    registry: str
    repository: str
    digest: str
    tags: list[str]
    mode: str
    options: dict[str, Any]  # the matched rule (compression, suffix, platforms)
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    skip_reason: str | None = None
    target: str | None = None  # e.g. 127.0.0.1:5000/app:v1_accelerated (by digest when untagged)
    target_digest: str | None = None
    layers: int = 0
    bytes_in: int = 0  # downloaded for this job (0 when every layer was reused)
    bytes_out: int = 0  # uploaded for this job
    size_before: int = 0  # the source layers
    size_after: int = 0  # the index blobs (index mode) or the converted layers (full mode)
    progress: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Delivery:
    id: str
    job_id: str
    url: str
    payload: str  # the exact body sent
    format: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    created_at: float = 0.0
    expires_at: float = 0.0


class JobStore(Protocol):
    shared: bool  # several replicas use it: a change may come from another process

    def start(self) -> None:
        """Background work of the store (lease heartbeats); call inside the event loop."""

    async def close(self) -> None: ...

    async def enqueue(
        self, registry: str, repository: str, digest: str, tag: str | None, mode: str, options: dict[str, Any], key: str
    ) -> tuple[Job, bool]:
        """The job for ``key``, created if new (True). A new tag on a finished job requeues it."""

    async def get(self, job_id: str) -> Job | None: ...

    async def list_jobs(self, state: str | None, repository: str | None, limit: int, offset: int) -> list[Job]: ...

    async def claim(self, now: float) -> Job | None:
        """Atomically move the oldest due queued job to running (attempts + 1)."""

    async def save(self, job: Job) -> None:
        """Persist every field of ``job`` (its tags are merged with the stored ones)."""

    async def requeue_running(self, max_attempts: int) -> tuple[int, int]:
        """At start-up: running jobs whose runner is gone go back to queued, except those that
        already had ``max_attempts`` attempts, which fail (a job that stops the service each
        time must not loop). Returns (requeued, failed)."""

    async def counts(self) -> dict[str, int]: ...

    async def add_delivery(self, delivery: Delivery) -> None: ...

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Pending deliveries due now, claimed for this process."""

    async def save_delivery(self, delivery: Delivery) -> None: ...

    async def deliveries(self, job_id: str) -> list[Delivery]: ...

    async def ping(self) -> None:
        """A write round trip: raises when the store cannot record jobs (for /readyz)."""

    def release(self, job_id: str) -> None:
        """This process no longer works on the job (it could not save it): its lease may lapse."""

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Whether this process holds the lock ``name`` among all users of the store, for the
        ``async with`` block (one reconciler pass at a time)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  key TEXT UNIQUE NOT NULL,
  state TEXT NOT NULL,
  repository TEXT NOT NULL,
  next_attempt_at REAL NOT NULL,
  created_at REAL NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_attempt_at, created_at);
CREATE INDEX IF NOT EXISTS jobs_repo ON jobs(repository, created_at);
CREATE TABLE IF NOT EXISTS deliveries (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  state TEXT NOT NULL,
  next_attempt_at REAL NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries(job_id);
"""


class SQLiteJobStore:
    """Jobs in one SQLite file. Indexed columns for queries; the full record as JSON. One
    replica: its calls are quick local writes, made on the event loop."""

    shared = False

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, _SCHEMA)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        self._db.close()

    def release(self, job_id: str) -> None:
        pass  # requeue_running at the next start puts it back

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[bool]:
        yield True  # one process uses the file

    @staticmethod
    def _job(body: str) -> Job:
        return Job(**json.loads(body))

    def _write(self, job: Job) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO jobs (id, key, state, repository, next_attempt_at, created_at, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.key,
                job.state,
                job.repository,
                job.next_attempt_at,
                job.created_at,
                json.dumps(job.to_json()),
            ),
        )

    async def enqueue(
        self, registry: str, repository: str, digest: str, tag: str | None, mode: str, options: dict[str, Any], key: str
    ) -> tuple[Job, bool]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT body FROM jobs WHERE key = ?", (key,)).fetchone()
            if row:
                job = self._job(row[0])
                if tag and tag not in job.tags:
                    job.tags.append(tag)
                    if job.state in TERMINAL:  # push the new tag's twin (layers are reused)
                        job.state, job.next_attempt_at, job.attempts = "queued", 0.0, 0
                    self._write(job)
                self._db.execute("COMMIT")
                return job, False
            now = time.time()
            job = Job(
                id=uuid.uuid4().hex[:16],
                key=key,
                state="queued",
                registry=registry,
                repository=repository,
                digest=digest,
                tags=[tag] if tag else [],
                mode=mode,
                options=options,
                created_at=now,
            )
            self._write(job)
            self._db.execute("COMMIT")
            return job, True
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row[0]) if row else None

    async def list_jobs(self, state: str | None, repository: str | None, limit: int, offset: int) -> list[Job]:
        sql, args = "SELECT body FROM jobs WHERE 1=1", []
        if state:
            sql += " AND state = ?"
            args.append(state)
        if repository:
            sql += " AND repository = ?"
            args.append(repository)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        rows = self._db.execute(sql, (*args, limit, offset)).fetchall()
        return [self._job(r[0]) for r in rows]

    async def claim(self, now: float) -> Job | None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT body FROM jobs WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY created_at LIMIT 1",
                (now,),
            ).fetchone()
            if not row:
                self._db.execute("COMMIT")
                return None
            job = self._job(row[0])
            job.state, job.attempts, job.started_at, job.finished_at = "running", job.attempts + 1, now, None
            self._write(job)
            self._db.execute("COMMIT")
            return job
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def save(self, job: Job) -> None:
        # Tags only accumulate: a tag recorded by an event while a worker held the job survives.
        row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job.id,)).fetchone()
        if row:
            job.tags += [t for t in self._job(row[0]).tags if t not in job.tags]
        self._write(job)

    async def requeue_running(self, max_attempts: int) -> tuple[int, int]:
        jobs = [self._job(r[0]) for r in self._db.execute("SELECT body FROM jobs WHERE state = 'running'")]
        failed = 0
        for job in jobs:
            if job.attempts >= max_attempts:
                job.state, job.finished_at = "failed", time.time()
                job.last_error = f"the service stopped during each of its {job.attempts} attempts"
                failed += 1
            else:
                job.state, job.next_attempt_at = "queued", 0.0
            self._write(job)
        return len(jobs) - failed, failed

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("queued", "running", "succeeded", "failed", "skipped"), 0)
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    async def add_delivery(self, delivery: Delivery) -> None:
        await self.save_delivery(delivery)

    async def save_delivery(self, delivery: Delivery) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO deliveries (id, job_id, state, next_attempt_at, body) VALUES (?, ?, ?, ?, ?)",
            (delivery.id, delivery.job_id, delivery.state, delivery.next_attempt_at, json.dumps(asdict(delivery))),
        )

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        rows = self._db.execute(
            "SELECT body FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return [Delivery(**json.loads(r[0])) for r in rows]

    async def deliveries(self, job_id: str) -> list[Delivery]:
        rows = self._db.execute("SELECT body FROM deliveries WHERE job_id = ?", (job_id,)).fetchall()
        return [Delivery(**json.loads(r[0])) for r in rows]

    async def ping(self) -> None:
        self._db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))
