"""``imgaccel prewarm create|list|show|watch|cancel|nodes`` and ``prewarm template save|list``:
clients of the service's prewarm API (``imgaccel.prewarm.api``)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp
import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from imgaccel.cli.api_client import auth_headers, call_api, server_opt, token_opt
from imgaccel.cli.common import SizeParam
from imgaccel.formats.sizes import format_size

err = Console(stderr=True)
_TERMINAL = ("succeeded", "failed", "cancelled")


def _api(server: str, token: str | None, method: str, path: str, body: Any = None) -> Any:
    def show_plan(data: Any) -> None:  # a refused task: the plan it was refused for
        if isinstance(data, dict) and data.get("plan"):
            err.print(_plan_text(data["plan"]))

    return call_api(server, token, method, path, body, show_plan)


def _plan_text(plan: dict[str, Any]) -> str:
    lines = [f"plan: {len(plan['images'])} image(s) to {len(plan['targets'])} target(s): "
             f"{format_size(plan['total_bytes'])} in all, at most {format_size(plan['bytes_per_target'])} "
             f"per target (quota {format_size(plan['quota'])})"]  # fmt: skip
    for image in plan["images"]:
        size = sum(b["bytes"] for b in image["blobs"])
        extra = f", {image['profile_chunks']} profile chunks" if image["mode"] == "hot" else ""
        blobs = len(image["blobs"])
        lines.append(f"  {image['reference']}: {image['mode']}, {blobs} blobs, {format_size(size)}{extra}")
    lines.append("  targets: " + ", ".join(plan["targets"]))
    return "\n".join(lines)


def _line(task: dict[str, Any]) -> str:
    images = task["spec"]["images"]
    what = images[0] + (f" (+{len(images) - 1})" if len(images) > 1 else "")
    done = f"{format_size(task['bytes_done'])}/{format_size(task['bytes_total'])}"
    note = task.get("error") or task.get("message") or ""
    return f"{task['id']}  {task['state']:<10} {task['spec']['mode']:<4} {done:>22}  {what}  {note}".rstrip()


@click.group()
def prewarm() -> None:
    """Prewarm images onto cache nodes or labelled nodes before a scale-out."""


@prewarm.command("create")
@click.argument("images", nargs=-1)
@click.option("--mode", type=click.Choice(["hot", "full"]), default=None,
              help="hot: the chunks of the image's profile (default); full: every blob.")  # fmt: skip
@click.option("--label", default=None, help="Hot mode: the profile label [default: startup].")
@click.option("--nodes", "selector", default=None,
              help="Node selector, e.g. 'region=cn-east,card=h200' (default: the cache nodes).")  # fmt: skip
@click.option("--template", default=None, help="Start from a saved template (IMAGES then replace its images).")
@click.option("--credentials", default=None, help="A credentials name from the service's prewarm config.")
@click.option("--bandwidth", type=SizeParam(), default=None, help="Average bytes/s for the task, e.g. 50MiB.")
@click.option("--registry-concurrency", type=click.IntRange(1, 64), default=None,
              help="Requests in flight towards the registry (default: the service's).")  # fmt: skip
@click.option("--platform", default=None, help="e.g. linux/arm64 (default: the service's).")
@click.option("--dry-run", is_flag=True, help="Show the plan only.")
@click.option("--watch", "follow", is_flag=True, help="Follow the task until it ends.")
@server_opt
@token_opt
def create(images: tuple[str, ...], mode: str | None, label: str | None, selector: str | None,
           template: str | None, credentials: str | None, bandwidth: int | None,
           registry_concurrency: int | None, platform: str | None, dry_run: bool, follow: bool,
           server: str, token: str | None) -> None:  # fmt: skip
    """Plan and queue a prewarm task for IMAGES (references of accelerated images for hot mode)."""
    given = {"images": list(images), "mode": mode, "label": label, "nodes": selector, "template": template,
             "credentials": credentials, "bandwidth": bandwidth, "registry_concurrency": registry_concurrency,
             "platform": platform}  # fmt: skip
    body = {k: v for k, v in given.items() if v not in (None, [])}
    if dry_run:
        click.echo(_plan_text(_api(server, token, "POST", "/api/v1/prewarm/tasks?dry_run=1", body)["plan"]))
        return
    task = _api(server, token, "POST", "/api/v1/prewarm/tasks", body)
    err.print(_plan_text(task["plan"]))
    click.echo(task["id"])
    if follow:
        sys.exit(_watch(server, token, task["id"]))


@prewarm.command("list")
@click.option("--state", type=click.Choice(["queued", "planning", "running", "throttled", *_TERMINAL]))
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@server_opt
@token_opt
def list_tasks(state: str | None, limit: int, as_json: bool, server: str, token: str | None) -> None:
    """List prewarm tasks, newest first."""
    data = _api(server, token, "GET", f"/api/v1/prewarm/tasks?limit={limit}" + (f"&state={state}" if state else ""))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for task in data["tasks"]:
        click.echo(_line(task))


@prewarm.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@server_opt
@token_opt
def show(task_id: str, as_json: bool, server: str, token: str | None) -> None:
    """One task: its plan and every target's progress."""
    task = _api(server, token, "GET", f"/api/v1/prewarm/tasks/{task_id}")
    if as_json:
        click.echo(json.dumps(task, indent=2))
        return
    click.echo(_line(task))
    if task.get("plan"):
        click.echo(_plan_text(task["plan"]))
    for t in task["targets"]:
        click.echo(f"  {t['kind']} {t['name']}: {t['state']} {format_size(t['bytes_done'])}/"
                   f"{format_size(t['bytes_total'])}" + (f"  {t['error']}" if t.get("error") else ""))  # fmt: skip
        for i in t["images"]:
            click.echo(f"    {i['reference']}: {i['state']} {format_size(i['bytes_done'])}/"
                       f"{format_size(i['bytes_total'])}" + (f"  {i['error']}" if i.get("error") else ""))  # fmt: skip


