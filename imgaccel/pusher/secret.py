"""``Secret``: a password or token in a configuration file, given inline or by environment variable."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Secret(BaseModel):
    """A secret given inline (``value``) or by environment variable name (``env``). The variable
    must be set when the configuration is loaded; ``value`` never shows in a repr or a log."""

    model_config = ConfigDict(extra="forbid")

    value: str | None = Field(default=None, repr=False)
    env: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Secret:
        if (self.value is None) == (self.env is None):
            raise ValueError("give exactly one of 'value' or 'env'")
        if self.env is not None and os.environ.get(self.env) is None:
            raise ValueError(f"environment variable {self.env} is not set")
        return self

    def get(self) -> str:
        if self.value is not None:
            return self.value
        assert self.env is not None
        value = os.environ.get(self.env)
        if value is None:
            raise ValueError(f"environment variable {self.env} is not set")
        return value
