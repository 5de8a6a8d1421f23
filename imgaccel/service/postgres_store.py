"""Jobs and deliveries in PostgreSQL, shared by several ``imgaccel serve`` replicas (asyncpg).

The same ``JobStore`` interface as ``SQLiteJobStore``; what sharing needs is kept here:

* **One job per key across replicas.** ``enqueue`` inserts with ``ON CONFLICT (key) DO
  NOTHING``, one statement committed on its own (one round trip for a new job) before the
  caller answers 202; an event for a known job only reads it, unless it brings a new tag,
  which is added under ``SELECT ... FOR UPDATE``. The pool does not reset connections on
  release (one round trip less per statement): the store keeps no session state.
* **Leases.** ``claim`` takes the oldest due job with ``FOR UPDATE SKIP LOCKED`` and writes
  this replica's id and a lease (``lease_seconds``, on the database's clock) on it. A
  heartbeat renews the leases of the jobs this replica runs every third of that; a replica
  that dies stops renewing, and ``reap`` (every replica, periodically) puts jobs whose lease
  ran out back in the queue (or fails them after ``max_attempts``), so another replica resumes
  them. A replica that lost its lease (e.g. the database was unreachable for longer) cannot
  overwrite the job another replica now holds: ``save`` skips the write and logs it.
* **Deliveries** are claimed the same way (``due_deliveries`` moves their next attempt
  ``DELIVERY_CLAIM`` seconds ahead), so one replica sends each.
* **Locks.** ``lock(name)`` is a session advisory lock: one reconciler pass at a time.
* **Outages.** Every failure to reach the database raises ``StoreUnavailable`` (one line): the
  API answers 503 and the loops retry; asyncpg's pool reconnects when it is back.

The schema is versioned (``schema_version``) and upgraded by ``migrate`` under an advisory
lock: at start-up, or alone with ``imgaccel serve --migrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, fields
from typing import Any, Literal, TypeVar

import asyncpg

from imgaccel.service.job_store import TERMINAL, Delivery, Job, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy  # what a pool hands out
SCHEMA_VERSION = 1
MIGRATION_LOCK = 0x696D6761  # "imga": the advisory lock key migrations take
DELIVERY_CLAIM = 60.0  # seconds a claimed delivery is hidden from other replicas while it is sent
_NOW = "extract(epoch from clock_timestamp())"
# What a lost or broken database connection raises. InternalClientError: e.g. "cannot switch to
# state 12; another operation is in progress" when the server shut down in mid-query (the pool
# terminates such a connection when it is released).
_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError,
                ConnectionError)  # fmt: skip

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE probe (id INTEGER PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
    CREATE TABLE jobs (
      id TEXT PRIMARY KEY,
      key TEXT UNIQUE NOT NULL,
      state TEXT NOT NULL,
      repository TEXT NOT NULL,
      next_attempt_at DOUBLE PRECISION NOT NULL,
      created_at DOUBLE PRECISION NOT NULL,
      lease_owner TEXT,
      lease_until DOUBLE PRECISION,
      body TEXT NOT NULL
    );
    CREATE INDEX jobs_due ON jobs (state, next_attempt_at, created_at);
    CREATE INDEX jobs_repo ON jobs (repository, created_at);
    CREATE INDEX jobs_lease ON jobs (state, lease_until);
    CREATE TABLE deliveries (
      id TEXT PRIMARY KEY,
      job_id TEXT NOT NULL,
      state TEXT NOT NULL,
      next_attempt_at DOUBLE PRECISION NOT NULL,
      body TEXT NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_job ON deliveries (job_id);
    CREATE TABLE prewarm_tasks (
      id TEXT PRIMARY KEY,
      state TEXT NOT NULL,
      created_at DOUBLE PRECISION NOT NULL,
      lease_owner TEXT,
      lease_until DOUBLE PRECISION,
      body TEXT NOT NULL
    );
    CREATE INDEX prewarm_tasks_state ON prewarm_tasks (state, created_at);
    CREATE TABLE prewarm_templates (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE prewarm_nodes (name TEXT PRIMARY KEY, last_seen DOUBLE PRECISION NOT NULL, body TEXT NOT NULL);
    CREATE TABLE prewarm_reports (
      task_id TEXT NOT NULL,
      node TEXT NOT NULL,
      reference TEXT NOT NULL,
      body TEXT NOT NULL,
      PRIMARY KEY (task_id, node, reference)
    );
    """,
}


def _job(body: str) -> Job:
    return Job(**json.loads(body))


