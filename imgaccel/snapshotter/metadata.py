"""The snapshot metadata store: which snapshots exist, per containerd namespace, and how they chain.

It owns one SQLite database (WAL journal, ``synchronous=FULL``, every change one transaction):
per namespace, snapshot key -> (numeric id, kind active/view/committed, parent, labels,
created/updated times, usage recorded at commit, and for remote layers the directory holding
the layer's read-only tree). Ids are never reused, so a directory named after an id belongs to
at most one snapshot ever. It knows nothing about directories or mounts (``snapshots.py`` does);
it enforces containerd's snapshotter semantics and reports violations as the four error kinds
containerd's errdefs know (``NotFound``, ``AlreadyExists``, ``FailedPrecondition``,
``InvalidArgument``), each a one-line message. Calls are synchronous and not thread-safe: use
one store from one thread at a time.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import filters

MAX_LABEL_BYTES = 4096  # key + value, as containerd's metadata store enforces
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: names snapshots/<id>/
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent_id  INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
    labels     TEXT NOT NULL,     -- JSON object of strings
    created_ns INTEGER NOT NULL,  -- unix time in nanoseconds, UTC
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,  -- usage recorded at commit (bytes, inodes)
    inodes     INTEGER NOT NULL DEFAULT 0,
    remote_dir TEXT,              -- remote layer: the directory holding its read-only tree
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


class Kind(enum.StrEnum):
    ACTIVE = "active"
    VIEW = "view"
    COMMITTED = "committed"


class SnapshotError(Exception):
    """A snapshotter call that cannot be honoured; subclasses say which containerd error kind."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


@dataclass(frozen=True)
class Usage:
    size: int = 0  # bytes
    inodes: int = 0


@dataclass(frozen=True)
class Info:
    """What containerd sees of a snapshot (``snapshots.Info``)."""

    name: str
    kind: Kind
    parent: str  # "" when it has no parent
    labels: dict[str, str]
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class Snapshot:
    """A snapshot with its storage identity."""

    id: str
    namespace: str
    info: Info
    usage: Usage = field(default_factory=Usage)
    remote_dir: str | None = None


def _now_ns() -> int:
    return time.time_ns()


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def _check_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {k[:64]!r}: key and value longer than {MAX_LABEL_BYTES} bytes")


def _check_key(what: str, key: str) -> None:
    if not key:
        raise InvalidArgument(f"{what} must not be empty")


