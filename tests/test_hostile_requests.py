"""Hostile input: what a pusher or an event sender writes never moves a request to another host
or outside ``/v2/<name>/``, and a layer whose descriptor lies about its size fails at once.

A plain listener socket on 127.0.0.2 stands for "another host": the real service (default
config, no ``registries:``) and the registry client must never connect to it, and the real
registry's access log must show no request outside ``/v2/``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fixtures.build_images import Member, tar_bytes
from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import (
    ReferenceError,
    check_digest,
    check_registry_host,
    check_repository,
    check_tag,
    is_loopback,
    parse_reference,
    parse_registry_host,
)
from imgaccel.service.events import EventError, parse_event_body
from tests.helpers import sha256
from tests.raw_push import push_image
from tests.registry import Registry, start_registry
from tests.service import ServiceProcess, make_service
from tests.test_bad_input import assert_fails_cleanly
from tests.threaded_app import ThreadedApp

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DIGEST = "sha256:" + "ab" * 32
ACCESS_LINE = re.compile(r'"([A-Z]+) (\S*) HTTP/[0-9.]+"')

# -- the strict validators ---------------------------------------------------------------

GOOD_HOSTS = {
    "localhost": ("localhost", None),
    "localhost:5000": ("localhost", 5000),
    "127.0.0.1:5000": ("127.0.0.1", 5000),
    "registry.example.com": ("registry.example.com", None),
    "Registry.Example.COM:443": ("Registry.Example.COM", 443),
    "reg-1.internal:65535": ("reg-1.internal", 65535),
    "10.0.0.5:1": ("10.0.0.5", 1),
    "[::1]": ("::1", None),
    "[::1]:5000": ("::1", 5000),
    "[2001:db8::1]:443": ("2001:db8::1", 443),
    "xn--bcher-kva.example": ("xn--bcher-kva.example", None),
    "123.example": ("123.example", None),
}
BAD_HOSTS = [
    "",
    "127.0.0.1:5000@127.0.0.2",  # userinfo: the URL would go to 127.0.0.2
    "127.0.0.1:5000@127.0.0.2:8080",
    "[::1]@127.0.0.2:8080",
    "user@registry.example",
    "127.0.0.1:5000/path",
    "127.0.0.1:5000?x=1",
    "127.0.0.1:5000#frag",
    "127.0.0.1:5000\\@127.0.0.2",
    "127.0.0.1%3a5000",
    "127.0.0.1 :5000",
    " 127.0.0.1:5000",
    "127.0.0.1:5000\n",
    "127.0.0.1:5000\t",
    "regístry.example",
    "127.0.0.1:",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:05000",
    "127.0.0.1:+500",
    "127.0.0.1:5000:6000",
    "::1",
    "::1:5000",
    "[::1",
    "[::1]x",
    "[::1]:",
    "[127.0.0.1]",
    "[fe80::1%25eth0]",
    "127.1",  # inet_aton forms: the resolver reads these as 127.0.0.1 / 127.0.0.2
    "127.2:8080",
    "0x7f000002",
    "0x7f.0.0.2",
    "2130706434:8080",
    "127.000.000.001",
    "1.2.3.4.",
    "reg..example",
    "-reg.example",
    "reg-.example",
    "reg_1.example",
    "a" * 64 + ".example",
    ".example",
    "http://127.0.0.1:5000",
]

GOOD_REPOS = ["a", "app", "team/app", "a/b/c", "a.b", "a_b", "a__b", "a-b", "a---b", "x1/y2.z3_w4", "a" * 255]
BAD_REPOS = [
    "",
    "../admin",
    "a/../b",
    "a/%2e%2e/b",
    "a/%2F/b",
    "a%2Fb",
    "a?x=1",
    "a#x",
    "A B",
    "Admin",
    "a b",
    "/a",
    "a/",
    "a//b",
    "a\\b",
    ".a",
    "a.",
    "a..b",
    "a___b",
    "a\n",
    "a/b\n",
    "a" * 256,
    "a@b",
    "a:b",
]
GOOD_TAGS = ["v1", "latest", "V1.2.3-rc_4", "_x", "a" * 128, "sha256-" + "0" * 64]
BAD_TAGS = ["", ".v1", "-v1", "v1/../x", "a" * 129, "v 1", "v1\n", "v1?x", "v1#x", "v1%2F", "v:1", "v1@x"]
GOOD_DIGESTS = ["sha256:" + "0" * 64, "sha512:" + "f" * 128]
BAD_DIGESTS = [
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "A" * 64,
    "sha512:" + "0" * 64,
    "md5:" + "0" * 32,
    "sha256:../../admin",
    "sha256:" + "0" * 64 + "\n",
    "sha256:" + "0" * 64 + "/x",
    "sha256",
]


@pytest.mark.parametrize("text", list(GOOD_HOSTS))
def test_good_registry_hosts(text: str) -> None:
    parsed = parse_registry_host(text)
    assert (parsed.host, parsed.port) == GOOD_HOSTS[text]
    assert check_registry_host(text) == text


@pytest.mark.parametrize("text", BAD_HOSTS)
def test_bad_registry_hosts(text: str) -> None:
    with pytest.raises(ReferenceError) as e:
        parse_registry_host(text, "request.host")
    message = str(e.value)
    assert message.startswith("request.host: invalid registry host ") and "\n" not in message
    with pytest.raises(ReferenceError):
        is_loopback(text)  # no answer at all for what is not host[:port]
    if "/" not in text and text == text.strip():  # else the reference reads differently (or is trimmed)
        with pytest.raises(ReferenceError):
            parse_reference(f"{text}/team/app:v1")
    with pytest.raises(ReferenceError):
        RegistryClient(text, credentials=None)


def test_names_tags_digests() -> None:
    for repo in GOOD_REPOS:
        assert check_repository(repo) == repo
    for tag in GOOD_TAGS:
        assert check_tag(tag) == tag
    for digest in GOOD_DIGESTS:
        assert check_digest(digest) == digest
    for check, bad in ((check_repository, BAD_REPOS), (check_tag, BAD_TAGS), (check_digest, BAD_DIGESTS)):
        for value in bad:
            with pytest.raises(ReferenceError) as e:
                check(value, "target.x")
            assert str(e.value).startswith("target.x: invalid ") and "\n" not in str(e.value), value
            assert isinstance(e.value, RegistryError) and isinstance(e.value, ValueError)
    for repo in BAD_REPOS:
        if "@" not in repo and ":" not in repo and repo.strip():
            with pytest.raises(ReferenceError):
                parse_reference(f"127.0.0.1:5000/{repo}:v1")


def test_event_parser_names_the_field() -> None:
    def distribution(target: dict[str, Any], host: str = "127.0.0.1:5000") -> dict[str, Any]:
        base = {"mediaType": oci.OCI_MANIFEST, "digest": DIGEST, "repository": "team/app", "tag": "v1"}
        return {"events": [{"action": "push", "target": {**base, **target}, "request": {"host": host}}]}

    pushes, _ = parse_event_body(distribution({}))
    assert [(p.registry, p.repository, p.digest, p.tag) for p in pushes] == [
        ("127.0.0.1:5000", "team/app", DIGEST, "v1")
    ]
    cases = [
        (distribution({}, "127.0.0.1:5000@127.0.0.2"), "events[0].request.host", "'127.0.0.1:5000@127.0.0.2'"),
        (distribution({"repository": "../admin"}), "events[0].target.repository", "'../admin'"),
        (distribution({"tag": "v1/../../x"}), "events[0].target.tag", "'v1/../../x'"),
        (distribution({"digest": "sha256:../x"}), "events[0].target.digest", "'sha256:../x'"),
    ]
    harbor_url = "127.0.0.1:5000@127.0.0.2/team/app:v1"
    resource = {"digest": DIGEST, "tag": "v1", "resource_url": harbor_url}
    data = {"resources": [resource], "repository": {"repo_full_name": "team/app"}}
    cases += [
        ({"type": "PUSH_ARTIFACT", "event_data": data}, "event_data.resources[0].resource_url", repr(harbor_url)),
        (
            {"specversion": "1.0", "type": "harbor.artifact.pushed", "data": data},
            "data.resources[0].resource_url",
            repr(harbor_url),
        ),
    ]
    other_repo = {**data, "resources": [{**resource, "resource_url": "127.0.0.1:5000/other/app:v1"}]}
    cases.append(({"type": "PUSH_ARTIFACT", "event_data": other_repo}, "resource_url", "'other/app'"))
    for body, where, value in cases:
        with pytest.raises(EventError) as e:
            parse_event_body(body)
        assert where in str(e.value) and value in str(e.value), str(e.value)


# -- a listener on another loopback address ----------------------------------------------


@dataclass
class Listener:
    """A plain TCP listener on 127.0.0.2 that records every connection (and its first bytes)."""

    port: int = 0
    connections: list[tuple[str, bytes]] = field(default_factory=list)
    _sock: socket.socket = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Listener:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.2", self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    data = conn.recv(200)
                except OSError:
                    data = b""
                self.connections.append((f"{peer[0]}:{peer[1]}", data))

    @property
    def host(self) -> str:
        return f"127.0.0.2:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    other = Listener().start()
    try:
        yield other
    finally:
        other.stop()


@pytest.fixture(scope="module")
def port80() -> Iterator[Listener | None]:
    """127.0.0.2:80 too when it can be bound (root, free): a host with userinfo and no port
    (``127.0.0.1:5000@127.0.0.2``) sends the request there; the old loopback check let it by."""
    try:
        other = Listener(port=80).start()
    except OSError:
        yield None
        return
    try:
        yield other
    finally:
        other.stop()


def access_log(registry: Registry) -> list[tuple[str, str]]:
    """(method, path) of every request in the registry's access log."""
    text = (registry.root.parent / "registry.log").read_text(errors="replace")
    return [(m.group(1), m.group(2)) for m in ACCESS_LINE.finditer(text)]


