"""What the service's command-line clients (``imgaccel jobs``, ``imgaccel prewarm``) share:
the ``--server``/``--token`` options and one call of the HTTP API."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import aiohttp
import click

server_opt = click.option(
    "--server",
    default=lambda: os.environ.get("IMGACCEL_SERVER", "http://127.0.0.1:8080"),
    show_default="$IMGACCEL_SERVER or http://127.0.0.1:8080",
)
token_opt = click.option(
    "--token", default=lambda: os.environ.get("IMGACCEL_TOKEN"), help="API token ($IMGACCEL_TOKEN)."
)


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _call(server: str, token: str | None, method: str, path: str, body: Any,
                on_error: Callable[[Any], None] | None) -> Any:  # fmt: skip
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
        session.request(method, server.rstrip("/") + path, json=body, headers=auth_headers(token)) as resp,
    ):
        data = await resp.json(content_type=None)
        if resp.status >= 400:
            if on_error is not None:
                on_error(data)
            message = data.get("error") if isinstance(data, dict) else data
            raise click.ClickException(f"{method} {path}: {resp.status}: {message}")
        return data


def call_api(server: str, token: str | None, method: str, path: str, body: Any = None,
             on_error: Callable[[Any], None] | None = None) -> Any:  # fmt: skip
    """The JSON answer; a ``ClickException`` (one line) for an error answer (after ``on_error``
    saw its body) or an unreachable server."""
    try:
        return asyncio.run(_call(server, token, method, path, body, on_error))
    except aiohttp.ClientError as e:
        raise click.ClickException(f"cannot reach {server}: {e}") from None