class MetadataStore:
    """Snapshot records in one SQLite file (created, with its directory, when missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._depth = 0
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self.transaction():
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {version} is newer than this program's {SCHEMA_VERSION}")
            if version == 0:  # executescript would commit the open transaction: run statements one by one
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: everything inside commits together or not at all (nests with savepoints)."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        else:
            self._db.execute(f"SAVEPOINT sp{self._depth}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            else:
                self._db.execute(f"ROLLBACK TO sp{self._depth}")
                self._db.execute(f"RELEASE sp{self._depth}")
            raise
        self._depth -= 1
        self._db.execute("COMMIT" if self._depth == 0 else f"RELEASE sp{self._depth}")

    # -- reading ---------------------------------------------------------------------------

    def _row(self, namespace: str, key: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            "WHERE s.namespace = ? AND s.key = ?",
            (namespace, key),
        ).fetchone()
        return row

    def _by_id(self, snapshot_id: int) -> sqlite3.Row:
        row: sqlite3.Row = self._db.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            "WHERE s.id = ?",
            (snapshot_id,),
        ).fetchone()
        return row

    @staticmethod
    def _snapshot(row: sqlite3.Row) -> Snapshot:
        info = Info(
            name=row["key"],
            kind=Kind(row["kind"]),
            parent=row["parent_key"] or "",
            labels=json.loads(row["labels"]),
            created=_dt(row["created_ns"]),
            updated=_dt(row["updated_ns"]),
        )
        return Snapshot(str(row["id"]), row["namespace"], info, Usage(row["size"], row["inodes"]), row["remote_dir"])

    def get(self, namespace: str, key: str) -> Snapshot:
        row = self._row(namespace, key)
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return self._snapshot(row)

    def find(self, namespace: str, key: str) -> Snapshot | None:
        row = self._row(namespace, key)
        return None if row is None else self._snapshot(row)

    def parents(self, snapshot: Snapshot) -> list[Snapshot]:
        """The committed snapshots under ``snapshot``, nearest first (overlayfs lowerdir order)."""
        rows = self._db.execute(
            "WITH RECURSIVE chain(id, depth) AS ("
            "  SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL"
            "  UNION ALL SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id"
            "  WHERE s.parent_id IS NOT NULL"
            ") SELECT id FROM chain ORDER BY depth",
            (int(snapshot.id),),
        ).fetchall()
        return [self._snapshot(self._by_id(r["id"])) for r in rows]

    def walk(self, namespace: str, filter_texts: Sequence[str] = ()) -> list[Snapshot]:
        """Every snapshot of ``namespace`` that matches any of the filters (containerd syntax)."""
        try:
            match = filters.parse_all(filter_texts)
        except filters.FilterError as e:
            raise InvalidArgument(str(e)) from None
        rows = self._db.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "
            "WHERE s.namespace = ? ORDER BY s.id",
            (namespace,),
        ).fetchall()
        out = []
        for row in rows:
            snap = self._snapshot(row)
            i = snap.info
            if match(filters.snapshot_fields(i.name, i.parent, i.kind.value, i.labels)):
                out.append(snap)
        return out

    def ids(self) -> set[str]:
        """The ids of all snapshots in all namespaces (what owns a directory)."""
        return {str(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}

    def all(self) -> list[Snapshot]:
        rows = self._db.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.id"
        ).fetchall()
        return [self._snapshot(r) for r in rows]

    # -- changing --------------------------------------------------------------------------

    def _parent_id(self, namespace: str, parent: str) -> int | None:
        if not parent:
            return None
        row = self._row(namespace, parent)
        if row is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if row["kind"] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return int(row["id"])

    def _insert(self, namespace: str, kind: Kind, key: str, parent: str, labels: Mapping[str, str],
                usage: Usage, remote_dir: str | None) -> Snapshot:  # fmt: skip
        _check_key("snapshot key", key)
        _check_labels(labels)
        with self.transaction():
            if self._row(namespace, key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            parent_id = self._parent_id(namespace, parent)
            now = _now_ns()
            cur = self._db.execute(
                "INSERT INTO snapshots (namespace, key, kind, parent_id, labels, created_ns, updated_ns, size, inodes,"
                " remote_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, key, kind.value, parent_id, json.dumps(dict(labels), sort_keys=True), now, now,
                 usage.size, usage.inodes, remote_dir),
            )  # fmt: skip
            assert cur.lastrowid is not None
            return self._snapshot(self._by_id(cur.lastrowid))

    def create(self, namespace: str, kind: Kind, key: str, parent: str = "",
               labels: Mapping[str, str] | None = None) -> Snapshot:  # fmt: skip
        """A new active or view snapshot ``key`` on committed ``parent`` ("" for none)."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind.value} invalid: only active or view snapshots can be created")
        return self._insert(namespace, kind, key, parent, labels or {}, Usage(), None)

    def create_committed(self, namespace: str, name: str, parent: str, labels: Mapping[str, str],
                         remote_dir: str, usage: Usage | None = None) -> Snapshot:  # fmt: skip
        """A committed snapshot whose tree lives in ``remote_dir`` (a remote layer, mounted lazily)."""
        if not remote_dir:
            raise InvalidArgument("a remote snapshot needs its directory")
        return self._insert(namespace, Kind.COMMITTED, name, parent, labels, usage or Usage(), remote_dir)

    def commit(self, namespace: str, key: str, name: str, labels: Mapping[str, str] | None = None,
               usage: Usage | None = None, parent: str = "") -> Snapshot:  # fmt: skip
        """Turn active ``key`` into committed ``name``; ``labels`` replace its labels (as containerd does)."""
        _check_key("committed snapshot name", name)
        labels = labels or {}
        _check_labels(labels)
        with self.transaction():
            if self._row(namespace, name) is not None:
                raise AlreadyExists(f"committed snapshot {name!r} already exists")
            row = self._row(namespace, key)
            if row is None:
                raise NotFound(f"active snapshot {key!r} does not exist")
            if row["kind"] != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if parent and parent != (row["parent_key"] or ""):
                raise InvalidArgument(f"cannot change parent of active snapshot {key!r} on commit")
            usage = usage or Usage()
            now = _now_ns()
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, created_ns = ?, updated_ns = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (name, json.dumps(dict(labels), sort_keys=True), now, now, usage.size, usage.inodes, row["id"]),
            )
            return self._snapshot(self._by_id(row["id"]))

    def remove(self, namespace: str, key: str) -> Snapshot:
        """Forget ``key``; FailedPrecondition while other snapshots have it as parent."""
        with self.transaction():
            row = self._row(namespace, key)
            if row is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            child = self._db.execute("SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone()
            if child is not None:
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: snapshot {child['key']!r} is its child")
            snap = self._snapshot(row)
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
            return snap

    def update(self, namespace: str, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()) -> Snapshot:
        """Change labels: ``labels`` (replace all, also when no field paths are given) or
        ``labels.<key>`` (set that one; an absent or empty value removes it). Other fields: InvalidArgument."""
        _check_labels(labels)
        with self.transaction():
            row = self._row(namespace, name)
            if row is None:
                raise NotFound(f"snapshot {name!r} does not exist")
            current: dict[str, str] = json.loads(row["labels"])
            if not fieldpaths:
                current = dict(labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    if labels.get(k):
                        current[k] = labels[k]
                    else:
                        current.pop(k, None)
                elif path == "labels":
                    current = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {name!r}")
            current = {k: v for k, v in current.items() if v}
            self._db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (json.dumps(current, sort_keys=True), _now_ns(), row["id"]),
            )
            return self._snapshot(self._by_id(row["id"]))