def outside_v2(requests: list[tuple[str, str]]) -> list[tuple[str, str]]:
    def bad(path: str) -> bool:
        p = path.split("?", 1)[0]
        return not p.startswith("/v2/") or "/../" in p or "/./" in p or "%2e" in p.lower() or "%2f" in p.lower()

    return [(m, p) for m, p in requests if bad(p)]


# -- the service, with its default config, gets hostile events ----------------------------


@dataclass
class Env:
    registry: Registry
    service: ServiceProcess
    listener: Listener
    port80: Listener | None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, listener: Listener, port80: Listener | None) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("hostile")
    registry = start_registry(work / "registry")
    try:
        service = make_service(work / "service", {}).start()  # no registries: loopback only
        try:
            yield Env(registry, service, listener, port80)
        finally:
            service.stop()
    finally:
        registry.stop()


def post_event(service: ServiceProcess, body: Any, content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"{service.url}/events", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def one_json_error(raw: bytes) -> str:
    assert raw.count(b"\n") <= 1 and len(raw.strip().splitlines()) == 1, raw
    body = json.loads(raw)
    assert list(body) == ["error"] and "\n" not in body["error"], body
    return str(body["error"])


def distribution_event(host: str, repository: str, tag: str | None = "v1", digest: str = DIGEST) -> dict[str, Any]:
    target: dict[str, Any] = {"mediaType": oci.OCI_MANIFEST, "digest": digest, "repository": repository}
    if tag is not None:
        target["tag"] = tag
    return {"events": [{"action": "push", "target": target, "request": {"host": host, "method": "PUT"}}]}


def harbor_event(resource_url: str, repository: str, cloudevents: bool) -> tuple[dict[str, Any], str]:
    data = {
        "resources": [{"digest": DIGEST, "tag": "v1", "resource_url": resource_url}],
        "repository": {"name": repository.rsplit("/", 1)[-1], "repo_full_name": repository},
    }
    if cloudevents:
        body = {"specversion": "1.0", "id": "1", "source": "harbor", "type": "harbor.artifact.pushed", "data": data}
        return body, "application/cloudevents+json"
    return {"type": "PUSH_ARTIFACT", "occur_at": 1, "event_data": data}, "application/json"


def hostile_hosts(registry: Registry, other: Listener) -> list[str]:
    reg_port = registry.host.rsplit(":", 1)[1]
    return [
        f"127.0.0.1:{reg_port}@127.0.0.2",  # the example: the old code connected to 127.0.0.2:80
        f"127.0.0.1:{reg_port}@{other.host}",
        f"127.0.0.1@{other.host}",
        f"localhost:{reg_port}@{other.host}",
        f"[::1]@{other.host}",  # passed the old loopback check (the bracketed part was read as the host)
        f"[::1]:{reg_port}@{other.host}",
        f"127.0.0.1:{reg_port}#@{other.host}",
        f"127.0.0.1:{reg_port}\\@{other.host}",
        f"127.0.0.1:{reg_port}/@{other.host}",
        f"127.0.0.1:{reg_port}%40{other.host}",
        f"127.2:{other.port}",  # what the resolver reads as 127.0.0.2
        f"0x7f000002:{other.port}",
        f"2130706434:{other.port}",
        f"127.0.0.1:{reg_port} ",
    ]


HOSTILE_REPOS = ["../admin", "a/%2e%2e/b", "a?x=1", "A B", "../../admin/secret", "a/../../v1", "a#x", "a%2Fb", "a\\b"]


def test_hostile_events_are_rejected(env: Env) -> None:
    reg, service, other = env.registry, env.service, env.listener
    log_before = len(access_log(reg))
    checked = 0
    for host in hostile_hosts(reg, other):
        status, raw = post_event(service, distribution_event(host, "team/app"))
        error = one_json_error(raw)
        assert status == 400 and "events[0].request.host" in error and repr(host) in error, (host, status, error)
        checked += 1
        if "/" in host:
            continue  # a resource_url holding it would be split at that '/'
        for cloudevents in (False, True):
            body, ctype = harbor_event(f"{host}/team/app:v1", "team/app", cloudevents)
            status, raw = post_event(service, body, ctype)
            error = one_json_error(raw)
            where = "data" if cloudevents else "event_data"
            assert status == 400 and f"{where}.resources[0].resource_url" in error and repr(host) in error, error
            checked += 1
    for repo in HOSTILE_REPOS:
        status, raw = post_event(service, distribution_event(reg.host, repo))
        error = one_json_error(raw)
        assert status == 400 and "events[0].target.repository" in error and repr(repo) in error, (repo, error)
        body, ctype = harbor_event(f"{reg.host}/{repo}:v1", repo, False)
        status, raw = post_event(service, body, ctype)
        error = one_json_error(raw)
        assert status == 400 and "event_data.repository.repo_full_name" in error and repr(repo) in error, error
        checked += 2
    for tag in ("../../admin", "v1/../../x", "v1?x=1", "V 1"):
        status, raw = post_event(service, distribution_event(reg.host, "team/app", tag=tag))
        assert status == 400 and "events[0].target.tag" in one_json_error(raw)
    for digest in ("sha256:../../admin", "sha256:" + "a" * 63, "sha256:" + "a" * 64 + "/../x"):
        status, raw = post_event(service, distribution_event(reg.host, "team/app", digest=digest))
        assert status == 400 and "events[0].target.digest" in one_json_error(raw)
    # One bad event in a batch: the whole batch is refused, the good one is not queued either.
    batch = distribution_event(reg.host, "team/app")
    batch["events"] += distribution_event(f"127.0.0.1@{other.host}", "team/app")["events"]
    status, raw = post_event(service, batch)
    assert status == 400 and "events[1].request.host" in one_json_error(raw)
    # The job API refuses such references too (and, with no registries configured, any registry off loopback).
    for reference in (f"{hostile_hosts(reg, other)[0]}/team/app:v1", f"{reg.host}/../admin:v1", f"{reg.host}/A B:v1"):
        status, body = service.api("POST", "/api/v1/jobs", {"reference": reference})
        assert status == 400 and body["error"].startswith("reference: "), (reference, body)
    assert checked > 30
    time.sleep(2)  # idle workers poll every second: give a wrongly queued job the time to run
    assert service.jobs() == []
    assert other.connections == []
    assert env.port80 is None or env.port80.connections == []
    assert outside_v2(access_log(reg)[log_before:]) == []
    assert "Traceback" not in service.log_path.read_text()


def test_good_events_still_convert(env: Env, tmp_path: Path) -> None:
    """The same service accepts the real thing: a loopback host, a valid name, tag and digest."""
    reg = env.registry
    tar = tar_bytes([Member("hello.txt", b"hello from a well-formed push\n" * 50)])
    layer = gzip.compress(tar)
    digest = push_image(reg.host, "good/app", "v1", [(GZ, layer)], [sha256(tar)])
    status, raw = post_event(env.service, distribution_event(reg.host, "good/app", digest=digest))
    assert status == 202, raw
    body, ctype = harbor_event(f"{reg.host}/good/app:v1", "good/app", True)
    body["data"]["resources"][0]["digest"] = digest
    assert post_event(env.service, body, ctype)[0] == 202
    job = env.service.wait_job(lambda j: j["repository"] == "good/app" and j["state"] in ("succeeded", "failed"))
    assert job["state"] == "succeeded", job
    assert len(env.service.jobs()) == 1  # both events named the same image
    assert env.listener.connections == []
    assert outside_v2(access_log(reg)) == []


# -- the registry client -----------------------------------------------------------------


def test_client_refuses_names_before_any_request(registry: Registry, tmp_path: Path, listener: Listener) -> None:
    before = len(access_log(registry))

    async def go() -> list[str]:
        errors = []
        async with RegistryClient(registry.host) as client:
            calls: list[Callable[[], Any]] = []
            for repo in HOSTILE_REPOS:
                calls += [
                    lambda r=repo: client.get_manifest(r, "v1"),
                    lambda r=repo: client.manifest_exists(r, "v1"),
                    lambda r=repo: client.put_manifest(r, "v1", b"{}", oci.OCI_MANIFEST),
                    lambda r=repo: client.list_tags(r),
                    lambda r=repo: client.blob_size(r, DIGEST),
                    lambda r=repo: client.read_blob(r, DIGEST),
                    lambda r=repo: client.download_blob(r, DIGEST, str(tmp_path / "blob")),
                    lambda r=repo: client.fetch_range(r, DIGEST, 0, 10),
                    lambda r=repo: client.fetch_ranges(r, DIGEST, [(0, 1), (5, 6)]),
                    lambda r=repo: client.mount_blob(r, DIGEST, "team/app"),
                    lambda r=repo: client.mount_blob("team/app", DIGEST, r),
                    lambda r=repo: client.upload_blob(r, DIGEST, b"x"),
                    lambda r=repo: client.referrers(r, DIGEST),
                ]
            for ref in ("../../admin", "v1/../../x", "sha256:../x", "v1?x=1", "v1#x", "A B", ""):
                calls += [
                    lambda r=ref: client.get_manifest("team/app", r),
                    lambda r=ref: client.manifest_exists("team/app", r),
                    lambda r=ref: client.put_manifest("team/app", r, b"{}", oci.OCI_MANIFEST),
                    lambda r=ref: client.blob_size("team/app", r),
                    lambda r=ref: client.download_blob("team/app", r, str(tmp_path / "blob")),
                    lambda r=ref: client.fetch_range("team/app", r, 0, 10),
                    lambda r=ref: client.add_referrer("team/app", r, oci.Descriptor(
                        mediaType=oci.OCI_MANIFEST, digest=DIGEST, size=2)),
                ]  # fmt: skip
            for call in calls:
                with pytest.raises(ReferenceError) as e:
                    await call()
                errors.append(str(e.value))
        return errors

    errors = asyncio.run(go())
    assert len(errors) > 150 and all("\n" not in e and ": invalid " in e for e in errors)
    assert all(e.startswith(f"{registry.host}") for e in errors), errors[:3]
    assert access_log(registry)[before:] == []  # nothing was sent at all
    assert listener.connections == []


@dataclass
class HostileProxy:
    """A real HTTP proxy in front of the real registry that hands back URLs pointing elsewhere:
    ``answer(method, path, upstream headers)`` returns (status or None to keep it, headers to set)."""

    upstream: str
    answer: Callable[[str, str, dict[str, str]], tuple[int | None, dict[str, str]]]
    host: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadedApp = field(init=False)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs))
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "connection")}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, f"http://{self.upstream}{request.path_qs}", headers=headers, data=body or None,
                allow_redirects=False,
            ) as up,
        ):  # fmt: skip
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        status, extra = self.answer(request.method, request.path, out)
        out.update(extra)
        if status is not None:  # an answer of its own: no body
            data, out["Content-Length"] = b"", "0"
        resp = web.StreamResponse(status=status or up.status, headers=out)
        await resp.prepare(request)
        if data:
            await resp.write(data)
        await resp.write_eof()
        return resp

    def start(self) -> HostileProxy:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = ThreadedApp(app)
        self.host = f"127.0.0.1:{self._server.start()}"
        return self

    def stop(self) -> None:
        self._server.stop()


