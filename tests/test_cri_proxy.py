"""The CRI image-service proxy (kubelet ``--image-service-endpoint``) and the keychain it fills.

In-process: the keychain's expiry; what a PullImage's AuthConfig yields; the proxy forwarding
raw bytes, metadata, deadlines, streams and errors, checked against a stand-in for containerd's
socket (the only way to see what arrives on the far side); the Daemon sharing its keychain and
running the proxy; ``ErofsLayers``' registry client taking up credentials that arrive after it
was made, against a real registry with htpasswd basic auth. With root + containerd 1.6 (CRI
plugin) + the real daemon with no Docker config: a PullImage with credentials sent to the proxy
is lazy (containerd fetches no layer blob), the container sees the image's files, ImageStatus
and ListImages answer like containerd's, a pull without (or with wrong) credentials fails with
containerd's own code and details, and the password is in no daemon log line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import stat
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from fixtures.build_images import push, unique_image
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.errors import AuthError
from imgaccel.snapshotter.api.runtime.v1 import api_pb2 as cri
from imgaccel.snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from imgaccel.snapshotter.config import CriProxyConfig, NodeConfig
from imgaccel.snapshotter.cri_proxy import CriProxy, auth_credentials, registry_of, server_host
from imgaccel.snapshotter.daemon import Daemon
from imgaccel.snapshotter.erofs_layers import ErofsLayers
from imgaccel.snapshotter.keychain import Keychain
from imgaccel.snapshotter.metadata import Snapshot
from tests.containerd import MISSING
from tests.erofs_mount import missing_for_mounts
from tests.helpers import ACCEPT, run_cli
from tests.registry import Registry, start_registry
from tests.test_snapshotter import SCRIPT, blobs, check_image_view, ctr_run, node_with_daemon

USER = "kube"
PASSWORD = "pr0xy-" + secrets.token_hex(8)  # unique: found in a log only if it leaked there
PULL = "/runtime.v1.ImageService/PullImage"


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real registry (distribution 2.8) with htpasswd basic auth: USER / PASSWORD."""
    d = tmp_path_factory.mktemp("cri-authreg")
    htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True)
    (d / "htpasswd").write_text(htpasswd.stdout)
    reg = start_registry(d, f"auth:\n  htpasswd:\n    realm: imgaccel-cri\n    path: {d / 'htpasswd'}\n")
    try:
        yield reg
    finally:
        reg.stop()


# -- keychain and AuthConfig ---------------------------------------------------------------------------


def test_keychain_keeps_the_newest_until_it_expires() -> None:
    now = [1000.0]
    keys = Keychain(clock=lambda: now[0])
    a, b = Credentials("a", "pa"), Credentials("b", "pb")
    assert keys.get("reg.example:5000") is None
    keys.put("reg.example:5000", a, 60)
    keys.put("other.example", b, 10)
    assert keys.get("reg.example:5000") == a and keys.get("other.example") == b
    assert keys.get("reg.example") is None  # per host[:port]
    keys.put("reg.example:5000", b, 60)
    assert keys.get("reg.example:5000") == b  # the newest replaces
    now[0] += 10
    assert keys.get("other.example") is None and keys.expires_in("other.example") is None  # expired
    assert keys.registries() == ["reg.example:5000"]
    assert keys.expires_in("reg.example:5000") == pytest.approx(50)
    now[0] += 49.5
    assert keys.get("reg.example:5000") == b
    now[0] += 0.5
    assert keys.get("reg.example:5000") is None
    keys.put("x.example", a, 5)
    keys.forget("x.example")
    assert keys.get("x.example") is None
    for ttl in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            keys.put("x.example", a, ttl)
    secret = Credentials(USER, PASSWORD)
    assert PASSWORD not in repr(secret) and PASSWORD not in str([secret])  # a logged Credentials hides it


