"""``imgaccel cachenode`` configuration: a pydantic-validated YAML file (``cachenode.yaml``) with
embedded defaults.

Only ``upstreams`` must be given. By default the node listens on 127.0.0.1:5100, keeps its store
in ``/var/lib/imgaccel-cachenode`` bounded to 100 GiB, re-resolves tags upstream after 30 s,
remembers credential checks for 60 s and fills at most 4 blobs in the background at once::

    listen: 0.0.0.0:5100
    data_dir: /var/lib/imgaccel-cachenode
    max_size: 200GiB
    cluster_tokens: [{env: CACHENODE_TOKEN}]
    upstreams:
      - host: docker.io                  # what clients name with ?ns= (containerd's mirror query)
        endpoint: registry-1.docker.io   # what is contacted (default: host)
        anonymous: true                  # public repositories: clients without credentials may read
      - host: registry.internal:5000
        username: cachenode
        password: {env: REGISTRY_PASSWORD}
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imgaccel.formats.sizes import Size
from imgaccel.pusher.auth import Credentials, docker_config_path, load_docker_credentials
from imgaccel.pusher.reference import check_registry_host, is_loopback
from imgaccel.pusher.secret import Secret

CONFIG_NAME = "cachenode.yaml"


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message (one line) names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamConfig(_Strict):
    host: str  # the registry as clients name it (?ns=<host>), e.g. docker.io
    endpoint: str | None = None  # host[:port] actually contacted (default: host)
    plain_http: bool | None = None  # default: plain HTTP on loopback, TLS elsewhere
    username: str | None = None  # the node's own credentials for pulling through
    password: Secret | None = None
    docker_config: bool = True  # otherwise: the node's Docker config file (see CacheNodeConfig.docker_config)
    anonymous: bool = False  # repositories are public: clients without credentials may read what upstream lets
    max_connections: int = Field(default=16, ge=1, le=256)

    @field_validator("host", "endpoint")
    @classmethod
    def _registry(cls, v: str | None) -> str | None:
        return None if v is None else check_registry_host(v, None)  # (a ReferenceError is a ValueError)

    @property
    def target(self) -> str:
        return self.endpoint or self.host

    def use_plain_http(self) -> bool:
        return self.plain_http if self.plain_http is not None else is_loopback(self.target)

    def credentials(self, docker_config: Path | None) -> Credentials | None:
        if self.username:
            return Credentials(self.username, self.password.get() if self.password else "")
        if not self.docker_config:
            return None
        return load_docker_credentials(self.target, docker_config or docker_config_path())


class CacheNodeConfig(_Strict):
    listen: str = "127.0.0.1:5100"
    data_dir: Path = Path("/var/lib/imgaccel-cachenode")
    max_size: Size = Field(default=100 << 30, ge=1 << 20)  # bytes of blobs and manifests kept
    manifest_ttl: float = Field(default=30.0, ge=0)  # seconds a tag -> digest answer is reused
    auth_ttl: float = Field(default=60.0, ge=0)  # seconds a credential check's yes/no is reused
    fill_concurrency: int = Field(default=4, ge=1, le=64)  # background fills running at once
    cluster_tokens: list[Secret] = []  # Bearer tokens (or Basic passwords) granting read of every upstream
    docker_config: Path | None = None  # credentials file (default $DOCKER_CONFIG/config.json, ~/.docker/...)
    upstreams: list[UpstreamConfig] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535 or not host.strip("[]"):
            raise ValueError(f"{v!r}: expected HOST:PORT (port 0 picks a free one)")
        return v

    @field_validator("cluster_tokens")
    @classmethod
    def _tokens(cls, v: list[Secret]) -> list[Secret]:
        if any(len(t.get()) < 16 for t in v):
            raise ValueError("a cluster token must be at least 16 characters long")
        return v

    @field_validator("upstreams")
    @classmethod
    def _unique(cls, v: list[UpstreamConfig]) -> list[UpstreamConfig]:
        hosts = [u.host.lower() for u in v]
        if len(set(hosts)) != len(hosts):
            raise ValueError("two upstreams have the same host")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def load_config(path: Path, listen: str | None = None, data_dir: Path | None = None) -> CacheNodeConfig:
    """The configuration in ``path`` with the command-line overrides applied; ``ConfigError``."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    overrides: dict[str, object] = {"listen": listen, "data_dir": data_dir}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CacheNodeConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = " ".join(str(first["msg"]).split()).removeprefix("Value error, ")
        raise ConfigError(f"{path}: {where}: {msg}") from None
