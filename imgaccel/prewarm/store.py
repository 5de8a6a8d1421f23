"""Durable prewarm tasks, templates, the nodes that polled and their reports, in the service's
job store.

``PrewarmStore`` is the (async) interface; ``SQLitePrewarmStore`` keeps its tables in the
service's SQLite file (``jobs.sqlite``, one replica) and ``prewarm.postgres_store`` in the
PostgreSQL database several replicas share. A task is one JSON record (``formats.prewarm.Task``)
with its state and creation time indexed; tasks are taken in creation order. The replica
running a task is its only writer (``save`` refuses, returning False, to overwrite a task that
another replica now runs or that was cancelled meanwhile); node reports, which reach any
replica, are kept apart (``add_report``) and merged in by the runner.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from imgaccel.formats.prewarm import TERMINAL_TASK, NodeRecord, NodeReport, Task, Template


class StoreUnavailable(Exception):
    """The store (jobs and prewarm tasks) cannot be reached or cannot write (a database outage);
    one line. The service answers 503 for it."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS prewarm_tasks (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  created_at REAL NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS prewarm_tasks_state ON prewarm_tasks(state, created_at);
CREATE TABLE IF NOT EXISTS prewarm_templates (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prewarm_nodes (name TEXT PRIMARY KEY, last_seen REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prewarm_reports (
  task_id TEXT NOT NULL,
  node TEXT NOT NULL,
  reference TEXT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (task_id, node, reference)
);
"""


def open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """The service's SQLite file (made if new) in autocommit, WAL mode, with ``schema`` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


class PrewarmStore(Protocol):
    shared: bool  # several replicas use it

    def start(self) -> None:
        """Background work (lease heartbeats); call inside the event loop."""

    async def close(self) -> None: ...

    async def save(self, task: Task) -> bool:
        """Write ``task``; False (nothing written) when another replica runs it now or it
        ended meanwhile (cancelled) while this copy says it has not."""

    async def get(self, task_id: str) -> Task | None: ...

    async def list_tasks(self, state: str | None, limit: int, offset: int) -> list[Task]:
        """Newest first."""

    async def in_states(self, states: tuple[str, ...]) -> list[Task]:
        """Oldest first."""

    async def claim(self, max_running: int) -> Task | None:
        """The oldest queued task, now running here, unless ``max_running`` tasks run already
        (all replicas together)."""

    async def resume(self) -> list[Task]:
        """At start-up: the running tasks whose replica is gone, queued again (returned)."""

    def release(self, task_id: str) -> None:
        """This replica no longer runs the task: its lease (if any) may lapse."""

    async def add_report(self, node: str, report: NodeReport) -> None: ...

    async def reports(self, task_id: str) -> list[tuple[str, NodeReport]]:
        """(node, report) of every node report for the task."""

    async def save_template(self, template: Template) -> None: ...

    async def template(self, name: str) -> Template | None: ...

    async def templates(self) -> list[Template]: ...

    async def save_node(self, node: NodeRecord) -> None: ...

    async def nodes(self, seen_since: float) -> list[NodeRecord]: ...


class SQLitePrewarmStore:
    """One replica: quick local writes on the event loop; ``claim`` needs no lease."""

    shared = False

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, _SCHEMA)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        self._db.close()

    async def save(self, task: Task) -> bool:
        row = self._db.execute("SELECT state FROM prewarm_tasks WHERE id = ?", (task.id,)).fetchone()
        if row and row[0] in TERMINAL_TASK and task.state not in TERMINAL_TASK:
            return False
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_tasks (id, state, created_at, body) VALUES (?, ?, ?, ?)",
            (task.id, task.state, task.created_at, task.model_dump_json()),
        )
        return True

    async def get(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT body FROM prewarm_tasks WHERE id = ?", (task_id,)).fetchone()
        return Task.model_validate_json(row[0]) if row else None

    async def list_tasks(self, state: str | None, limit: int, offset: int) -> list[Task]:
        sql, args = "SELECT body FROM prewarm_tasks", []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        return [Task.model_validate_json(r[0]) for r in self._db.execute(sql, (*args, limit, offset))]

    async def in_states(self, states: tuple[str, ...]) -> list[Task]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT body FROM prewarm_tasks WHERE state IN ({marks}) ORDER BY created_at, id", states
        )
        return [Task.model_validate_json(r[0]) for r in rows]

    async def claim(self, max_running: int) -> Task | None:
        running = self._db.execute(
            "SELECT count(*) FROM prewarm_tasks WHERE state IN ('running', 'throttled')"
        ).fetchone()[0]
        if running >= max_running:
            return None
        row = self._db.execute(
            "SELECT body FROM prewarm_tasks WHERE state = 'queued' ORDER BY created_at, id LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        task = Task.model_validate_json(row[0])
        task.state = "running"
        await self.save(task)
        return task

    async def resume(self) -> list[Task]:
        tasks = await self.in_states(("running", "throttled"))  # one replica: all of them are ours
        for task in tasks:
            task.state = "queued"
            await self.save(task)
        return tasks

    def release(self, task_id: str) -> None:
        pass

    async def add_report(self, node: str, report: NodeReport) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_reports (task_id, node, reference, body) VALUES (?, ?, ?, ?)",
            (report.task_id, node, report.reference, report.model_dump_json()),
        )

    async def reports(self, task_id: str) -> list[tuple[str, NodeReport]]:
        rows = self._db.execute("SELECT node, body FROM prewarm_reports WHERE task_id = ?", (task_id,))
        return [(r[0], NodeReport.model_validate_json(r[1])) for r in rows]

    async def save_template(self, template: Template) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_templates (name, body) VALUES (?, ?)",
            (template.name, template.model_dump_json()),
        )

    async def template(self, name: str) -> Template | None:
        row = self._db.execute("SELECT body FROM prewarm_templates WHERE name = ?", (name,)).fetchone()
        return Template.model_validate_json(row[0]) if row else None

    async def templates(self) -> list[Template]:
        rows = self._db.execute("SELECT body FROM prewarm_templates ORDER BY name")
        return [Template.model_validate_json(r[0]) for r in rows]

    async def save_node(self, node: NodeRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_nodes (name, last_seen, body) VALUES (?, ?, ?)",
            (node.name, node.last_seen, node.model_dump_json()),
        )

    async def nodes(self, seen_since: float) -> list[NodeRecord]:
        rows = self._db.execute("SELECT body FROM prewarm_nodes WHERE last_seen >= ? ORDER BY name", (seen_since,))
        return [NodeRecord.model_validate_json(r[0]) for r in rows]