def test_pull_credentials_and_registry() -> None:
    assert auth_credentials(cri.AuthConfig(username="u", password="p:w")) == Credentials("u", "p:w")
    assert auth_credentials(cri.AuthConfig(auth=base64.b64encode(b"u2:pa:ss").decode())) == Credentials("u2", "pa:ss")
    both = cri.AuthConfig(username="u", password="p", auth=base64.b64encode(b"x:y").decode())
    assert auth_credentials(both) == Credentials("u", "p")  # username/password first, as containerd
    assert auth_credentials(cri.AuthConfig(auth="not base64!")) is None
    assert auth_credentials(cri.AuthConfig(auth=base64.b64encode(b"no-colon").decode())) is None
    assert auth_credentials(cri.AuthConfig(identity_token="t", registry_token="r")) is None  # not used
    assert auth_credentials(cri.AuthConfig()) is None
    for image, registry in (
        ("nginx", "docker.io"),
        ("library/nginx:1.25", "docker.io"),
        ("docker.io/library/nginx@sha256:" + "a" * 64, "docker.io"),
        ("index.docker.io/foo/bar", "docker.io"),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000"),
        ("localhost/app", "localhost"),
        ("registry.example.com/team/app:v2", "registry.example.com"),
        ("sha256:" + "b" * 64, None),
        ("", None),
        ("bad_host.example/app", None),
    ):
        assert registry_of(image) == registry, image
    assert server_host("https://index.docker.io/v1/") == "docker.io"
    assert server_host("https://registry.example.com:5000/v2/") == "registry.example.com:5000"
    assert server_host("127.0.0.1:5000") == "127.0.0.1:5000"


# -- the proxy against a stand-in for containerd's socket ------------------------------------------------


class StandIn:
    """Listens where containerd would and records each call: method, request bytes, metadata,
    the deadline it got and what the keychain held when it arrived. Answers: PullImage with a
    fixed image_ref; ImageStatus of "missing" with NOT_FOUND (+ trailing metadata); Hang never
    (it notes its cancellation); any other method with one answer per request (the request
    reversed) and initial metadata."""

    def __init__(self, socket: Path, keychain: Keychain) -> None:
        self.socket = socket
        self.keychain = keychain
        self.calls: list[dict[str, Any]] = []
        self.server: Any = None
        self.hanging = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def start(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self._Handler(self),))
        assert self.server.add_insecure_port(f"unix://{self.socket}") != 0
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)

    class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
        def __init__(self, outer: StandIn) -> None:
            self.outer = outer

        def service(self, details: Any) -> Any:
            async def answer(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
                async for response in self.outer.answer(details.method, requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(answer)

    async def answer(self, method: str, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        got = [r async for r in requests]
        self.calls.append({
            "method": method, "requests": got, "metadata": dict(context.invocation_metadata()),
            "time_remaining": context.time_remaining(), "keychain": self.keychain.registries(),
        })  # fmt: skip
        if method.endswith("/Hang"):
            self.hanging.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if method.endswith("/PullImage"):
            yield cri.PullImageResponse(image_ref="sha256:" + "c" * 64).SerializeToString()
            return
        if method.endswith("/ImageStatus") and cri.ImageStatusRequest.FromString(got[0]).image.image == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "image missing: not here", (("x-why", "because"),))
        await context.send_initial_metadata((("x-initial", "yes"),))
        for r in got:
            yield r[::-1]
        context.set_trailing_metadata((("x-done", "1"),))


@asynccontextmanager
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[CriProxy, StandIn, Any]]:
    """A running proxy in front of a stand-in, and a channel to the proxy."""
    keychain = Keychain()
    backend = StandIn(tmp_path / "containerd.sock", keychain)
    await backend.start()
    proxy = CriProxy(CriProxyConfig(socket=tmp_path / "run" / "cri.sock", containerd=backend.socket,
                                    credential_ttl=120), keychain)  # fmt: skip
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"unix://{proxy.config.socket}")
    try:
        yield proxy, backend, channel
    finally:
        await channel.close()
        await proxy.stop(0)
        await backend.stop()


async def test_proxy_forwards_bytes_metadata_and_keeps_pull_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imgaccel")
    async with proxied(tmp_path) as (proxy, backend, channel):
        await _forwarding_checks(proxy, backend, channel)
    text = caplog.text
    assert "registry.example.com:5000" in text and PASSWORD not in text
    assert base64.b64encode(f"hub:{PASSWORD}".encode()).decode() not in text


