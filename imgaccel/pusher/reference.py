"""Parse image references (``host[:port]/repo[:tag][@digest]``) and decide plain HTTP vs TLS.

Every registry host, repository name, tag and digest that imgaccel puts into a URL goes
through the strict checks here first (events, the service config, references, the registry
client), so that nothing a pusher or an event sender writes can move a request to another host
or outside ``/v2/<name>/``:

* host: a DNS name, a dotted IPv4 address or a bracketed IPv6 address, then an optional port
  1-65535; no userinfo (``@``), path, query, fragment, percent-encoding, backslash, whitespace
  or non-ASCII character, and no numeric host that is not a plain dotted quad (``127.1``,
  ``2130706433`` or ``0x7f.1`` would reach an address the loopback check never saw);
* repository: path components ``[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*`` joined by ``/``, at
  most 255 characters (the distribution grammar);
* tag: ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``;
* digest: ``sha256:<64 hex>`` or ``sha512:<128 hex>``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from imgaccel.pusher.errors import RegistryError

MAX_REPOSITORY_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_IPV4ISH = re.compile(r"[0-9.]+")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_PRINTABLE_ASCII = re.compile(r"[!-~]+")  # no whitespace, no control or non-ASCII character


class ReferenceError(RegistryError, ValueError):
    """A malformed image reference, registry host, repository name, tag or digest.

    A ``RegistryError`` (the registry client raises it for a name it refuses to put in a URL)
    and a ``ValueError``: every caller already reports either as one line.
    """


def show(value: object, limit: int = 120) -> str:
    """``repr`` of a (possibly hostile) value for a one-line message: escaped, bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(field: str | None, what: str, value: object, why: str) -> ReferenceError:
    prefix = f"{field}: " if field else ""
    return ReferenceError(f"{prefix}invalid {what} {show(value)}: {why}")


@dataclass(frozen=True)
class RegistryHost:
    host: str  # a DNS name, a dotted IPv4 address, or an IPv6 address (without brackets)
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def _host_problem(text: str) -> str | None:
    """Why ``text`` is not ``host[:port]``, or None."""
    if not text:
        return "empty"
    if len(text) > 261:
        return "longer than 261 characters"
    if "@" in text:
        return "userinfo ('@') is not allowed"
    if "%" in text:
        return "percent-encoding is not allowed"
    if "\\" in text:
        return "a backslash is not allowed"
    if any(c in text for c in "/?#"):
        return "a path, query or fragment is not allowed"
    if not _PRINTABLE_ASCII.fullmatch(text):
        return "whitespace, control and non-ASCII characters are not allowed"
    return None


def parse_registry_host(text: object, field: str | None = None) -> RegistryHost:
    """``host[:port]`` parsed strictly (see the module docstring); ``ReferenceError`` otherwise."""
    if not isinstance(text, str):
        raise _fail(field, "registry host", text, "not a string")
    problem = _host_problem(text)
    if problem:
        raise _fail(field, "registry host", text, problem)
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not _IPV6_CHARS.fullmatch(inside):
            raise _fail(field, "registry host", text, "a bracketed host must be an IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise _fail(field, "registry host", text, "a bracketed host must be an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _fail(field, "registry host", text, "only ':PORT' may follow the address")
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise _fail(field, "registry host", text, "an IPv6 address must be in brackets")
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if _IPV4ISH.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _fail(field, "registry host", text, "a numeric host must be a dotted-quad IPv4 address") from None
        else:
            labels = host.split(".")
            if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
                raise _fail(field, "registry host", text, "not a valid host name")
            if labels[-1][0].isdigit():
                raise _fail(field, "registry host", text, "the last label of a host name must not be numeric")
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise _fail(field, "registry host", text, "the port must be a number from 1 to 65535")
        port = int(port_text)
    return RegistryHost(host, port)


def check_registry_host(text: object, field: str | None = None) -> str:
    """``text`` itself when it is a valid ``host[:port]``; ``ReferenceError`` otherwise."""
    parse_registry_host(text, field)
    assert isinstance(text, str)
    return text


def check_repository(name: object, field: str | None = None) -> str:
    if not isinstance(name, str):
        raise _fail(field, "repository name", name, "not a string")
    if len(name) > MAX_REPOSITORY_LENGTH:
        raise _fail(field, "repository name", name, f"longer than {MAX_REPOSITORY_LENGTH} characters")
    if not _REPO.fullmatch(name):
        raise _fail(
            field, "repository name", name, "expected lowercase path components [a-z0-9] separated by '.', '_', '__' "
            "or '-' and joined by '/'",
        )  # fmt: skip
    return name


def check_tag(tag: object, field: str | None = None) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise _fail(field, "tag", tag, "expected [A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
    return tag


def check_digest(digest: object, field: str | None = None) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _fail(field, "digest", digest, "expected sha256:<64 hex> or sha512:<128 hex>")
    return digest


def is_digest(reference: str) -> bool:
    """True when ``reference`` names a manifest by digest (tags cannot contain ':')."""
    return ":" in reference


def check_reference(reference: object, field: str | None = None) -> str:
    """A tag or a digest, as it goes after ``/manifests/``."""
    if isinstance(reference, str) and is_digest(reference):
        return check_digest(reference, field)
    return check_tag(reference, field)


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        check_registry_host(self.registry, "registry")
        check_repository(self.repository, f"{self.registry}: repository")
        if self.tag is not None:
            check_tag(self.tag, f"{self.registry}/{self.repository}: tag")
        if self.digest is not None:
            check_digest(self.digest, f"{self.registry}/{self.repository}: digest")

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


def parse_repository_reference(text: str, field: str | None = None) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@digest]`` -> (repository, tag, digest), each checked strictly."""
    rest, at, digest = text.partition("@")
    if at:
        check_digest(digest, field)
    tag = None
    if ":" in rest.rsplit("/", 1)[-1]:
        rest, tag = rest.rsplit(":", 1)
        check_tag(tag, field)
    check_repository(rest, field)
    return rest, tag, digest if at else None


def parse_reference(text: str) -> ImageRef:
    """Parse a fully qualified reference; the registry host is required."""
    s = text.strip()
    if "/" not in s:
        raise ReferenceError(f"{show(text)}: expected REGISTRY/REPOSITORY[:TAG][@DIGEST]")
    registry, rest = s.split("/", 1)
    if not ("." in registry or ":" in registry or registry == "localhost" or registry.startswith("[")):
        raise ReferenceError(f"{show(text)}: the first part must be a registry host (e.g. 127.0.0.1:5000)")
    check_registry_host(registry, show(text))
    repository, tag, digest = parse_repository_reference(rest, show(text))
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest)


def is_loopback(registry: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port).

    ``registry`` is parsed strictly first: anything that is not a plain ``host[:port]`` (say
    ``127.0.0.1:5000@elsewhere``) raises ``ReferenceError`` instead of answering.
    """
    host = parse_registry_host(registry).host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
