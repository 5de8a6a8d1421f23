"""The ``prewarm:`` section of ``imgaccel serve``'s configuration.

Defaults: at most 5 tasks run at once (the rest wait in order), a task may move at most
100 GB (its plan, all targets together), 4 requests in flight towards the registry per task,
node daemons poll every 5 s and count as gone after 60 s without a poll::

    prewarm:
      cache_nodes: [{address: cachenode-a.internal:5100}, {address: cachenode-b.internal:5100}]
      cache_node_token: {env: CACHENODE_TOKEN}
      node_token: {env: PREWARM_NODE_TOKEN}
      credentials:
        team-a: {username: robot-a, password: {env: TEAM_A_PASSWORD}}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgaccel.formats.prewarm import check_name
from imgaccel.formats.sizes import Size
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.reference import check_registry_host
from imgaccel.pusher.secret import Secret


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheNodeTarget(_Strict):
    address: str  # host:port of an ``imgaccel cachenode``
    plain_http: bool = True

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_registry_host(v, None)  # (a ReferenceError is a ValueError)


class NamedCredentials(_Strict):
    username: str
    password: Secret

    def get(self) -> Credentials:
        return Credentials(self.username, self.password.get())


class PrewarmConfig(_Strict):
    max_running: int = Field(default=5, ge=1, le=100)  # tasks running at once; the rest wait in order
    quota: Size = Field(default=100 * 10**9, ge=1)  # bytes one task may move, all targets together
    registry_concurrency: int = Field(default=4, ge=1, le=64)  # default requests in flight per task
    cache_nodes: list[CacheNodeTarget] = []  # the targets of a task without a node selector
    cache_node_token: Secret | None = None  # a cluster token of the cache nodes (Bearer)
    credentials: dict[str, NamedCredentials] = {}  # what ``--credentials NAME`` names
    node_token: Secret | None = None  # node daemons' poll credential (default: the API token)
    node_poll_seconds: float = Field(default=5.0, gt=0, le=600)  # what nodes are told
    node_seen_seconds: float = Field(default=60.0, gt=0)  # a node polled within this: a target
    node_timeout: float = Field(default=120.0, gt=0)  # an assignment unreported this long fails
    platform: str | None = None  # platform manifests planned (default: this machine's)

    @field_validator("credentials")
    @classmethod
    def _names(cls, v: dict[str, NamedCredentials]) -> dict[str, NamedCredentials]:
        for name in v:
            check_name(name, "credentials name")
        return v