async def _forwarding_checks(proxy: CriProxy, backend: StandIn, channel: Any) -> None:
    mode = proxy.config.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660

    pull = cri.PullImageRequest(image=cri.ImageSpec(image="registry.example.com:5000/team/app:v1"),
                                auth=cri.AuthConfig(username=USER, password=PASSWORD))  # fmt: skip
    raw = pull.SerializeToString() + b"\x1a\x05\x0a\x03abc" + b"\xf8\x3e\x01"  # sandbox_config + an unknown field
    md = (("x-trace", "42"), ("x-blob-bin", b"\x00\x01"))
    answer = await channel.unary_unary(PULL)(raw, metadata=md, timeout=30)
    assert cri.PullImageResponse.FromString(answer).image_ref == "sha256:" + "c" * 64
    (call,) = backend.calls
    assert call["method"] == PULL and call["requests"] == [raw]  # byte for byte, unknown fields included
    assert call["metadata"]["x-trace"] == "42" and call["metadata"]["x-blob-bin"] == b"\x00\x01"
    assert call["time_remaining"] is not None and 0 < call["time_remaining"] <= 30.1  # the deadline went along
    assert call["keychain"] == ["registry.example.com:5000"]  # kept before containerd got the pull
    assert proxy.keychain.get("registry.example.com:5000") == Credentials(USER, PASSWORD)
    assert proxy.keychain.expires_in("registry.example.com:5000") == pytest.approx(120, abs=5)

    # runtime.v1alpha2 too; the auth field; a pull without credentials leaves the keychain alone
    hub_auth = base64.b64encode(b"hub:" + PASSWORD.encode()).decode()
    alpha = cri.PullImageRequest(image=cri.ImageSpec(image="app:v2"), auth=cri.AuthConfig(auth=hub_auth))
    await channel.unary_unary("/runtime.v1alpha2.ImageService/PullImage")(alpha.SerializeToString(), timeout=30)
    assert proxy.keychain.get("docker.io") == Credentials("hub", PASSWORD)
    await channel.unary_unary(PULL)(cri.PullImageRequest(image=pull.image).SerializeToString(), timeout=30)
    elsewhere = cri.AuthConfig(username="u", password="p", server_address="https://else.example")
    foreign = cri.PullImageRequest(image=cri.ImageSpec(image="other.example/app"), auth=elsewhere)
    await channel.unary_unary(PULL)(foreign.SerializeToString(), timeout=30)
    assert proxy.keychain.registries() == ["docker.io", "registry.example.com:5000"]
    assert proxy.keychain.get("registry.example.com:5000") == Credentials(USER, PASSWORD)

    # a method this proxy has never heard of, streaming both ways: forwarded all the same
    future = channel.stream_stream("/runtime.v1.ImageService/FutureCall")
    call_ = future(iter([b"one", b"two"]), timeout=30)
    assert [r async for r in call_] == [b"eno", b"owt"]
    assert ("x-initial", "yes") in tuple(await call_.initial_metadata())
    assert ("x-done", "1") in tuple(await call_.trailing_metadata())
    assert backend.calls[-1]["requests"] == [b"one", b"two"]

    # containerd's error comes back with its code, details and trailing metadata
    missing = cri.ImageStatusRequest(image=cri.ImageSpec(image="missing")).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await channel.unary_unary("/runtime.v1.ImageService/ImageStatus")(missing, timeout=30)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "image missing: not here")
    assert ("x-why", "because") in tuple(e.value.trailing_metadata())

    # other services are not the image service's: not forwarded
    calls = len(backend.calls)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and len(backend.calls) == calls


