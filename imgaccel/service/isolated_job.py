"""Run one conversion in a child process, so that no image can take the service down.

Every image is hostile input. The service therefore converts each job in a fresh
``python -m imgaccel.service.isolated_job`` process that limits its own address space
(``RLIMIT_AS``) before it reads anything, while the parent holds a wall-clock limit and kills
the child's whole process group when it runs out. A child that exceeds either, or dies of a
signal, fails its job with that reason (``ConversionLimitError``: never retried, so a
poisoned image cannot loop); the service's event loop never runs conversion code, so
``/healthz`` and event intake keep answering meanwhile.

Wire between the two (one JSON document per line):

* parent -> child stdin: one ``JobRequest``; it carries the registry credentials, which is why
  they are not on the command line.
* child -> parent stdout: ``{"event": "layer_start", "digest", "size"}``, ``{"event": "bytes",
  "digest", "n"}`` (every ``BYTES_EVENT`` bytes of a layer or ``BYTES_EVENT_SECONDS``,
  and before its ``layer_done``), ``{"event": "layer_done", "digest", "reused"}``, then exactly one of
  ``{"event": "result", ...}`` or ``{"event": "error", "kind", "message"}``, both with
  ``peak_rss``. The child's log goes to stderr and the parent re-logs it under the job's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from imgaccel.converter.errors import ConversionError, NotConvertible
from imgaccel.converter.image_converter import ImageConverter, Progress
from imgaccel.converter.options import ConversionLimits, ConvertOptions
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef
from imgaccel.service.child_process import relay_stderr, spawn_module

log = logging.getLogger(__name__)
BYTES_EVENT = 1 << 20  # downloaded bytes of a layer per "bytes" event
BYTES_EVENT_SECONDS = 0.5  # (or fewer, when this long passed since the last one)


class ConversionLimitError(ConversionError):
    """The conversion exceeded the isolation limits or its process died: not retried."""


class JobRequest(BaseModel):
    """What the child needs to convert one image, as one JSON document on its stdin."""

    model_config = ConfigDict(extra="forbid")
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    plain_http: bool
    username: str | None = None
    password: str | None = None
    request_attempts: int
    max_connections: int
    options: dict[str, Any]  # ConvertOptions fields; ``limits`` as a ConversionLimits dict
    memory_limit: int  # bytes of address space (RLIMIT_AS)
    log_level: int = logging.INFO


def options_to_wire(options: ConvertOptions) -> dict[str, Any]:
    out = {f.name: getattr(options, f.name) for f in fields(options)}
    out["platforms"] = list(options.platforms)
    out["limits"] = options.limits.model_dump()
    return out


def options_from_wire(data: dict[str, Any]) -> ConvertOptions:
    data = dict(data)
    data["platforms"] = tuple(data.get("platforms", ()))
    data["limits"] = ConversionLimits.model_validate(data.get("limits", {}))
    return ConvertOptions(**data)


@dataclass
class IsolatedResult:
    """What the parent learns of a successful conversion (``ConvertResult``'s counts)."""

    target: ImageRef
    digest: str
    layers_converted: int
    layers_reused: int
    bytes_in: int
    bytes_out: int
    size_before: int
    size_after: int


async def run_isolated(request: JobRequest, timeout: float, progress: Progress, job_id: str = "") -> IsolatedResult:
    """Convert in a child process; raises ``NotConvertible``, ``ConversionError`` (retryable)
    or ``ConversionLimitError`` (not retryable)."""
    # glibc reserves 64 MiB of address space per arena (RLIMIT_AS counts it): two arenas
    proc = await spawn_module("imgaccel.service.isolated_job", {**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert proc.stdin and proc.stdout and proc.stderr
    stderr_tail: deque[str] = deque(maxlen=20)
    outcome: dict[str, Any] = {}

    async def read_stdout() -> None:
        assert proc.stdout
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
                kind = event["event"]
            except (ValueError, KeyError, TypeError):
                log.warning("job %s: unreadable line from the conversion process: %.200r", job_id, line)
                continue
            if kind == "layer_start":
                progress.on_layer_start(str(event["digest"]), int(event["size"]))
            elif kind == "bytes":
                progress.on_bytes(str(event["digest"]), int(event["n"]))
            elif kind == "layer_done":
                progress.on_layer_done(str(event["digest"]), bool(event["reused"]))
            elif kind in ("result", "error"):
                outcome.update(event)

    readers = asyncio.gather(read_stdout(), relay_stderr(proc.stderr, stderr_tail, f"job {job_id}", logging.INFO))
    try:
        proc.stdin.write(request.model_dump_json().encode())
        proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(readers), timeout)
            await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            raise ConversionLimitError(
                f"conversion exceeded the wall-clock limit of {timeout:g} s (isolation.timeout)"
            ) from None
    finally:
        if proc.returncode is None:  # cancelled (service stopping): take the child with us
            _kill_group(proc.pid)
            await proc.wait()
        with contextlib.suppress(Exception):
            await readers
    return _outcome(outcome, proc.returncode or 0, request, list(stderr_tail))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _outcome(event: dict[str, Any], code: int, request: JobRequest, stderr_tail: list[str]) -> IsolatedResult:
    if "peak_rss" in event:
        log.info("%s/%s: conversion process peak RSS %.1f MiB", request.registry, request.repository,
                 int(event["peak_rss"]) / 2**20)  # fmt: skip
    if event.get("event") == "result":
        t = event["target"]
        return IsolatedResult(
            target=ImageRef(t["registry"], t["repository"], t.get("tag"), t.get("digest")),
            **{k: event[k] for k in ("digest", "layers_converted", "layers_reused", "bytes_in", "bytes_out",
                                     "size_before", "size_after")},
        )  # fmt: skip
    if event.get("event") == "error":
        message, kind = str(event.get("message", "")), event.get("kind")
        if kind == "not_convertible":
            raise NotConvertible(message)
        if kind == "limit":
            raise ConversionLimitError(message)
        raise ConversionError(message)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise ConversionLimitError(
            f"conversion process died of {name}, most likely at its address-space limit of {request.memory_limit} "
            f"bytes (isolation.memory_limit){_last_words(stderr_tail)}"
        )
    raise ConversionLimitError(
        f"conversion process exited with status {code} without a result{_last_words(stderr_tail)}"
    )


def _last_words(stderr_tail: list[str]) -> str:
    last = next((line for line in reversed(stderr_tail) if line.strip()), "")
    return f": {last[-300:]}" if last else ""


# -- the child ----------------------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (VmHWM: since its exec, unlike
    ``ru_maxrss``, which Linux carries over from the forked parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def _convert(request: JobRequest) -> None:
    from imgaccel.pusher.auth import Credentials
    from imgaccel.pusher.client import RegistryClient, RetryPolicy

    credentials = Credentials(request.username, request.password or "") if request.username else None
    options = options_from_wire(request.options)
    pending: dict[str, int] = {}  # layer digest -> downloaded bytes not reported yet
    reported = {"at": time.monotonic()}

    def on_bytes(digest: str, n: int) -> None:
        pending[digest] = pending.get(digest, 0) + n
        if pending[digest] >= BYTES_EVENT or time.monotonic() - reported["at"] > BYTES_EVENT_SECONDS:
            _emit({"event": "bytes", "digest": digest, "n": pending.pop(digest)})
            reported["at"] = time.monotonic()

    def on_layer_done(digest: str, reused: bool) -> None:
        if digest in pending:
            _emit({"event": "bytes", "digest": digest, "n": pending.pop(digest)})
        _emit({"event": "layer_done", "digest": digest, "reused": reused})

    progress = Progress(
        on_layer_start=lambda d, size: _emit({"event": "layer_start", "digest": d, "size": size}),
        on_bytes=on_bytes,
        on_layer_done=on_layer_done,
    )
    async with RegistryClient(
        request.registry,
        plain_http=request.plain_http,
        credentials=credentials,
        retry=RetryPolicy(attempts=request.request_attempts),
        max_connections=request.max_connections,
    ) as client:
        ref = ImageRef(request.registry, request.repository, request.tag, request.digest)
        result = await ImageConverter(client, options, progress).convert(ref)
    if pending:
        _emit({"event": "bytes", "n": pending})
    t = result.target
    _emit(
        {
            "event": "result",
            "target": {"registry": t.registry, "repository": t.repository, "tag": t.tag, "digest": t.digest},
            "digest": result.digest,
            "layers_converted": result.layers_converted,
            "layers_reused": result.layers_reused,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "size_before": result.size_before,
            "size_after": result.size_after,
            "peak_rss": peak_rss(),
        }
    )


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a service killed with -9 takes its conversions with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _child_main() -> int:
    _die_with_parent()
    request = JobRequest.model_validate_json(sys.stdin.buffer.read())
    resource.setrlimit(resource.RLIMIT_AS, (request.memory_limit, request.memory_limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    logging.basicConfig(level=request.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    kind: Literal["not_convertible", "failed", "limit", "internal"]
    try:
        asyncio.run(_convert(request))
        return 0
    except NotConvertible as e:
        kind, message = "not_convertible", str(e)
    except (ConversionError, RegistryError, OSError) as e:
        kind, message = "failed", str(e)
    except MemoryError:
        kind = "limit"
        message = (
            f"conversion exceeded the address-space limit of {request.memory_limit} bytes (isolation.memory_limit)"
        )
    except Exception as e:
        logging.getLogger(__name__).exception("internal error")
        kind, message = "internal", f"internal error: {type(e).__name__}: {e}"
    _emit({"event": "error", "kind": kind, "message": message, "peak_rss": peak_rss()})
    return 1


if __name__ == "__main__":
    sys.exit(_child_main())
