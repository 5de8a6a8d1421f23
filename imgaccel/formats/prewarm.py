"""Prewarm tasks on the wire: what ``imgaccel prewarm create`` asks for, the plan the service
computes before a byte moves, a task's live status, and the poll through which node daemons
report their labels and progress and receive their assignments (nodes take no inbound
connections). Pure data; the HTTP routes are in ``imgaccel.prewarm.api``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PREWARM_API_VERSION = 1
Mode = Literal["hot", "full"]
TaskState = Literal["queued", "planning", "running", "throttled", "succeeded", "failed", "cancelled"]
TargetState = Literal["pending", "running", "throttled", "succeeded", "failed", "cancelled"]
TERMINAL_TASK: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_TARGET: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_name(value: str, what: str) -> str:
    """A node, template or credentials name: 1-63 of ``[A-Za-z0-9._-]``, starting alphanumeric."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value[:80]!r}: expected 1 to 63 of [A-Za-z0-9._-], starting with a letter or digit")
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Kubernetes-style label keys and values (at most 64 labels)."""
    if len(labels) > 64:
        raise ValueError(f"{len(labels)} labels: at most 64")
    for k, v in labels.items():
        if not _LABEL_KEY.fullmatch(k):
            raise ValueError(f"label key {k[:80]!r} is not a valid label key")
        if not _LABEL_VALUE.fullmatch(v):
            raise ValueError(f"label {k}: value {v[:80]!r} is not a valid label value")
    return labels


class Requirement(_Strict):
    key: str
    op: Literal["=", "!=", "exists"]
    value: str = ""


def parse_selector(text: str) -> list[Requirement]:
    """``region=cn-east,card=h200``: every requirement must hold. ``key!=value`` excludes,
    a bare ``key`` asks that the label exists. ValueError names the bad term."""
    out: list[Requirement] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            raise ValueError(f"node selector {text!r}: empty term")
        key, op, value = term, "exists", ""
        for sep in ("!=", "="):
            if sep in term:
                key, value = (s.strip() for s in term.split(sep, 1))
                op = sep
                break
        if not _LABEL_KEY.fullmatch(key) or (op != "exists" and not _LABEL_VALUE.fullmatch(value)):
            raise ValueError(f"node selector {text!r}: {term!r} is not key=value, key!=value or key")
        out.append(Requirement(key=key, op=op, value=value))  # type: ignore[arg-type]
    return out


def selector_matches(requirements: list[Requirement], labels: dict[str, str]) -> bool:
    for r in requirements:
        if r.op == "exists" and r.key not in labels:
            return False
        if r.op == "=" and labels.get(r.key) != r.value:
            return False
        if r.op == "!=" and labels.get(r.key) == r.value:
            return False
    return True


class TaskSpec(_Strict):
    """What a user asks for (``POST /api/v1/prewarm/tasks``)."""

    images: list[str] = Field(default=[], max_length=100)  # references; may be empty with a template
    template: str | None = None  # a saved template's name: its images and settings, overridden by these
    mode: Mode = "hot"
    label: str = "startup"  # hot mode: the profile label whose chunks are prewarmed
    nodes: str | None = None  # a node selector; None: the service's cache nodes are the targets
    credentials: str | None = None  # a credentials name from the service's prewarm config
    bandwidth: int | None = Field(default=None, ge=1 << 16)  # bytes per second, the whole task
    registry_concurrency: int | None = Field(default=None, ge=1, le=64)  # requests in flight
    platform: str | None = None  # default: the service's prewarm.platform

    @field_validator("images")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an image is named twice")
        return v

    @field_validator("nodes")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        if v is not None:
            parse_selector(v)
        return v

    @field_validator("template", "credentials")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "name")


class ChunkRange(_Strict):
    offset: int = Field(ge=0)
    length: int = Field(ge=1)
    digest: str | None = None  # sha256 of the compressed bytes, when the index has it


class BlobPlan(_Strict):
    digest: str
    size: int = Field(ge=0)  # the blob's size
    bytes: int = Field(ge=0)  # what the task moves of it: size (full) or its hot chunks (hot)
    chunks: list[ChunkRange] | None = None  # hot mode: the ranges; None: the whole blob


class ImagePlan(_Strict):
    reference: str  # as given
    registry: str
    repository: str
    top_digest: str  # what the reference resolved to when planned (pinned for the run)
    manifest: str  # the platform manifest
    mode: Mode
    profile_chunks: int = 0  # hot mode: the profile's chunks
    blobs: list[BlobPlan]

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.blobs)


class Plan(_Strict):
    images: list[ImagePlan]
    targets: list[str]  # cache node addresses or node names
    bytes_per_target: int  # what one target receives (cache nodes: its rendezvous share summed)
    total_bytes: int  # all targets together: what the quota is checked against
    quota: int


class ImageProgress(_Strict):
    reference: str
    bytes_done: int = 0
    bytes_total: int = 0
    state: TargetState = "pending"
    error: str | None = None


class TargetProgress(_Strict):
    name: str  # a cache node address or a node name
    kind: Literal["cachenode", "node"]
    state: TargetState = "pending"
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    images: list[ImageProgress] = []
    updated_at: float = 0.0


class Task(_Strict):
    id: str
    spec: TaskSpec
    state: TaskState = "queued"
    plan: Plan | None = None
    targets: list[TargetProgress] = []
    message: str | None = None  # e.g. "throttled by the registry: retrying in 2 s"
    error: str | None = None
    concurrency: int = 1  # requests towards the registry in flight now (halved on each 429)
    attempts: int = 0  # runs started (a restart of the service resumes with another)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def bytes_done(self) -> int:
        return sum(t.bytes_done for t in self.targets)

    @property
    def bytes_total(self) -> int:
        return sum(t.bytes_total for t in self.targets)

    def summary(self) -> dict[str, object]:
        out = self.model_dump()
        out["bytes_done"], out["bytes_total"] = self.bytes_done, self.bytes_total
        return out


class Template(_Strict):
    name: str
    spec: TaskSpec  # images resolved from the task it was saved from
    source_task: str
    created_at: float


class Assignment(_Strict):
    """Work for one node daemon: warm ``reference`` (pinned to ``top_digest``) into its cache."""

    task_id: str
    reference: str
    top_digest: str
    platform: str
    mode: Mode
    label: str
    bytes_total: int
    bandwidth: int | None = None  # bytes per second for this node


class NodeReport(_Strict):
    task_id: str
    reference: str
    state: TargetState
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int = Field(default=0, ge=0)
    error: str | None = Field(default=None, max_length=2000)


class NodeCacheStats(_Strict):
    """A node daemon's chunk cache, as its polls report it: the bytes on disk now, and the
    lookups since the daemon started that found a usable entry (``hits``) or none (``misses``:
    absent, or damaged and dropped)."""

    cached_bytes: int = Field(ge=0)
    hits: int = Field(ge=0)
    misses: int = Field(ge=0)


class NodePoll(_Strict):
    """``POST /api/v1/prewarm/nodes/<name>/poll``: a node's labels and reports, and its chunk
    cache's stats (absent from daemons older than the field)."""

    labels: dict[str, str] = {}
    reports: list[NodeReport] = Field(default=[], max_length=1000)
    chunk_cache: NodeCacheStats | None = None

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)


class NodePollAnswer(_Strict):
    version: int = PREWARM_API_VERSION
    assignments: list[Assignment]
    poll_seconds: float


class NodeRecord(_Strict):
    name: str
    labels: dict[str, str]
    last_seen: float
    chunk_cache: NodeCacheStats | None = None  # as of its last poll