async def test_proxy_relays_unavailable_and_stops_cleanly(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (proxy, backend, channel):
        await backend.stop()  # containerd is down
        status = cri.ImageStatusRequest(image=cri.ImageSpec(image="x")).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await channel.unary_unary("/runtime.v1.ImageService/ImageStatus")(status, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await proxy.stop(0)
        assert not proxy.config.socket.exists()


async def test_proxy_passes_cancellation_and_deadlines_on(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, backend, channel):
        hang = channel.unary_unary("/runtime.v1.ImageService/Hang")
        call = hang(b"")  # no deadline: the kubelet gives up on it
        await asyncio.wait_for(backend.hanging.wait(), 10)
        call.cancel()
        await asyncio.wait_for(backend.cancelled.wait(), 10)  # containerd's side of the call ended too

        backend.hanging.clear()
        backend.cancelled.clear()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await hang(b"", timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(backend.cancelled.wait(), 10)
        first, second = backend.calls
        assert first["time_remaining"] is None and 0 < second["time_remaining"] <= 1.1  # (grpc-timeout rounds up)


class KeychainRemote:
    """A RemoteLayers that takes credentials from a keychain (as ErofsLayers does) and serves nothing."""

    def __init__(self) -> None:
        self.keychain: Keychain | None = None

    async def start(self, served: Sequence[Snapshot]) -> None:
        pass

    async def close(self) -> None:
        pass

    async def prepare(self, namespace: str, key: str, parent: str | None, labels: dict[str, str]) -> str | None:
        return None

    async def remove(self, namespace: str, name: str, directory: str) -> None:
        pass


async def test_daemon_runs_the_proxy_and_shares_its_keychain(tmp_path: Path) -> None:
    keychain = Keychain()
    backend = StandIn(tmp_path / "containerd.sock", keychain)
    await backend.start()
    cri_socket = tmp_path / "cri" / "cri.sock"
    config = NodeConfig(socket=tmp_path / "s.sock", root=tmp_path / "root",
                        cri_proxy=CriProxyConfig(socket=cri_socket, containerd=backend.socket))  # fmt: skip
    remote = KeychainRemote()
    daemon = Daemon(config, remote)
    assert remote.keychain is daemon.keychain
    await daemon.start()
    try:
        assert stat.S_IMODE(cri_socket.stat().st_mode) == 0o660
        pull = cri.PullImageRequest(image=cri.ImageSpec(image="127.0.0.1:5999/app:v1"),
                                    auth=cri.AuthConfig(username=USER, password=PASSWORD))  # fmt: skip
        async with grpc.aio.insecure_channel(f"unix://{cri_socket}") as ch:
            await cri_grpc.ImageServiceStub(ch).PullImage(pull, timeout=30)
        assert daemon.keychain.get("127.0.0.1:5999") == Credentials(USER, PASSWORD)
        assert daemon.keychain.expires_in("127.0.0.1:5999") == pytest.approx(3600, abs=60)  # the default ttl
    finally:
        await daemon.stop(0)
        await backend.stop()
    assert not cri_socket.exists() and not config.socket.exists()

    plain = Daemon(NodeConfig(socket=tmp_path / "p.sock", root=tmp_path / "root2"))
    await plain.start()
    try:
        assert plain.cri_proxy is None
    finally:
        await plain.stop(0)


# -- ErofsLayers' registry client against a real auth registry ----------------------------------------------


def docker_config(path: Path, host: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


async def test_registry_client_takes_up_credentials_that_arrive_later(auth_registry: Registry, tmp_path: Path) -> None:
    host = auth_registry.host
    await asyncio.to_thread(push, unique_image(tmp_path, "cri-keychain"), "v1", f"{host}/keychain/app:v1",
                            f"{USER}:{PASSWORD}")  # fmt: skip

    def config(name: str, docker: Path) -> NodeConfig:
        return NodeConfig(socket=tmp_path / f"{name}.sock", root=tmp_path / name, cache_dir=tmp_path / f"{name}-cache",
                          docker_config=docker)  # fmt: skip

    layers = ErofsLayers(config("a", tmp_path / "no-such-config.json"))
    layers.keychain = Keychain()
    try:
        client = await layers._client(host)
        with pytest.raises(AuthError):  # no Docker config, no CRI pull yet
            await client.get_manifest("keychain/app", "v1")
        layers.keychain.put(host, Credentials(USER, PASSWORD), 60)
        assert await layers._client(host) is client  # the same client (images opened with it keep it) ...
        assert (await client.get_manifest("keychain/app", "v1")).digest.startswith("sha256:")  # ... now authorized
        layers.keychain.put(host, Credentials(USER, "wrong"), 60)  # the newest pull's credentials win
        await layers._client(host)
        with pytest.raises(AuthError):  # the authorization cached for the old ones was dropped
            await client.get_manifest("keychain/app", "v1")
    finally:
        await layers.close()

    docker = docker_config(tmp_path / "config.json", host, USER, PASSWORD)
    layers = ErofsLayers(config("b", docker))
    layers.keychain = Keychain()
    layers.keychain.put(host, Credentials(USER, "wrong"), 60)
    try:
        client = await layers._client(host)
        assert (await client.get_manifest("keychain/app", "v1")).digest.startswith("sha256:")  # Docker config wins
        layers.keychain.put(host, Credentials(USER, "also-wrong"), 60)
        assert await layers._client(host) is client
        assert (await client.get_manifest("keychain/app", "v1")).digest.startswith("sha256:")  # ... and keeps winning
    finally:
        await layers.close()


# -- through the real containerd --------------------------------------------------------------------------------

WHY = missing_for_mounts("erofs", "overlay") or (f"missing {', '.join(MISSING)}" if MISSING else "")
if not WHY and not os.path.exists("/dev/fuse"):
    WHY = "no /dev/fuse"


def layers_of(host: str, repo: str, tag: str) -> list[str]:
    """The layer digests of repo:tag (its first platform's) on the auth registry."""
    header = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), "Accept": ACCEPT}

    def get(reference: str) -> dict[str, Any]:
        req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{reference}", headers=header)
        with urllib.request.urlopen(req, timeout=30) as r:
            return dict(json.load(r))

    top = get(tag)
    if "manifests" in top:
        top = get(top["manifests"][0]["digest"])
    return [layer["digest"] for layer in top["layers"]]


def pull_error(stub: cri_grpc.ImageServiceStub, request: cri.PullImageRequest) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as e:
        stub.PullImage(request, timeout=120)
    return e.value.code(), e.value.details()


@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(WHY), reason=WHY or "-")
def test_kubernetes_pull_with_credentials_is_lazy_through_the_proxy(
    auth_registry: Registry, layouts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    host = auth_registry.host
    source = f"{host}/private/app:v1"
    push(layouts["app"], "v1", source, creds=f"{USER}:{PASSWORD}")
    work = tmp_path_factory.mktemp("cri-proxy-node")
    env = {"DOCKER_CONFIG": str(work)}  # only the converter gets credentials this way, never the daemon
    docker_config(work / "config.json", host, USER, PASSWORD)
    r = run_cli("convert", source, env=env)
    assert r.code == 0, r.err
    ref = source + "_accelerated"
    layer_digests = layers_of(host, "private/app", "v1_accelerated")

    (work / "node").mkdir()
    with node_with_daemon(work / "node", auth_registry) as (ctr, daemon):
        containerd_socket = ctr[ctr.index("--address") + 1]
        cri_socket = work / "cri" / "cri.sock"
        node_yaml = work / "node.yml"
        proxy_config = {"socket": str(cri_socket), "containerd": containerd_socket, "credential_ttl": 600}
        settings = {"cache_dir": str(work / "cache"), "docker_config": str(work / "no-docker-config" / "config.json"),
                    "log_level": "debug", "cri_proxy": proxy_config}  # fmt: skip
        node_yaml.write_text(json.dumps(settings))  # JSON is YAML
        daemon.start(None, node_yaml)
        k8s = [*ctr, "--namespace", "k8s.io"]
        spec = cri.ImageSpec(image=ref)
        with grpc.insecure_channel(f"unix://{cri_socket}") as proxy_ch, \
             grpc.insecure_channel(f"unix://{containerd_socket}") as direct_ch:  # fmt: skip
            proxy, direct = cri_grpc.ImageServiceStub(proxy_ch), cri_grpc.ImageServiceStub(direct_ch)
            deadline = time.monotonic() + 30
            while True:  # the proxy starts right after the snapshots service
                try:
                    proxy.ListImages(cri.ListImagesRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, daemon.log()[-2000:]
                    time.sleep(0.2)

            # no credentials, wrong ones: containerd's own error, code and details, through the proxy
            anonymous = cri.PullImageRequest(image=spec)
            code, details = pull_error(proxy, anonymous)
            assert code != grpc.StatusCode.UNAVAILABLE and "401" in details, details
            assert (code, details) == pull_error(direct, anonymous)
            wrong = cri.PullImageRequest(image=spec, auth=cri.AuthConfig(username=USER, password="not-" + PASSWORD))
            assert pull_error(proxy, wrong)[0] == code

            # the kubelet's pull with the pod's imagePullSecret: lazy, with no Docker config for the daemon
            good = cri.PullImageRequest(image=spec, auth=cri.AuthConfig(username=USER, password=PASSWORD))
            image_id = proxy.PullImage(good, timeout=300).image_ref
            assert image_id.startswith("sha256:")
            assert not set(layer_digests) & blobs(k8s), "containerd downloaded a layer blob"
            assert daemon.log().count("mounted lazily") >= len(layer_digests), daemon.log()[-3000:]

            status = cri.ImageStatusRequest(image=spec)
            assert proxy.ImageStatus(status, timeout=60) == direct.ImageStatus(status, timeout=60)
            assert proxy.ImageStatus(status, timeout=60).image.id == image_id

            def listed(stub: cri_grpc.ImageServiceStub) -> list[cri.Image]:
                return sorted(stub.ListImages(cri.ListImagesRequest(), timeout=60).images, key=lambda i: i.id)

            assert listed(proxy) == listed(direct) and image_id in [i.id for i in listed(proxy)]

            # the container reads its files through the daemon, which reads the registry with the pull's credentials
            view = ["run", "--rm", "--snapshotter", "imgaccel", ref, "cri-proxy-view", "/bin/sh", "-c", SCRIPT]
            check_image_view(ctr_run(k8s, *view))

            proxy.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)), timeout=60)
            assert not direct.ImageStatus(status, timeout=60).HasField("image")
        assert daemon.stop() == 0
        assert not cri_socket.exists()
    log = daemon.log()
    assert f"credentials for {host} are kept" in log
    for secret in (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in log
