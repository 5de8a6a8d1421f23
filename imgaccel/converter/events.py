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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgaccel.formats import oci

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
            ignored.append(f"events[{i}]: action {action!r}")
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
        host = _str(request, "host") if isinstance(request, dict) else None
        pushes.append(ManifestPush(host, repo, digest, _str(target, "tag")))
    return pushes, ignored


def _harbor_data(data: Any) -> tuple[list[ManifestPush], list[str]]:
    if not isinstance(data, dict):
        raise EventError("event_data must be an object")
    repo_obj = data.get("repository")
    repo = _str(repo_obj, "repo_full_name") if isinstance(repo_obj, dict) else None
    resources = data.get("resources")
    if not repo or not isinstance(resources, list):
        raise EventError("event_data needs repository.repo_full_name and resources")
    pushes = []
    for i, res in enumerate(resources):
        digest = _str(res, "digest") if isinstance(res, dict) else None
        if not digest:
            raise EventError(f"event_data.resources[{i}] has no digest")
        url = _str(res, "resource_url") or ""
        host = url.split("/", 1)[0] if "/" in url else None
        pushes.append(ManifestPush(host, repo, digest, _str(res, "tag")))
    return pushes, []


def parse_event_body(body: Any) -> tuple[list[ManifestPush], list[str]]:
    """(manifest pushes, reasons for what was ignored) from a decoded JSON body."""
    if not isinstance(body, dict):
        raise EventError("the body must be a JSON object")
    if "events" in body:
        return _distribution(body["events"])
    if body.get("specversion"):
        if body.get("type") != "harbor.artifact.pushed":
            return [], [f"CloudEvent type {body.get('type')!r}"]
        return _harbor_data(body.get("data"))
    if "type" in body and "event_data" in body:
        if body["type"] != "PUSH_ARTIFACT":
            return [], [f"Harbor event type {body['type']!r}"]
        return _harbor_data(body["event_data"])
    raise EventError("not a registry notification (expected 'events', a Harbor or a CloudEvents payload)")