def test_client_stays_on_the_registry(registry: Registry, listener: Listener) -> None:
    """Upload Locations, Link pagination, redirects and token realms that point elsewhere are refused."""
    other = listener.host
    mode = {"name": ""}

    def answer(method: str, path: str, headers: dict[str, str]) -> tuple[int | None, dict[str, str]]:
        name = mode["name"]
        location = headers.get("Location", "")
        moved = re.sub(r"^https?://[^/]+", "", location)
        if name == "location-host" and method == "POST" and location:
            return None, {"Location": f"http://{other}{moved}"}
        if name == "location-schemeless" and method == "POST" and location:
            return None, {"Location": f"//{other}{moved}"}
        if name == "location-userinfo" and method == "POST" and location:
            return None, {"Location": f"http://{registry.host}@{other}{moved}"}
        if name == "location-traversal" and method == "POST" and location:
            return None, {"Location": "/v2/hostile/app/blobs/uploads/../../../../admin/upload"}
        if name == "location-traversal-out" and method == "POST" and location:
            return None, {"Location": "/v2/hostile/app/blobs/uploads/%2e%2e/%2E%2E/x/../../../../admin"}
        if name == "location-other-repo" and method == "POST" and location:
            return None, {"Location": moved.replace("/hostile/app/", "/other/app/")}
        if name in ("link-tags", "link-catalog") and path.endswith(("/_catalog", "/tags/list")):
            return None, {"Link": f'<http://{other}{path}?last=z&n=1000>; rel="next"'}
        if name == "link-path" and path.endswith("/tags/list"):
            return None, {"Link": '</admin/secret?n=1000>; rel="next"'}
        if name == "redirect" and "/manifests/" in path:
            return 307, {"Location": f"http://{other}/v2/hostile/app/manifests/v1"}
        if name.startswith("realm") and "/manifests/" in path:
            realm = {"realm-file": "file:///etc/passwd", "realm-ftp": f"ftp://{other}/token"}[name]
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="registry"'}
        return None, {}

    proxy = HostileProxy(registry.host, answer).start()
    try:

        async def go(name: str) -> str:
            mode["name"] = name
            async with RegistryClient(proxy.host) as client:
                try:
                    if name.startswith("location"):
                        await client.upload_blob("hostile/app", sha256(name.encode()), name.encode())
                    elif name == "link-catalog":
                        await client.catalog()
                    elif name.startswith("link"):
                        await client.list_tags("hostile/app")
                    else:
                        await client.get_manifest("hostile/app", "v1")
                except RegistryError as e:
                    return str(e)
            return "no error"

        # Something to list and to read through the proxy.
        push_image(proxy.host, "hostile/app", "v1", [(GZ, gzip.compress(b"x"))])
        results = {}
        for name in ("location-host", "location-schemeless", "location-userinfo", "location-traversal",
                     "location-traversal-out", "location-other-repo", "link-tags",
                     "link-catalog", "link-path", "redirect", "realm-file", "realm-ftp"):  # fmt: skip
            started = time.monotonic()
            results[name] = asyncio.run(go(name))
            assert time.monotonic() - started < 5, name  # refused, not retried
        for name in ("location-host", "location-schemeless", "location-userinfo"):
            assert "refusing the upload Location" in results[name] and "another host" in results[name], results
        for name in ("location-traversal", "location-traversal-out", "location-other-repo"):
            assert "refusing the upload Location" in results[name] and "not under /v2/hostile/app/" in results[name]
        for name in ("link-tags", "link-catalog"):
            assert "refusing the Link header" in results[name] and "another host" in results[name], results
        assert "refusing the Link header" in results["link-path"], results
        assert "answered 307" in results["redirect"], results
        for name in ("realm-file", "realm-ftp"):
            assert "refusing the token realm" in results[name], results
        assert all("\n" not in r for r in results.values())
    finally:
        proxy.stop()
    assert listener.connections == []
    assert outside_v2(proxy.seen) == []
    assert outside_v2(access_log(registry)) == []


# -- a layer whose descriptor lies about its size ----------------------------------------


@pytest.mark.parametrize("delta", [5678, -100])
def test_descriptor_size_differs_from_blob(registry: Registry, delta: int) -> None:
    tar = tar_bytes([Member("data.bin", bytes(range(256)) * 4096)])
    blob = gzip.compress(tar)
    repo = f"bad/size-{'larger' if delta > 0 else 'smaller'}"
    push_image(registry.host, repo, "v1", [(GZ, blob)], [sha256(tar)], size_delta=delta)
    started = time.monotonic()
    expected = f"blob {sha256(blob)}: registry sends {len(blob)} bytes, the descriptor says {len(blob) + delta}"
    line = assert_fails_cleanly(registry, repo, expected)
    assert time.monotonic() - started < 5, "retried instead of failing at once"
    assert "ContentLength" not in line
    # The blob was asked for once, not retried.
    gets = [p for m, p in access_log(registry) if m == "GET" and p.startswith(f"/v2/{repo}/blobs/{sha256(blob)}")]
    assert len(gets) == 1, gets
