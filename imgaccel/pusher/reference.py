"""Parse image references (``host[:port]/repo[:tag][@digest]``) and decide plain HTTP vs TLS."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ReferenceError(ValueError):
    """A malformed image reference."""


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> ImageRef:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageRef:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str) -> ImageRef:
    """Parse a fully qualified reference; the registry host is required."""
    s = text.strip()
    digest = None
    if "@" in s:
        s, digest = s.split("@", 1)
        if not _DIGEST.match(digest):
            raise ReferenceError(f"{text!r}: digest must be sha256:<64 hex>")
    if "/" not in s:
        raise ReferenceError(f"{text!r}: expected REGISTRY/REPOSITORY[:TAG]")
    registry, rest = s.split("/", 1)
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise ReferenceError(f"{text!r}: the first part must be a registry host (e.g. 127.0.0.1:5000)")
    tag = None
    if ":" in rest.rsplit("/", 1)[-1]:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ReferenceError(f"{text!r}: invalid tag {tag!r}")
    if not _REPO.match(rest):
        raise ReferenceError(f"{text!r}: invalid repository name {rest!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, rest, tag, digest)


def is_loopback(registry: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
