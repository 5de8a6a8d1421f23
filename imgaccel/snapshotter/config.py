"""``imgaccel snapshotter`` configuration: a pydantic-validated YAML file with embedded defaults.

With no file at all the node daemon listens on ``/run/imgaccel/snapshotter.sock``, keeps its
snapshots and metadata under ``/var/lib/imgaccel``, caches lazily read chunks in
``/var/cache/imgaccel``, speaks plain HTTP only to loopback registries (plus those listed in
``plain_http``) and takes registry credentials from the Docker config file. Command-line flags
(``--socket``, ``--root``, ``--cache-dir``) override the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from socket import gethostname
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgaccel.formats.prewarm import check_labels, check_name
from imgaccel.pusher.auth import Credentials, docker_config_path, load_docker_credentials
from imgaccel.pusher.reference import check_registry_host, is_loopback
from imgaccel.pusher.secret import Secret

DEFAULT_SOCKET = Path("/run/imgaccel/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/imgaccel")
DEFAULT_CACHE_DIR = Path("/var/cache/imgaccel")
PLUGIN_NAME = "imgaccel"  # the snapshotter's name in containerd's config (proxy_plugins.<name>)


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the field."""


def _must_be_absolute(p: Path) -> Path:
    if not p.is_absolute():
        raise ValueError(f"{p}: must be an absolute path")
    return p


AbsolutePath = Annotated[Path, AfterValidator(_must_be_absolute)]


class CriProxyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket: AbsolutePath = Path("/run/imgaccel/cri.sock")  # kubelet's --image-service-endpoint=unix://<this>
    containerd: AbsolutePath = Path("/run/containerd/containerd.sock")  # where the calls are forwarded
    credential_ttl: float = Field(3600.0, gt=0)  # seconds a pull's credentials are kept


class CacheNodeConfig(BaseModel):
    """One cache node (``imgaccel cachenode``) the daemon fetches blob bytes from."""

    model_config = ConfigDict(extra="forbid")

    address: str  # host:port of the cache node
    plain_http: bool = True  # False: TLS

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_registry_host(v, None)  # (a ReferenceError is a ValueError: pydantic reports it)


