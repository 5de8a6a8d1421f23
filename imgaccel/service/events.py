"""Parse push notifications into ``ManifestPush`` records.

Three senders are understood (field shapes in ../shared/DESIGN.md):

* CNCF distribution: ``{"events": [{"action": "push", "target": {"mediaType", "digest",
  "repository", "tag"?}, "request": {"host"}}]}`` (content type
  ``application/vnd.docker.distribution.events.v1+json`` or ``v2``).
* Harbor's default webhook: ``{"type": "PUSH_ARTIFACT", "event_data": {"resources":
  [{"digest", "tag", "resource_url"}], "repository": {"repo_full_name"}}}``.
* Harbor CloudEvents: ``{"specversion": "1.0", "type": "harbor.artifact.pushed",
  "data": <event_data as above>}``.

Only manifest pushes count: blob pushes, pulls, deletes and other event types are skipped
(returned as ``ignored`` with a reason) so the caller can acknowledge them.

Every host, repository name, tag and digest of a push is checked strictly
(``imgaccel.pusher.reference``) before anything is decided about it: one bad field makes the
whole payload an ``EventError`` naming the field and the value, so nothing of it is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgaccel.formats import oci
from imgaccel.pusher.reference import (
    ReferenceError,
    check_digest,
    check_registry_host,
    check_repository,
    check_tag,
    parse_registry_host,
    parse_repository_reference,
    show,
)

MANIFEST_MEDIA_TYPES = frozenset((*oci.MANIFEST_TYPES, *oci.INDEX_TYPES))


class EventError(ValueError):
    """A payload that is not one of the understood event formats."""


@dataclass(frozen=True)
class ManifestPush:
    registry: str | None  # host[:port] the sender saw, when it says so
    repository: str
    digest: str
    tag: str | None  # None for a push by digest: never invent a tag


def _str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _checked(check: Callable[[object, str | None], object], value: object, field: str) -> None:
    """Run one strict check; its ``ReferenceError`` becomes an ``EventError`` naming ``field``."""
    try:
        check(value, field)
    except ReferenceError as e:
        raise EventError(str(e)) from None


def _distribution(events: Any) -> tuple[list[ManifestPush], list[str]]:
    if not isinstance(events, list):
        raise EventError("'events' must be a list")
    pushes, ignored = [], []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or not isinstance(ev.get("target"), dict):
            raise EventError(f"events[{i}] has no target object")
        target = ev["target"]
        action = ev.get("action")
        media_type = _str(target, "mediaType")
        if action != "push":
            ignored.append(f"events[{i}]: action {show(action)}")
            continue
        if media_type not in MANIFEST_MEDIA_TYPES:
            ignored.append(f"events[{i}]: {media_type or 'no media type'} is not an image manifest")
            continue
        repo, digest = _str(target, "repository"), _str(target, "digest")
        if not repo or not digest:
            raise EventError(f"events[{i}].target needs repository and digest")
        request = ev.get("request")
        if isinstance(request, dict) and str(request.get("useragent", "")).startswith("imgaccel/"):
            ignored.append(f"events[{i}]: pushed by imgaccel itself")
            continue
        _checked(check_repository, repo, f"events[{i}].target.repository")
        _checked(check_digest, digest, f"events[{i}].target.digest")
        tag = target.get("tag")
        if tag is not None and tag != "":  # absent, null or "": a push by digest
            _checked(check_tag, tag, f"events[{i}].target.tag")
        host = request.get("host") if isinstance(request, dict) else None
        if host is not None and host != "":  # absent, null or "": the sender does not say
            _checked(check_registry_host, host, f"events[{i}].request.host")
        pushes.append(ManifestPush(host or None, repo, digest, tag or None))
    return pushes, ignored


def _resource_host(url: object, repo: str, field: str) -> str:
    """The registry host of a Harbor ``resource_url`` (``host[:port]/repo[:tag|@digest]``),
    parsed strictly; its repository must be ``repo``."""
    if not isinstance(url, str) or "/" not in url:
        raise EventError(f"{field}: invalid resource URL {show(url)}: expected HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    host, _, rest = url.partition("/")
    try:
        parse_registry_host(host)
        named, _, _ = parse_repository_reference(rest)
    except ReferenceError as e:
        raise EventError(f"{field}: {show(url)}: {e}") from None
    if named != repo:
        raise EventError(f"{field}: {show(url)} names repository {show(named)}, not {show(repo)}")
    return host


def _harbor_data(data: Any, where: str) -> tuple[list[ManifestPush], list[str]]:
    if not isinstance(data, dict):
        raise EventError(f"{where} must be an object")
    repo_obj = data.get("repository")
    repo = _str(repo_obj, "repo_full_name") if isinstance(repo_obj, dict) else None
    resources = data.get("resources")
    if not repo or not isinstance(resources, list):
        raise EventError(f"{where} needs repository.repo_full_name and resources")
    _checked(check_repository, repo, f"{where}.repository.repo_full_name")
    pushes = []
    for i, res in enumerate(resources):
        field = f"{where}.resources[{i}]"
        digest = _str(res, "digest") if isinstance(res, dict) else None
        if not isinstance(res, dict) or not digest:
            raise EventError(f"{field} has no digest")
        _checked(check_digest, digest, f"{field}.digest")
        tag = res.get("tag")
        if tag is not None and tag != "":
            _checked(check_tag, tag, f"{field}.tag")
        url = res.get("resource_url")
        host = None if url is None or url == "" else _resource_host(url, repo, f"{field}.resource_url")
        pushes.append(ManifestPush(host, repo, digest, tag or None))
    return pushes, []


def parse_event_body(body: Any) -> tuple[list[ManifestPush], list[str]]:
    """(manifest pushes, reasons for what was ignored) from a decoded JSON body."""
    if not isinstance(body, dict):
        raise EventError("the body must be a JSON object")
    if "events" in body:
        return _distribution(body["events"])
    if body.get("specversion"):
        if body.get("type") != "harbor.artifact.pushed":
            return [], [f"CloudEvent type {show(body.get('type'))}"]
        return _harbor_data(body.get("data"), "data")
    if "type" in body and "event_data" in body:
        if body["type"] != "PUSH_ARTIFACT":
            return [], [f"Harbor event type {show(body['type'])}"]
        return _harbor_data(body["event_data"], "event_data")
    raise EventError("not a registry notification (expected 'events', a Harbor or a CloudEvents payload)")
