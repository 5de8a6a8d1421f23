"""Durable prewarm tasks, templates and the nodes that polled, in the service's job store.

``PrewarmStore`` is the interface; ``SQLitePrewarmStore`` keeps three tables in the service's
SQLite file (``jobs.sqlite``, WAL mode) next to the conversion jobs. A task is one JSON record
(``formats.prewarm.Task``) with its state and creation time indexed; tasks are taken in
creation order.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from imgaccel.formats.prewarm import NodeRecord, Task, Template

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
"""


class PrewarmStore(Protocol):
    def save(self, task: Task) -> None: ...

    def get(self, task_id: str) -> Task | None: ...

    def list_tasks(self, state: str | None, limit: int, offset: int) -> list[Task]:
        """Newest first."""

    def in_states(self, states: tuple[str, ...]) -> list[Task]:
        """Oldest first."""

    def save_template(self, template: Template) -> None: ...

    def template(self, name: str) -> Template | None: ...

    def templates(self) -> list[Template]: ...

    def save_node(self, node: NodeRecord) -> None: ...

    def nodes(self, seen_since: float) -> list[NodeRecord]: ...


class SQLitePrewarmStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, task: Task) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_tasks (id, state, created_at, body) VALUES (?, ?, ?, ?)",
            (task.id, task.state, task.created_at, task.model_dump_json()),
        )

    def get(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT body FROM prewarm_tasks WHERE id = ?", (task_id,)).fetchone()
        return Task.model_validate_json(row[0]) if row else None

    def list_tasks(self, state: str | None, limit: int, offset: int) -> list[Task]:
        sql, args = "SELECT body FROM prewarm_tasks", []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        return [Task.model_validate_json(r[0]) for r in self._db.execute(sql, (*args, limit, offset))]

    def in_states(self, states: tuple[str, ...]) -> list[Task]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT body FROM prewarm_tasks WHERE state IN ({marks}) ORDER BY created_at, id", states
        )
        return [Task.model_validate_json(r[0]) for r in rows]

    def save_template(self, template: Template) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_templates (name, body) VALUES (?, ?)",
            (template.name, template.model_dump_json()),
        )

    def template(self, name: str) -> Template | None:
        row = self._db.execute("SELECT body FROM prewarm_templates WHERE name = ?", (name,)).fetchone()
        return Template.model_validate_json(row[0]) if row else None

    def templates(self) -> list[Template]:
        rows = self._db.execute("SELECT body FROM prewarm_templates ORDER BY name")
        return [Template.model_validate_json(r[0]) for r in rows]

    def save_node(self, node: NodeRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prewarm_nodes (name, last_seen, body) VALUES (?, ?, ?)",
            (node.name, node.last_seen, node.model_dump_json()),
        )

    def nodes(self, seen_since: float) -> list[NodeRecord]:
        rows = self._db.execute("SELECT body FROM prewarm_nodes WHERE last_seen >= ? ORDER BY name", (seen_since,))
        return [NodeRecord.model_validate_json(r[0]) for r in rows]