@prewarm.command("watch")
@click.argument("task_id")
@server_opt
@token_opt
def watch(task_id: str, server: str, token: str | None) -> None:
    """Follow a task (a bar per target) until it ends; exit 0 only if it succeeded."""
    sys.exit(_watch(server, token, task_id))


def _watch(server: str, token: str | None, task_id: str) -> int:
    async def go() -> dict[str, Any] | None:
        headers = auth_headers(token)
        last: dict[str, Any] | None = None
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err,
                      disable=not err.is_terminal) as bars:  # fmt: skip
            rows: dict[str, TaskID] = {}
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as session,
                session.get(f"{server.rstrip('/')}/api/v1/prewarm/tasks/{task_id}/events", headers=headers) as resp,
            ):
                if resp.status != 200:
                    raise click.ClickException(f"watch {task_id}: {resp.status}: {(await resp.text())[:200]}")
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    last = json.loads(line[6:])
                    for t in last["targets"]:
                        row = rows.setdefault(t["name"], bars.add_task(t["name"], total=None))
                        bars.update(row, description=f"{t['name']} {t['state']}", total=t["bytes_total"] or None,
                                    completed=t["bytes_done"])  # fmt: skip
                    if last.get("message") and not err.is_terminal:
                        err.print(f"{task_id}: {last['state']}: {last['message']}")
        return last

    try:
        final = asyncio.run(go())
    except aiohttp.ClientError as e:
        raise click.ClickException(f"cannot reach {server}: {e}") from None
    if final is None:
        raise click.ClickException(f"watch {task_id}: the stream ended without a status")
    click.echo(_line(final))
    for t in final["targets"]:
        if t["state"] != "succeeded":
            click.echo(f"  {t['kind']} {t['name']}: {t['state']}" + (f": {t['error']}" if t.get("error") else ""))
    return 0 if final["state"] == "succeeded" else 1


@prewarm.command("cancel")
@click.argument("task_id")
@server_opt
@token_opt
def cancel(task_id: str, server: str, token: str | None) -> None:
    """Cancel a queued or running task (nodes stop their assignments at their next poll)."""
    click.echo(_line(_api(server, token, "POST", f"/api/v1/prewarm/tasks/{task_id}/cancel")))


@prewarm.command("nodes")
@server_opt
@token_opt
def nodes(server: str, token: str | None) -> None:
    """The node daemons that polled the service, with their labels."""
    for n in _api(server, token, "GET", "/api/v1/prewarm/nodes")["nodes"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
        click.echo(f"{n['name']}  seen {n['seen_seconds_ago']:.0f} s ago  {labels}")


@prewarm.group()
def template() -> None:
    """Tasks saved for reuse (``prewarm create --template NAME``)."""


@template.command("save")
@click.argument("task_id")
@click.argument("name")
@server_opt
@token_opt
def template_save(task_id: str, name: str, server: str, token: str | None) -> None:
    """Save TASK_ID's images and settings as template NAME."""
    saved = _api(server, token, "POST", "/api/v1/prewarm/templates", {"task": task_id, "name": name})
    click.echo(f"{saved['name']}: {len(saved['spec']['images'])} image(s), {saved['spec']['mode']}")


@template.command("list")
@server_opt
@token_opt
def template_list(server: str, token: str | None) -> None:
    """List saved templates."""
    for t in _api(server, token, "GET", "/api/v1/prewarm/templates")["templates"]:
        spec = t["spec"]
        click.echo(f"{t['name']}  {spec['mode']}  {len(spec['images'])} image(s)  from task {t['source_task']}"
                   + (f"  nodes {spec['nodes']}" if spec.get("nodes") else ""))  # fmt: skip
