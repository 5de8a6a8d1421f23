"""Prewarm tasks in the PostgreSQL database several ``imgaccel serve`` replicas share (the
tables ``service.postgres_store`` migrates), on the job store's connection pool.

A task runs on one replica at a time: ``claim`` takes the oldest queued one under an advisory
lock (so "at most ``max_running`` at once" holds across replicas) and writes this replica's
id and a lease on it; a heartbeat renews the leases of the tasks it runs; ``resume`` (at
start-up, then periodically) queues again the running tasks whose lease ran out, so another
replica takes them over. ``save`` writes only a task this replica holds or nobody holds, and
never brings back a task that ended meanwhile (cancelled through another replica).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from imgaccel.formats.prewarm import TERMINAL_TASK, NodeRecord, NodeReport, Task, Template
from imgaccel.prewarm.store import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
CLAIM_LOCK = 0x70726577  # "prew": the advisory lock claims take
_NOW = "extract(epoch from clock_timestamp())"
_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ConnectionError)


class PostgresPrewarmStore:
    shared = True

    def __init__(self, pool: asyncpg.Pool, lease_seconds: float) -> None:
        self.pool = pool
        self.owner = uuid.uuid4().hex[:12]
        self.lease_seconds = lease_seconds
        self._held: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._heartbeat(), name="imgaccel-prewarm-lease")]

    async def close(self) -> None:  # the pool belongs to the job store
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self._held:
                continue
            try:
                await self._call(lambda: self.pool.execute(
                    f"UPDATE prewarm_tasks SET lease_until = {_NOW} + $2 WHERE lease_owner = $1 "
                    "AND id = ANY($3::text[])",
                    self.owner, self.lease_seconds, list(self._held),
                ))  # fmt: skip
            except StoreUnavailable as e:
                log.warning("prewarm store: %s", e)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"job store: {' '.join(f'{type(e).__name__}: {e}'.split())[:300]}") from None

    async def save(self, task: Task) -> bool:
        async def go() -> bool:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow("SELECT state, lease_owner FROM prewarm_tasks WHERE id = $1 FOR UPDATE",
                                          task.id)  # fmt: skip
                if row is not None:
                    if row["state"] in TERMINAL_TASK and task.state not in TERMINAL_TASK:
                        return False
                    held_elsewhere = row["lease_owner"] not in (None, self.owner)
                    if held_elsewhere and row["state"] not in TERMINAL_TASK and task.state != "cancelled":
                        return False  # another replica runs it: only a cancel may be written
                mine = task.id in self._held and task.state not in TERMINAL_TASK and task.state != "queued"
                await conn.execute(
                    "INSERT INTO prewarm_tasks (id, state, created_at, lease_owner, lease_until, body) "
                    f"VALUES ($1, $2, $3, $4, CASE WHEN $4::text IS NULL THEN NULL ELSE {_NOW} + $5 END, $6) "
                    "ON CONFLICT (id) DO UPDATE SET state = $2, lease_owner = $4, "
                    f"lease_until = CASE WHEN $4::text IS NULL THEN NULL ELSE {_NOW} + $5 END, body = $6",
                    task.id, task.state, task.created_at, self.owner if mine else None, self.lease_seconds,
                    task.model_dump_json(),
                )  # fmt: skip
                return True

        saved = await self._call(go)
        if task.state in TERMINAL_TASK or not saved:
            self._held.discard(task.id)
        return saved

    async def get(self, task_id: str) -> Task | None:
        row = await self._call(lambda: self.pool.fetchrow("SELECT body FROM prewarm_tasks WHERE id = $1", task_id))
        return Task.model_validate_json(row["body"]) if row else None

    async def list_tasks(self, state: str | None, limit: int, offset: int) -> list[Task]:
        rows = await self._call(lambda: self.pool.fetch(
            "SELECT body FROM prewarm_tasks WHERE ($1::text IS NULL OR state = $1) "
            "ORDER BY created_at DESC, id LIMIT $2 OFFSET $3", state, limit, offset,
        ))  # fmt: skip
        return [Task.model_validate_json(r["body"]) for r in rows]

    async def in_states(self, states: tuple[str, ...]) -> list[Task]:
        rows = await self._call(lambda: self.pool.fetch(
            "SELECT body FROM prewarm_tasks WHERE state = ANY($1::text[]) ORDER BY created_at, id", list(states)
        ))  # fmt: skip
        return [Task.model_validate_json(r["body"]) for r in rows]

    async def claim(self, max_running: int) -> Task | None:
        async def go() -> Task | None:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK)
                running = await conn.fetchval(
                    "SELECT count(*) FROM prewarm_tasks WHERE state IN ('running', 'throttled')"
                )
                if running >= max_running:
                    return None
                row = await conn.fetchrow(
                    "SELECT body FROM prewarm_tasks WHERE state = 'queued' ORDER BY created_at, id LIMIT 1 "
                    "FOR UPDATE SKIP LOCKED"
                )
                if row is None:
                    return None
                task = Task.model_validate_json(row["body"])
                task.state = "running"
                await conn.execute(
                    f"UPDATE prewarm_tasks SET state = 'running', lease_owner = $2, lease_until = {_NOW} + $3, "
                    "body = $4 WHERE id = $1",
                    task.id, self.owner, self.lease_seconds, task.model_dump_json(),
                )  # fmt: skip
                return task

        task = await self._call(go)
        if task is not None:
            self._held.add(task.id)
        return task

    async def resume(self) -> list[Task]:
        async def go() -> list[Task]:
            out = []
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "SELECT body FROM prewarm_tasks WHERE state IN ('running', 'throttled') "
                    f"AND (lease_until IS NULL OR lease_until < {_NOW}) FOR UPDATE SKIP LOCKED"
                )
                for r in rows:
                    task = Task.model_validate_json(r["body"])
                    task.state = "queued"
                    await conn.execute(
                        "UPDATE prewarm_tasks SET state = 'queued', lease_owner = NULL, lease_until = NULL, "
                        "body = $2 WHERE id = $1", task.id, task.model_dump_json(),
                    )  # fmt: skip
                    out.append(task)
            return out

        return await self._call(go)

    def release(self, task_id: str) -> None:
        self._held.discard(task_id)

    async def add_report(self, node: str, report: NodeReport) -> None:
        await self._call(lambda: self.pool.execute(
            "INSERT INTO prewarm_reports (task_id, node, reference, body) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (task_id, node, reference) DO UPDATE SET body = $4",
            report.task_id, node, report.reference, report.model_dump_json(),
        ))  # fmt: skip

    async def reports(self, task_id: str) -> list[tuple[str, NodeReport]]:
        rows = await self._call(lambda: self.pool.fetch(
            "SELECT node, body FROM prewarm_reports WHERE task_id = $1", task_id
        ))  # fmt: skip
        return [(r["node"], NodeReport.model_validate_json(r["body"])) for r in rows]

    async def save_template(self, template: Template) -> None:
        await self._call(lambda: self.pool.execute(
            "INSERT INTO prewarm_templates (name, body) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET body = $2",
            template.name, template.model_dump_json(),
        ))  # fmt: skip

    async def template(self, name: str) -> Template | None:
        row = await self._call(lambda: self.pool.fetchrow("SELECT body FROM prewarm_templates WHERE name = $1", name))
        return Template.model_validate_json(row["body"]) if row else None

    async def templates(self) -> list[Template]:
        rows = await self._call(lambda: self.pool.fetch("SELECT body FROM prewarm_templates ORDER BY name"))
        return [Template.model_validate_json(r["body"]) for r in rows]

    async def save_node(self, node: NodeRecord) -> None:
        await self._call(lambda: self.pool.execute(
            "INSERT INTO prewarm_nodes (name, last_seen, body) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET last_seen = $2, body = $3",
            node.name, node.last_seen, node.model_dump_json(),
        ))  # fmt: skip

    async def nodes(self, seen_since: float) -> list[NodeRecord]:
        rows = await self._call(lambda: self.pool.fetch(
            "SELECT body FROM prewarm_nodes WHERE last_seen >= $1 ORDER BY name", seen_since
        ))  # fmt: skip
        return [NodeRecord.model_validate_json(r["body"]) for r in rows]
