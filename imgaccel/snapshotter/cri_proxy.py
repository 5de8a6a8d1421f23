"""The CRI image-service proxy: the kubelet's ``--image-service-endpoint``, in front of containerd.

Under Kubernetes the kubelet hands pull credentials (imagePullSecrets, credential provider
plugins) only to the CRI ``PullImage`` call, which goes to containerd and never reaches a
snapshotter. ``CriProxy`` serves the image service on its own unix socket (0660) and forwards
every call of ``runtime.v1.ImageService`` and ``runtime.v1alpha2.ImageService`` to containerd's
socket as it came:

* raw bytes both ways (gRPC generic handlers without (de)serializers), stream-stream on both
  sides, which on the wire is what unary and streaming calls all are: fields and methods this
  module does not know (a newer kubelet's) pass unchanged;
* the caller's metadata, deadline and cancellation go to containerd; containerd's initial and
  trailing metadata, status code and details come back (an error keeps its code and details);
* calls to any other service are answered UNIMPLEMENTED here.

From each ``PullImage`` request it reads ``auth`` (username/password, or ``auth`` = base64
``user:password``) and the image reference's registry host, and puts them in the ``Keychain``
for ``credential_ttl`` seconds before forwarding: containerd Prepares the layers, so the daemon
opens the image, while the pull runs. Token credentials (``identity_token``,
``registry_token``) are not used. Nothing of a request but the image reference, its registry
and the method is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.reference import ReferenceError, check_registry_host

from .api.runtime.v1 import api_pb2 as cri
from .config import CriProxyConfig
from .keychain import Keychain
from .sockets import prepare_socket

log = logging.getLogger(__name__)

SERVICES = ("/runtime.v1.ImageService/", "/runtime.v1alpha2.ImageService/")  # same messages, same numbers
PULL_METHODS = frozenset(f"{s}PullImage" for s in SERVICES)
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# ListImages answers of a node with many images outgrow gRPC's 4 MiB default (the kubelet allows 16 MiB)
_MESSAGE_LIMITS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# After a containerd restart, reconnect within a second or two, not after grpc's backoff of up to 2 min
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 2000)]  # fmt: skip


def registry_of(image: str) -> str | None:
    """The registry host (``host[:port]``) of an image reference, normalised as containerd does:
    a first path component that is no host name (``nginx``, ``library/nginx``) means Docker Hub,
    ``docker.io``. None for what names no registry (an image ID, an invalid host)."""
    name = image.strip()
    if not name or name.startswith("sha256:"):
        return None
    first, sep, _ = name.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return DOCKER_HUB
    if first in _DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    try:
        return check_registry_host(first)
    except ReferenceError:
        return None


def server_host(address: str) -> str:
    """The ``host[:port]`` of an AuthConfig ``server_address`` (``https://host:port/v1/``,
    ``host:port``), Docker Hub's aliases as ``docker.io``."""
    text = address.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host = text.split("/", 1)[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def auth_credentials(auth: cri.AuthConfig) -> Credentials | None:
    """The username/password of a CRI AuthConfig (``username``/``password``, else ``auth`` =
    base64 ``user:password``), None when it has none of them (anonymous, or token credentials
    only), or when ``auth`` cannot be decoded."""
    if auth.username:
        return Credentials(auth.username, auth.password)
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode()
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            return None
        return Credentials(user, password.strip("\x00"))  # as containerd decodes it
    return None


class CriProxy:
    """The proxy server (``start``/``stop``) on ``config.socket``, forwarding to ``config.containerd``."""

    def __init__(self, config: CriProxyConfig, keychain: Keychain) -> None:
        self.config = config
        self.keychain = keychain
        self._server: Any = None
        self._channel: Any = None

    async def start(self) -> None:
        socket = self.config.socket
        prepare_socket(socket)
        self._channel = grpc.aio.insecure_channel(f"unix://{self.config.containerd}",
                                                  options=[*_MESSAGE_LIMITS, *_RECONNECT])  # fmt: skip
        server = grpc.aio.server(options=_MESSAGE_LIMITS)
        server.add_generic_rpc_handlers((_Forwarder(self),))
        if server.add_insecure_port(f"unix://{socket}") == 0:
            await self._channel.close()
            self._channel = None
            raise RuntimeError(f"cannot listen on {socket}")
        await server.start()
        os.chmod(socket, 0o660)
        self._server = server
        log.info("CRI image service proxy on %s, forwarding to %s (pull credentials kept %g s)",
                 socket, self.config.containerd, self.config.credential_ttl)  # fmt: skip

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; running ones get ``grace`` seconds, then they are cancelled
        (and so are their calls to containerd)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _remember(self, method: str, request: bytes) -> None:
        """Put a PullImage request's credentials in the keychain (never raises, never logs them)."""
        try:
            pull = cri.PullImageRequest.FromString(request)
        except DecodeError:
            log.info("%s: not a PullImageRequest; forwarded as it is", method)
            return
        image = pull.image.image
        if not pull.HasField("auth"):
            log.debug("%s %r: no credentials", method, image)
            return
        registry = registry_of(image)
        credentials = auth_credentials(pull.auth)
        if registry is None:
            log.info("%s %r: no registry host in the image reference; its credentials are not kept", method, image)
        elif credentials is None:
            tokens = pull.auth.identity_token or pull.auth.registry_token
            what = "token credentials, which imgaccel does not use" if tokens else "no usable username and password"
            log.info("%s %r: the pull carries %s", method, image, what)
        elif pull.auth.server_address and server_host(pull.auth.server_address) != registry:
            log.info("%s %r: the credentials are for another server than %s; not kept", method, image, registry)
        else:
            self.keychain.put(registry, credentials, self.config.credential_ttl)
            log.info("%s %r: the pull's credentials for %s are kept for %g s",
                     method, image, registry, self.config.credential_ttl)  # fmt: skip

    async def forward(self, method: str, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """One call, forwarded to containerd; yields containerd's answers."""
        assert self._channel is not None, "start() first"

        async def outgoing() -> AsyncIterator[bytes]:
            first = True
            async for request in requests:
                if first and method in PULL_METHODS:
                    self._remember(method, request)
                first = False
                yield request

        call = self._channel.stream_stream(method)(
            outgoing(), metadata=_metadata(context.invocation_metadata()), timeout=context.time_remaining()
        )
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(_metadata(initial))
            async for response in call:
                yield response
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(_metadata(trailing))
        except grpc.aio.AioRpcError as e:
            log.info("%s: containerd answered %s", method, e.code().name)
            await context.abort(e.code(), e.details() or "", _metadata(e.trailing_metadata()))
        finally:
            if not call.done():  # the caller went away (or we stop): so does the call to containerd
                call.cancel()


def _metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """Application metadata to pass on: not the pseudo-headers, the user agent or the ``grpc-``
    keys gRPC itself sets (the rich status details, ``grpc-status-details-bin``, do pass)."""
    return tuple(
        (k, v)
        for k, v in metadata or ()
        if not k.startswith(":") and k != "user-agent" and (not k.startswith("grpc-") or k == "grpc-status-details-bin")
    )


class _Forwarder(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, proxy: CriProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: Any) -> Any:
        method = str(handler_call_details.method)
        if not method.startswith(SERVICES):
            return None  # UNIMPLEMENTED

        async def forward(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for response in self.proxy.forward(method, requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(forward)