_JOB_FIELDS = tuple(f.name for f in fields(Job))


def _dump(job: Job) -> str:
    """The job's JSON: the document ``json.dumps(job.to_json())`` makes, without the deep copy
    of ``dataclasses.asdict`` (a job holds only JSON values): 14 instead of 75 µs per job on
    the 2-core test machine, a tenth of a replica's CPU per event at intake."""
    return json.dumps({name: getattr(job, name) for name in _JOB_FIELDS})


async def migrate(pool: asyncpg.Pool) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` (under an advisory lock: one replica migrates,
    the others wait and find it done). Returns the version found before."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            found = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            if found > SCHEMA_VERSION:
                raise StoreUnavailable(f"the database schema is version {found}, newer than this "
                                       f"imgaccel's {SCHEMA_VERSION}: upgrade imgaccel")  # fmt: skip
            for version in range(found + 1, SCHEMA_VERSION + 1):
                async with conn.transaction():
                    await conn.execute(MIGRATIONS[version])
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                log.info("job store schema upgraded to version %d", version)
            return int(found)
        finally:
            await _unlock(conn, MIGRATION_LOCK)


async def _unlock(conn: Connection, key: int) -> None:
    """Release the session advisory lock ``key``. When that fails the connection is closed
    rather than returned to the pool with the lock still held (the pool does not reset
    sessions: see ``_keep_session``)."""
    unlocked = False
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        unlocked = True
    except _UNAVAILABLE:
        pass
    finally:
        if not unlocked:
            conn.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing beyond asyncpg's own rollback of an
    unfinished transaction. This store leaves no session state behind (no SET, LISTEN or
    cursors; its advisory locks are released by ``_unlock``), so asyncpg's default reset query
    would only be one more round trip after every statement."""


async def schema_version(pool: asyncpg.Pool) -> int:
    """The schema version the database has (0: none, nothing was ever migrated)."""
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            return 0
        return int(await conn.fetchval("SELECT max(version) FROM schema_version") or 0)


class PostgresJobStore:
    shared = True  # several replicas: watchers re-read the store instead of waiting on this process

    def __init__(self, pool: asyncpg.Pool, lease_seconds: float, max_attempts: int) -> None:
        self.pool = pool
        self.owner = uuid.uuid4().hex[:12]  # this replica, in the leases it holds
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._held: set[str] = set()  # the jobs this replica runs: their leases are renewed
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, url: str, password: str | None, min_size: int, max_size: int, timeout: float,
                   lease_seconds: float, max_attempts: int,
                   schema: Literal["migrate", "check", "none"] = "migrate") -> PostgresJobStore:  # fmt: skip
        """Connect (StoreUnavailable when the database cannot be reached), then migrate the
        schema, or check that it is this imgaccel's (``store.migrate: off``), or neither
        (``serve --migrate`` migrates itself)."""
        try:
            pool = await asyncpg.create_pool(
                url, password=password, min_size=min_size, max_size=max_size, timeout=timeout,
                command_timeout=timeout, reset=_keep_session,
            )  # fmt: skip
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"job store {_safe(url)}: cannot connect: {_one_line(e)}") from None
        store = cls(pool, lease_seconds, max_attempts)
        try:
            if schema == "migrate":
                await store.migrate()
            elif schema == "check":
                await store.check_schema()
        except BaseException:
            await pool.close()
            raise
        return store

    async def migrate(self) -> int:
        """``migrate`` on this store's pool; the schema version found before."""
        return await self._call(lambda: migrate(self.pool))

    def start(self) -> None:
        """The lease heartbeat and the reaper of expired leases."""
        self._tasks = [
            asyncio.create_task(self._every(self.lease_seconds / 3, self._renew), name="imgaccel-lease-heartbeat"),
            asyncio.create_task(self._every(self.lease_seconds / 2, self.reap), name="imgaccel-lease-reaper"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()

    async def _every(self, seconds: float, fn: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except StoreUnavailable as e:
                log.warning("job store: %s", e)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except StoreUnavailable:
            raise
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"job store: {_one_line(e)}") from None

    # -- jobs ----------------------------------------------------------------------------

    async def enqueue(
        self, registry: str, repository: str, digest: str, tag: str | None, mode: str, options: dict[str, Any], key: str
    ) -> tuple[Job, bool]:
        now = time.time()
        new = Job(id=uuid.uuid4().hex[:16], key=key, state="queued", registry=registry, repository=repository,
                  digest=digest, tags=[tag] if tag else [], mode=mode, options=options, created_at=now)  # fmt: skip
        body = _dump(new)

        async def go() -> tuple[Job, bool]:
            async with self.pool.acquire() as conn:
                # A new job: one statement, committed on its own (one round trip).
                inserted = await conn.fetchval(
                    "INSERT INTO jobs (id, key, state, repository, next_attempt_at, created_at, body) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key) DO NOTHING RETURNING id",
                    new.id, key, new.state, repository, 0.0, now, body,
                )  # fmt: skip
                if inserted:
                    return new, True
                # A known job: nothing to write unless the event brings a new tag (tags only grow).
                row = await conn.fetchrow("SELECT body FROM jobs WHERE key = $1", key)
                if row is not None and (not tag or tag in _job(row["body"]).tags):
                    return _job(row["body"]), False
                async with conn.transaction():
                    row = await conn.fetchrow("SELECT body FROM jobs WHERE key = $1 FOR UPDATE", key)
                    if row is None:  # deleted meanwhile (by hand): insert again next time
                        raise StoreUnavailable(f"job store: job {key} vanished while it was being updated")
                    job = _job(row["body"])
                    if tag and tag not in job.tags:
                        job.tags.append(tag)
                        if job.state in TERMINAL:  # push the new tag's twin (layers are reused)
                            job.state, job.next_attempt_at, job.attempts = "queued", 0.0, 0
                        await self._write(conn, job, lease="keep")
                    return job, False

        return await self._call(go)

    async def _write(self, conn: Connection, job: Job, lease: Literal["keep", "clear", "mine"]) -> None:
        """Update the job's row; its lease is kept, cleared, or (``mine``) held by this replica
        for another ``lease_seconds``."""
        args: list[object] = [job.id, job.state, job.repository, job.next_attempt_at, _dump(job)]
        sql = "UPDATE jobs SET state = $2, repository = $3, next_attempt_at = $4, body = $5"
        if lease == "clear":
            sql += ", lease_owner = NULL, lease_until = NULL"
        elif lease == "mine":
            sql += f", lease_owner = $6, lease_until = {_NOW} + $7"
            args += [self.owner, self.lease_seconds]
        await conn.execute(sql + " WHERE id = $1", *args)

    async def get(self, job_id: str) -> Job | None:
        row = await self._call(lambda: self.pool.fetchrow("SELECT body FROM jobs WHERE id = $1", job_id))
        return _job(row["body"]) if row else None

    async def list_jobs(self, state: str | None, repository: str | None, limit: int, offset: int) -> list[Job]:
        sql = ("SELECT body FROM jobs WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR repository = $2) "
               "ORDER BY created_at DESC, id LIMIT $3 OFFSET $4")  # fmt: skip
        rows = await self._call(lambda: self.pool.fetch(sql, state, repository, limit, offset))
        return [_job(r["body"]) for r in rows]

    async def claim(self, now: float) -> Job | None:
        async def go() -> Job | None:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT body FROM jobs WHERE state = 'queued' AND next_attempt_at <= $1 "
                    "ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
                    now,
                )
                if row is None:
                    return None
                job = _job(row["body"])
                job.state, job.attempts, job.started_at, job.finished_at = "running", job.attempts + 1, now, None
                await conn.execute(
                    f"UPDATE jobs SET state = 'running', lease_owner = $2, lease_until = {_NOW} + $3, body = $4 "
                    "WHERE id = $1",
                    job.id, self.owner, self.lease_seconds, _dump(job),
                )  # fmt: skip
                return job

        job = await self._call(go)
        if job is not None:
            self._held.add(job.id)
        return job

    def release(self, job_id: str) -> None:
        self._held.discard(job_id)

    async def save(self, job: Job) -> None:
        async def go() -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow("SELECT body, state, lease_owner FROM jobs WHERE id = $1 FOR UPDATE", job.id)
                if row is None:
                    return
                if row["state"] == "running" and row["lease_owner"] not in (None, self.owner):
                    log.warning("job %s: another replica holds it now (this one lost its lease); not saved", job.id)
                    return
                job.tags += [t for t in _job(row["body"]).tags if t not in job.tags]  # tags only accumulate
                # Still running here: the lease is this replica's (also when the reaper had
                # requeued the job meanwhile: a running row without a lease would never be reaped).
                await self._write(conn, job, lease="mine" if job.state == "running" else "clear")

        await self._call(go)
        if job.state != "running":
            self._held.discard(job.id)

    async def requeue_running(self, max_attempts: int) -> tuple[int, int]:
        """At start-up: the jobs whose replica is gone (their lease ran out), not every running
        job: other replicas' jobs are running for real."""
        self.max_attempts = max_attempts
        return await self.reap()

    async def check_schema(self) -> None:
        """A missing, outdated or newer schema stops the start with one line (StoreUnavailable)
        instead of failing each query."""
        found = await self._call(lambda: schema_version(self.pool))
        if found < SCHEMA_VERSION:
            raise StoreUnavailable(
                f"job store: the database has {'no imgaccel schema' if not found else f'schema version {found}'}"
                f" (this imgaccel needs version {SCHEMA_VERSION}) and store.migrate is off: "
                "run `imgaccel serve --config FILE --migrate` first"
            )
        if found > SCHEMA_VERSION:
            raise StoreUnavailable(f"job store: the database schema is version {found}, newer than this "
                                   f"imgaccel's {SCHEMA_VERSION}: upgrade imgaccel")  # fmt: skip

    async def reap(self) -> tuple[int, int]:
        """Running jobs whose lease ran out go back to the queue; after ``max_attempts`` they fail."""

        async def go() -> tuple[int, int]:
            requeued = failed = 0
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    f"SELECT body FROM jobs WHERE state = 'running' AND lease_until < {_NOW} FOR UPDATE SKIP LOCKED"
                )
                for r in rows:
                    job = _job(r["body"])
                    if job.attempts >= self.max_attempts:
                        job.state, job.finished_at = "failed", time.time()
                        job.last_error = f"the replica running it stopped during each of its {job.attempts} attempts"
                        failed += 1
                    else:
                        job.state, job.next_attempt_at = "queued", 0.0
                        requeued += 1
                    await self._write(conn, job, lease="clear")
            if requeued or failed:
                log.warning("job leases ran out: %d job(s) queued again, %d failed", requeued, failed)
            return requeued, failed

        return await self._call(go)

    async def _renew(self) -> None:
        if not self._held:
            return
        await self._call(lambda: self.pool.execute(
            f"UPDATE jobs SET lease_until = {_NOW} + $2 WHERE lease_owner = $1 AND state = 'running' "
            "AND id = ANY($3::text[])",
            self.owner, self.lease_seconds, list(self._held),
        ))  # fmt: skip

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("queued", "running", "succeeded", "failed", "skipped"), 0)
        rows = await self._call(lambda: self.pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state"))
        for r in rows:
            out[r["state"]] = int(r["n"])
        return out

    # -- deliveries ----------------------------------------------------------------------

    async def add_delivery(self, delivery: Delivery) -> None:
        await self.save_delivery(delivery)

    async def save_delivery(self, delivery: Delivery) -> None:
        await self._call(lambda: self.pool.execute(
            "INSERT INTO deliveries (id, job_id, state, next_attempt_at, body) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (id) DO UPDATE SET state = $3, next_attempt_at = $4, body = $5",
            delivery.id, delivery.job_id, delivery.state, delivery.next_attempt_at, json.dumps(asdict(delivery)),
        ))  # fmt: skip

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Claimed: hidden from the other replicas for ``DELIVERY_CLAIM`` seconds."""
        rows = await self._call(lambda: self.pool.fetch(
            "UPDATE deliveries SET next_attempt_at = $3 WHERE id IN (SELECT id FROM deliveries "
            "WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2 "
            "FOR UPDATE SKIP LOCKED) RETURNING body",
            now, limit, now + DELIVERY_CLAIM,
        ))  # fmt: skip
        return [Delivery(**json.loads(r["body"])) for r in rows]

    async def deliveries(self, job_id: str) -> list[Delivery]:
        rows = await self._call(lambda: self.pool.fetch("SELECT body FROM deliveries WHERE job_id = $1", job_id))
        return [Delivery(**json.loads(r["body"])) for r in rows]

    # -- the rest ------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda: self.pool.execute(
            "INSERT INTO probe (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = $1", time.time()
        ))  # fmt: skip

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[bool]:
        """Whether this replica holds the advisory lock ``name`` (held for the ``with`` block)."""
        key = zlib.crc32(name.encode())
        try:
            conn = await self.pool.acquire()
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"job store: {_one_line(e)}") from None
        try:
            got = await self._call(lambda: conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield bool(got)
            finally:
                if got:
                    await _unlock(conn, key)
        finally:
            with contextlib.suppress(*_UNAVAILABLE):  # a broken connection: the pool terminates it
                await self.pool.release(conn)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _safe(url: str) -> str:
    """``url`` without a password in it."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{tail}"
