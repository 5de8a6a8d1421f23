"""What every command shares: the error console, one-line failures, references, registry
clients from the CLI settings, sizes, and running a command's coroutine with its exit code."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from imgaccel.converter.errors import ConversionError
from imgaccel.formats.sizes import parse_size
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef, ReferenceError, parse_reference
from imgaccel.reader.accelerated_image import ImageOpenError
from imgaccel.reader.layer_reader import ChunkReadError
from imgaccel.reader.merged_view import PathError

from .settings import load_settings

err = Console(stderr=True)
# Expected failures: reported as one line naming the object and the cause, exit 1.
FAILURES = (
    ConversionError, RegistryError, ImageOpenError, ChunkReadError, PathError, OSError, ValueError,
    aiohttp.ClientError, asyncio.TimeoutError,
)  # fmt: skip


class SizeParam(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            n = value if isinstance(value, int) else parse_size(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 4MiB, 512k, 10GB)", param, ctx)
        if n <= 0:
            self.fail("must be positive", param, ctx)
        return n


class LimitParam(click.ParamType):  # type: ignore[type-arg]
    """``NAME=VALUE`` for one field of ``ConversionLimits`` (sizes like 4MiB accepted)."""

    name = "name=value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        from imgaccel.converter.options import ConversionLimits

        if isinstance(value, tuple):
            return value
        key, sep, raw = str(value).partition("=")
        if not sep or key not in ConversionLimits.model_fields:
            self.fail(f"{value!r}: expected NAME=VALUE, NAME one of {', '.join(ConversionLimits.model_fields)}")
        try:
            return key, parse_size(raw)
        except ValueError:
            self.fail(f"{value!r}: {raw!r} is not a number or size", param, ctx)


def parse_ref(text: str) -> ImageRef:
    try:
        return parse_reference(text)
    except ReferenceError as e:
        raise click.UsageError(str(e)) from None


def registry_client(ref: ImageRef, plain_http: bool, **kwargs: Any) -> RegistryClient:
    """A client for ``ref``'s registry with the CLI settings (plain HTTP, credentials) applied."""
    try:
        settings = load_settings()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    reg = settings.registries.get(ref.registry)
    plain = True if plain_http else (reg.plain_http if reg else None)
    creds = reg.credentials() if reg else None
    return RegistryClient(ref.registry, plain_http=plain, credentials=creds, **kwargs)


def fail(message: str) -> None:
    lines = message.strip().splitlines() or ["unknown error"]
    err.print(f"[red]error:[/red] {escape(lines[0])}", highlight=False, soft_wrap=True)


def describe(e: Exception) -> str:
    """One line for any failure (pydantic's own message spans several)."""
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"invalid {e.title}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(e)


def run_command(what: object, go: Callable[[], Coroutine[Any, Any, int]]) -> None:
    """Run a command's coroutine and exit with its code; any failure is one line on stderr."""
    try:
        code = asyncio.run(go())
    except FAILURES as e:
        fail(describe(e))
        sys.exit(1)
    except Exception as e:  # a bug: still one line, the traceback with -vv
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        fail(f"{what}: internal error: {type(e).__name__}: {e} (run with -vv for details)")
        sys.exit(1)
    sys.exit(code)