class PrewarmAgentConfig(BaseModel):
    """The prewarm service this node takes assignments from (``imgaccel serve``'s prewarm API).
    The node polls it (no inbound connection), reporting its labels and progress."""

    model_config = ConfigDict(extra="forbid")

    service: str  # base URL of imgaccel serve, e.g. http://imgaccel.internal:8080
    token: Secret | None = None  # the service's prewarm node token (Bearer)
    node_name: str = Field(default_factory=gethostname)  # how tasks and selectors name this node
    labels: dict[str, str] = {}  # e.g. {region: cn-east, card: h200}; kubernetes.io/arch is added
    poll_seconds: float = Field(5.0, gt=0, le=600)  # until the service says otherwise

    @field_validator("service")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^/?#\s]+/?", v):
            raise ValueError(f"{v!r}: expected http(s)://host[:port]")
        return v.rstrip("/")

    @field_validator("node_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "node name")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket: AbsolutePath = DEFAULT_SOCKET  # gRPC unix socket containerd dials (proxy_plugins address)
    root: AbsolutePath = DEFAULT_ROOT  # snapshots/<id>/{fs,work} and metadata.db live here
    cache_dir: AbsolutePath = DEFAULT_CACHE_DIR  # chunks of lazily read layers
    plain_http: list[str] = []  # registries (host[:port]) reached over plain HTTP besides loopback ones
    plain_http_loopback: bool = True  # 127.0.0.0/8, ::1 and localhost registries over plain HTTP
    docker_config: Path | None = None  # credentials file (default $DOCKER_CONFIG/config.json, ~/.docker/...)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    profile_label: str | None = "startup"  # hot-chunk profile replayed when an image is first pulled (null: off)
    # Record a profile (under profile_label) from the reads of an image's first start-up on this
    # node when the image has none, and push it as a referrer (needs push rights on the registry).
    record_profiles: bool = False
    record_seconds: float = Field(30.0, gt=0, le=3600)  # how long after the first mount reads count
    # Fetch every chunk of an image in the background at full rate once it is first pulled (reads
    # by containers always go first): "no-profile" only when it has no profile to replay (so a
    # start-up without one is never slower than a pull), "always" after the replay too, or "off".
    background_fetch: Literal["off", "no-profile", "always"] = "no-profile"
    # A layer whose every chunk is cached is also written out as a local tar file
    # (<root>/lazy/layers/<hex>/layer.tar, checked against its diff_id); later mounts read it
    # directly (EROFS device=) instead of through FUSE. Deleted when the layer is released.
    local_layers: bool = True
    # How lazy layers reach the kernel: "file" (file-backed EROFS, Linux >= 6.12), "loop" (EROFS
    # on loop devices), "fuse" (a FUSE tree per layer, for kernels without 512-byte-block EROFS,
    # < 6.4); "auto" probes at start, in that order, and logs what it chose.
    kernel_path: Literal["auto", "file", "loop", "fuse"] = "auto"
    status_socket: AbsolutePath | None = None  # `imgaccel node status` asks here (default <root>/status.sock)
    # Kubernetes: a CRI image-service proxy on this socket (kubelet --image-service-endpoint) hands
    # the daemon the credentials of each PullImage, forwarding every call to containerd.
    cri_proxy: CriProxyConfig | None = None
    # Cache nodes blob bytes (chunk Range reads, full-mode TOCs) are fetched from before the
    # registry: each blob from its rendezvous-hashed node first, the others, then the registry.
    cache_nodes: list[CacheNodeConfig] = []
    cache_node_token: str | None = Field(None, repr=False)  # cluster token, sent as the Basic password
    cache_node_token_env: str | None = None  # ... or the environment variable holding it
    cache_node_down_seconds: float = Field(30.0, gt=0)  # a failed cache node is skipped this long
    # Prewarm assignments: poll this service and warm the chunk cache with what it assigns.
    prewarm: PrewarmAgentConfig | None = None

    @model_validator(mode="after")
    def _one_token(self) -> NodeConfig:
        if self.cache_node_token is not None and self.cache_node_token_env is not None:
            raise ValueError("give cache_node_token or cache_node_token_env, not both")
        if self.cache_node_token_env is not None and os.environ.get(self.cache_node_token_env) is None:
            raise ValueError(f"cache_node_token_env: environment variable {self.cache_node_token_env} is not set")
        return self

    def cache_node_token_value(self) -> str | None:
        """The cluster token for cache nodes: inline, or from its environment variable."""
        if self.cache_node_token_env is not None:
            return os.environ.get(self.cache_node_token_env)
        return self.cache_node_token

    @field_validator("plain_http")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            check_registry_host(h, None)
        return hosts

    @property
    def status_path(self) -> Path:
        return self.status_socket or self.root / "status.sock"

    def use_plain_http(self, registry: str) -> bool:
        """Whether ``registry`` (host[:port]) is reached over plain HTTP rather than TLS."""
        if registry in self.plain_http:
            return True
        return self.plain_http_loopback and is_loopback(registry)

    def credentials(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` from the Docker config file, if it has some."""
        return load_docker_credentials(registry, self.docker_config or docker_config_path())


def load_node_config(path: Path | None, socket: Path | None = None, root: Path | None = None,
                     cache_dir: Path | None = None) -> NodeConfig:  # fmt: skip
    """The configuration in ``path`` (defaults when None) with the given overrides applied."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = loaded
    overrides = {k: v for k, v in (("socket", socket), ("root", root), ("cache_dir", cache_dir)) if v is not None}
    try:
        return NodeConfig.model_validate({**data, **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        raise ConfigError(f"{path or 'config'}: {where}: {first['msg']}") from None


def containerd_snippet(config: NodeConfig) -> str:
    """What containerd 1.x's config.toml needs to use this snapshotter, for ctr and for Kubernetes."""
    return f"""# containerd 1.x config.toml (version = 2): the imgaccel node daemon as a proxy snapshotter
[proxy_plugins.{PLUGIN_NAME}]
  type = "snapshot"
  address = "{config.socket}"

# Kubernetes (CRI) pulls through it, with the image and layer labels lazy mounts need
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{PLUGIN_NAME}"
  disable_snapshot_annotations = false
"""
