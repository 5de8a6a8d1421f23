"""``imgaccel serve`` configuration: a pydantic-validated YAML file with embedded defaults.

With no file at all the service listens on 127.0.0.1:8080, keeps its SQLite job store in
``./imgaccel-data/``, converts every repository in index-only mode with 4 workers, and accepts
events without a token (loopback only). Every field is documented in README.md.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imgaccel.converter.options import DEFAULT_SUFFIX, ConversionLimits, ConvertOptions
from imgaccel.prewarm.config import PrewarmConfig
from imgaccel.pusher.auth import Credentials, load_docker_credentials
from imgaccel.pusher.client import RetryPolicy
from imgaccel.pusher.reference import check_registry_host, check_repository, is_loopback
from imgaccel.pusher.secret import Secret

_REFERRERS_TAG = re.compile(r"(?:sha256|sha512)-[0-9a-f]{64}")  # OCI 1.1 tag-schema referrers indexes
_TAG_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistryConfig(_Strict):
    endpoint: str  # host[:port], as it appears in image references and events
    plain_http: bool | None = None  # default: plain HTTP on loopback, TLS elsewhere
    username: str | None = None
    password: Secret | None = None
    docker_config: bool = True  # fall back to ~/.docker/config.json credentials
    max_connections: int = Field(default=8, ge=1, le=256)
    repositories: list[str] = ["*"]  # globs the reconciler lists tags of

    @field_validator("endpoint")
    @classmethod
    def _host(cls, v: str) -> str:
        return check_registry_host(v, None)  # (a ReferenceError is a ValueError: pydantic reports it)

    def credentials(self) -> Credentials | None:
        if self.username:
            return Credentials(self.username, self.password.get() if self.password else "")
        return load_docker_credentials(self.endpoint) if self.docker_config else None

    def use_plain_http(self) -> bool:
        return self.plain_http if self.plain_http is not None else is_loopback(self.endpoint)


_PROFILE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ProfileRule(_Strict):
    """Record a start-up profile after each conversion the rule makes (``service.auto_profile``):
    the image's Entrypoint + Cmd run in a runc sandbox (no network, read-only root from the
    lazy mount) for ``seconds``, and the chunks it read are pushed as a profile referrer of the
    accelerated image with ``label``. Host platform only; needs root, runc and /dev/fuse."""

    seconds: float = Field(default=10.0, gt=0, le=600)  # how long the workload runs before SIGKILL
    label: str = "startup"  # the profile's label (what nodes and prewarm look up)
    memory_limit: int = Field(default=512 << 20, ge=16 << 20)  # bytes: the sandbox's memory cgroup limit

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not _PROFILE_LABEL.fullmatch(v):
            raise ValueError(f"invalid profile label {v!r}: expected 1 to 128 of [A-Za-z0-9._-], starting alphanumeric")
        return v


class Rule(_Strict):
    repository: str = "*"  # glob over the repository path, e.g. "team/*"
    tag: str = ".*"  # regex over the tag (full match); digest-only pushes match when it matches ""
    mode: Literal["index", "full"] = "index"
    compression: Literal["zstd", "lz4"] = "zstd"
    tag_suffix: str | None = None
    platforms: list[str] = []
    enabled: bool = True
    profile: ProfileRule | None = None  # e.g. {seconds: 10, label: startup}: record a start-up profile

    @field_validator("tag")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex: {e}") from e
        return v

    @field_validator("tag_suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not _TAG_SUFFIX.fullmatch(v):
            raise ValueError(f"invalid tag suffix {v!r}: expected 1 to 64 of [A-Za-z0-9._-]")
        return v

    def matches(self, repository: str, tag: str | None) -> bool:
        return fnmatch.fnmatchcase(repository, self.repository) and re.fullmatch(self.tag, tag or "") is not None

    @property
    def suffix(self) -> str:
        return self.tag_suffix if self.tag_suffix is not None else DEFAULT_SUFFIX[self.mode]

    def options(self, cache_repo: str | None, limits: ConversionLimits | None = None) -> ConvertOptions:
        return ConvertOptions(
            mode=self.mode,
            compression=self.compression,
            tag_suffix=self.tag_suffix,
            platforms=tuple(self.platforms),
            cache_repo=cache_repo,
            limits=limits or ConversionLimits(),
        )


class RetryConfig(_Strict):
    attempts: int = Field(default=5, ge=1)  # conversion attempts per job
    base_delay: float = Field(default=2.0, gt=0)  # seconds, doubled each attempt, with jitter
    max_delay: float = Field(default=300.0, gt=0)
    request_attempts: int = Field(default=6, ge=1)  # per registry request (429, 5xx, drops)

    def request_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.request_attempts)


class IsolationConfig(_Strict):
    """Each job converts in a child process held to these limits (``service.isolated_job``)."""

    enabled: bool = True  # false: convert inside the service process (debugging only)
    memory_limit: int = Field(default=4 << 30, ge=256 << 20)  # bytes of address space (RLIMIT_AS)
    timeout: float = Field(default=3600.0, gt=0)  # seconds of wall-clock time per attempt


class InboundAuth(_Strict):
    header: str = "Authorization"  # Harbor sends its auth_header here; distribution its headers
    token: Secret | None = None  # the header must equal this (or "Bearer <token>")


class WebhookConfig(_Strict):
    url: str
    target: str = ".*"  # regex searched in the produced target reference (e.g. "_accelerated$")
    format: Literal["json", "cloudevents"] = "json"
    secret: Secret | None = None  # HMAC-SHA256 of the body, hex, in X-Imgaccel-Signature: sha256=<hex>
    max_attempts: int = Field(default=10, ge=1)
    expire_after: float = Field(default=86400.0, gt=0)  # seconds until a delivery is given up

    @field_validator("target")
    @classmethod
    def _regex(cls, v: str) -> str:
        re.compile(v)
        return v


class StoreConfig(_Strict):
    """Where jobs live: SQLite in data_dir (no url: one replica), or a PostgreSQL database that
    several replicas share."""

    url: str | None = None  # postgresql://user@host:5432/db (no password here: use password)
    password: Secret | None = None
    pool_min: int = Field(default=1, ge=0, le=100)  # connections per replica
    pool_max: int = Field(default=10, ge=1, le=200)
    timeout: float = Field(default=10.0, gt=0)  # seconds to connect or run one statement
    lease_seconds: float = Field(default=60.0, ge=3)  # a dead replica's jobs run again after this
    migrate: Literal["auto", "off"] = "auto"  # auto: at start, under an advisory lock; off: `serve --migrate`

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"postgres(ql)?://[^\s:@/]+@[^\s/]+/[^\s/?]+(\?[^\s]*)?", v):
            raise ValueError("expected postgresql://USER@HOST[:PORT]/DATABASE (the password goes in 'password')")
        return v


class ServiceConfig(_Strict):
    listen: str = "127.0.0.1:8080"
    data_dir: Path = Path("imgaccel-data")
    workers: int = Field(default=4, ge=1, le=64)
    registries: list[RegistryConfig] = []  # registries not listed are used with defaults
    rules: list[Rule] = [Rule()]  # first match wins
    cache_repo: str | None = "imgaccel-cache"
    max_body: int = Field(default=1 << 20, ge=1024)  # bytes; larger event bodies get 413
    events_auth: InboundAuth = InboundAuth()
    api_auth: InboundAuth = InboundAuth()
    retry: RetryConfig = RetryConfig()
    reconcile_interval: float = Field(default=300.0, ge=0)  # seconds; 0 turns the reconciler off
    webhooks: list[WebhookConfig] = []
    limits: ConversionLimits = ConversionLimits()  # what one image may declare
    isolation: IsolationConfig = IsolationConfig()
    prewarm: PrewarmConfig = PrewarmConfig()
    store: StoreConfig = StoreConfig()

    @field_validator("cache_repo")
    @classmethod
    def _cache_repo(cls, v: str | None) -> str | None:
        return None if v is None else check_repository(v, None)

    def registry(self, endpoint: str) -> RegistryConfig:
        for r in self.registries:
            if r.endpoint == endpoint:
                return r
        return RegistryConfig(endpoint=endpoint)

    def rule_for(self, repository: str, tag: str | None) -> Rule | None:
        """The first matching rule, or None (no rule, a disabled rule, or our own output tag)."""
        if tag and (any(tag.endswith(r.suffix) for r in self.rules) or _REFERRERS_TAG.fullmatch(tag)):
            return None
        for rule in self.rules:
            if rule.matches(repository, tag):
                return rule if rule.enabled else None
        return None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names the field."""


def load_config(path: Path | None) -> ServiceConfig:
    if path is None:
        return ServiceConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    try:
        return ServiceConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from e
