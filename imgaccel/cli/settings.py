"""The CLI's optional config file: which registries speak plain HTTP, and their credentials.

``$IMGACCEL_CONFIG`` or ``~/.config/imgaccel/config.yaml``::

    registries:
      registry.internal:5000:
        plain_http: true          # default: true on loopback, false elsewhere
        username: ci              # optional; otherwise the Docker config file is used
        password_env: REG_PASS    # name of the environment variable holding the password
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from imgaccel.pusher.auth import Credentials


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plain_http: bool | None = None
    username: str | None = None
    password: str | None = None
    password_env: str | None = None

    def credentials(self) -> Credentials | None:
        if not self.username:
            return None
        password = self.password or (os.environ.get(self.password_env, "") if self.password_env else "")
        return Credentials(self.username, password)


class CliSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registries: dict[str, RegistrySettings] = {}


def settings_path() -> Path:
    env = os.environ.get("IMGACCEL_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "imgaccel" / "config.yaml"


def load_settings(path: Path | None = None) -> CliSettings:
    path = path or settings_path()
    if not path.exists():
        return CliSettings()
    try:
        return CliSettings.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as e:
        raise ValueError(f"{path}: invalid config: {e}") from e
