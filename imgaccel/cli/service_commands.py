"""``imgaccel serve`` and ``imgaccel jobs list|show|retry|watch`` (clients of the job API)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from imgaccel.cli.api_client import auth_headers, call_api, server_opt, token_opt
from imgaccel.service.service_config import ConfigError, load_config

err = Console(stderr=True)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config (default: the embedded defaults).")  # fmt: skip
@click.option("--migrate", is_flag=True, help="Create or upgrade the PostgreSQL schema (store.url), then exit.")
def serve(config_path: Path | None, migrate: bool) -> None:
    """Run the conversion service: registry events in, accelerated images out."""
    from imgaccel.cli.common import fail
    from imgaccel.service.service import ServiceStartError, migrate_only
    from imgaccel.service.service import serve as run

    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        if migrate:
            click.echo(asyncio.run(migrate_only(config)))
            return
        run(config)
    except ServiceStartError as e:
        fail(str(e))
        sys.exit(1)


def _line(job: dict[str, Any]) -> str:
    ref = f"{job['registry']}/{job['repository']}" + (f":{job['tags'][0]}" if job["tags"] else f"@{job['digest'][:19]}")
    extra = job.get("target") or job.get("last_error") or job.get("skip_reason") or ""
    return f"{job['id']}  {job['state']:<9} {job['mode']:<5} {ref}  {extra}"


@click.group()
def jobs() -> None:
    """Inspect and drive the conversion service's jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "skipped"]))
@click.option("--repository")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True)
@server_opt
@token_opt
def list_jobs(
    state: str | None, repository: str | None, limit: int, offset: int, as_json: bool, server: str, token: str | None
) -> None:
    """List jobs, newest first."""
    query = (
        f"?limit={limit}&offset={offset}"
        + (f"&state={state}" if state else "")
        + (f"&repository={repository}" if repository else "")
    )
    data = call_api(server, token, "GET", f"/api/v1/jobs{query}")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for job in data["jobs"]:
        click.echo(_line(job))


@jobs.command("show")
@click.argument("job_id")
@server_opt
@token_opt
def show(job_id: str, server: str, token: str | None) -> None:
    """Show one job as JSON."""
    click.echo(json.dumps(call_api(server, token, "GET", f"/api/v1/jobs/{job_id}"), indent=2))


@jobs.command("retry")
@click.argument("job_id")
@server_opt
@token_opt
def retry(job_id: str, server: str, token: str | None) -> None:
    """Queue a finished job again."""
    click.echo(_line(call_api(server, token, "POST", f"/api/v1/jobs/{job_id}/retry")))


@jobs.command("submit")
@click.argument("reference")
@server_opt
@token_opt
def submit(reference: str, server: str, token: str | None) -> None:
    """Ask the service to convert REFERENCE now."""
    click.echo(_line(call_api(server, token, "POST", "/api/v1/jobs", {"reference": reference})))


@jobs.command("watch")
@click.argument("job_id")
@server_opt
@token_opt
def watch(job_id: str, server: str, token: str | None) -> None:
    """Follow a job's progress until it finishes; exit 0 only if it succeeded."""

    async def go() -> str:
        headers = auth_headers(token)
        final = "unknown"
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bars:  # fmt: skip
            task = bars.add_task(job_id, total=None)
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
                session.get(f"{server.rstrip('/')}/api/v1/jobs/{job_id}/events", headers=headers) as resp,
            ):
                if resp.status != 200:
                    raise click.ClickException(f"watch {job_id}: {resp.status}")
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    job = json.loads(line[6:])
                    p = job.get("progress") or {}
                    bars.update(task, description=f"{job_id} {job['state']}", total=p.get("bytes_total") or None,
                                completed=p.get("bytes_done", 0))  # fmt: skip
                    final = job["state"]
                    if final in ("succeeded", "failed", "skipped"):
                        click.echo(_line(job))
        return final

    try:
        state = asyncio.run(go())
    except aiohttp.ClientError as e:
        raise click.ClickException(f"cannot reach {server}: {e}") from None
    sys.exit(0 if state == "succeeded" else 1)
