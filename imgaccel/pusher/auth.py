"""Registry credentials from the Docker config file, and the WWW-Authenticate challenge flow.

Credentials are read from ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``),
``auths[host].auth`` (base64 ``user:password``) or ``username``/``password``. A 401 carrying
``WWW-Authenticate: Basic`` is answered with basic auth; ``Bearer realm=...,service=...,
scope=...`` with a token fetched from the realm (basic auth to the realm when credentials exist,
anonymous otherwise), as the distribution token spec describes.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # never in a repr, so never in a log line or a traceback

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def load_docker_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (host[:port]) from the Docker config file, if any."""
    path = path or docker_config_path()
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read Docker config: {e}") from e
    auths = cfg.get("auths") or {}
    for key in (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"):
        entry = auths.get(key)
        if not entry:
            continue
        if entry.get("auth"):
            user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(user, pw)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge:
    scheme, _, rest = header.strip().partition(" ")
    return Challenge(scheme.lower(), dict(_PARAM.findall(rest)))
