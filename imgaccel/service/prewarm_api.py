"""The prewarm HTTP API (``imgaccel.prewarm`` runs the tasks), mounted on ``imgaccel serve``'s
application.

Users (the API token): ``POST /api/v1/prewarm/tasks`` (``?dry_run=1`` plans only; 422 with
the plan when over the quota), ``GET /api/v1/prewarm/tasks``, ``GET .../tasks/<id>``,
``GET .../tasks/<id>/events`` (server-sent events until the task ends), ``POST
.../tasks/<id>/cancel``, ``POST /api/v1/prewarm/templates`` (``{"task", "name"}``), ``GET
/api/v1/prewarm/templates``, ``GET /api/v1/prewarm/nodes``. Node daemons (the node token):
``POST /api/v1/prewarm/nodes/<name>/poll``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from imgaccel.formats.prewarm import TERMINAL_TASK, NodePoll, NodePollAnswer, Task, TaskSpec, Template, check_name
from imgaccel.prewarm.runner import PrewarmRunner, TaskRefused
from imgaccel.service.sse import Watchers

Guard = Callable[[web.Request], web.Response | None]  # None: allowed; else the 401 to send
MAX_BODY = 1 << 20


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def page_of(request: web.Request) -> tuple[int, int] | web.Response:
    """``limit`` (at most 500, default 50) and ``offset`` of a list request, or the 400 to send."""
    try:
        return min(int(request.query.get("limit", "50")), 500), int(request.query.get("offset", "0"))
    except ValueError:
        return _error(400, "limit and offset must be integers")


def _invalid(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(body)"
    return f"{where}: {' '.join(str(first['msg']).split()).removeprefix('Value error, ')}"


class PrewarmApi:
    def __init__(self, runner: PrewarmRunner, user: Guard, node: Guard) -> None:
        self.runner = runner
        self.user = user
        self.node = node
        self.watchers = Watchers()

    def publish(self, task: Task) -> None:
        """Hand a task's latest status to its watchers (the runner calls this on each change)."""
        self.watchers.publish(task.id, task.summary)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/api/v1/prewarm/tasks", self.create)
        r.add_get("/api/v1/prewarm/tasks", self.list_tasks)
        r.add_get("/api/v1/prewarm/tasks/{id}", self.show)
        r.add_get("/api/v1/prewarm/tasks/{id}/events", self.events)
        r.add_post("/api/v1/prewarm/tasks/{id}/cancel", self.cancel)
        r.add_post("/api/v1/prewarm/templates", self.save_template)
        r.add_get("/api/v1/prewarm/templates", self.templates)
        r.add_get("/api/v1/prewarm/nodes", self.nodes)
        r.add_post("/api/v1/prewarm/nodes/{name}/poll", self.poll)

    async def _body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length)
        try:
            return json.loads(await request.read())
        except ValueError as e:
            raise _Bad(f"the body is not JSON: {e}") from None

    async def create(self, request: web.Request) -> web.Response:
        if denied := self.user(request):
            return denied
        try:
            spec = TaskSpec.model_validate(await self._body(request))
        except _Bad as e:
            return _error(400, str(e))
        except ValidationError as e:
            return _error(400, _invalid(e))
        dry_run = request.query.get("dry_run") in ("1", "true")
        try:
            task, plan = await self.runner.create(spec, dry_run)
        except TaskRefused as e:
            extra: dict[str, Any] = {}
            if e.plan is not None:
                extra["plan"] = e.plan.model_dump()
            if e.task is not None and not dry_run:
                extra["task"] = e.task.id
            return _error(422, str(e), **extra)
        if dry_run:
            return web.json_response({"plan": plan.model_dump()})
        return web.json_response(task.summary(), status=201)

    async def list_tasks(self, request: web.Request) -> web.Response:
        if denied := self.user(request):
            return denied
        page = page_of(request)
        if isinstance(page, web.Response):
            return page
        limit, offset = page
        tasks = await self.runner.store.list_tasks(request.query.get("state"), limit, offset)
        return web.json_response({"tasks": [t.summary() for t in tasks], "limit": limit, "offset": offset})

    async def _task(self, request: web.Request) -> Task | web.Response:
        if denied := self.user(request):
            return denied
        task = await self.runner.store.get(request.match_info["id"])
        return task if task is not None else _error(404, f"no prewarm task {request.match_info['id']!r}")

    async def show(self, request: web.Request) -> web.Response:
        task = await self._task(request)
        return task if isinstance(task, web.Response) else web.json_response(task.summary())

    async def cancel(self, request: web.Request) -> web.Response:
        task = await self._task(request)
        if isinstance(task, web.Response):
            return task
        if task.state in TERMINAL_TASK:
            return _error(409, f"task {task.id} is {task.state} already")
        cancelled = await self.runner.cancel(task.id)
        assert cancelled is not None
        return web.json_response(cancelled.summary())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the task's status on every change (at most ~5 a second), until it ends."""
        task = await self._task(request)
        if isinstance(task, web.Response):
            return task

        async def reread() -> dict[str, Any] | None:
            latest = await self.runner.store.get(task.id)
            return latest.summary() if latest else None

        def final(snapshot: dict[str, Any]) -> bool:
            return snapshot["state"] in TERMINAL_TASK

        return await self.watchers.stream(request, task.id, "task", task.summary(), final, reread, 0.2,
                                          shared=self.runner.store.shared)  # fmt: skip

    async def save_template(self, request: web.Request) -> web.Response:
        if denied := self.user(request):
            return denied
        try:
            body = await self._body(request)
            if not isinstance(body, dict) or not isinstance(body.get("task"), str):
                raise _Bad('expected {"task": "<task id>", "name": "<template name>"}')
            name = check_name(str(body.get("name", "")), "template name")
        except (_Bad, ValueError) as e:
            return _error(400, str(e))
        try:
            template = await self.runner.save_template(body["task"], name)
        except KeyError:
            return _error(404, f"no prewarm task {body['task']!r}")
        return web.json_response(template.model_dump(), status=201)

    async def templates(self, request: web.Request) -> web.Response:
        if denied := self.user(request):
            return denied
        return web.json_response({"templates": [t.model_dump() for t in await self.runner.store.templates()]})

    async def nodes(self, request: web.Request) -> web.Response:
        if denied := self.user(request):
            return denied
        seen = await self.runner.store.nodes(0.0)
        now = time.time()
        return web.json_response(
            {"nodes": [{**n.model_dump(), "seen_seconds_ago": round(now - n.last_seen, 1)} for n in seen]}
        )

    async def poll(self, request: web.Request) -> web.Response:
        if denied := self.node(request):
            return denied
        try:
            name = check_name(request.match_info["name"], "node name")
            poll = NodePoll.model_validate(await self._body(request))
        except _Bad as e:
            return _error(400, str(e))
        except ValidationError as e:
            return _error(400, _invalid(e))
        except ValueError as e:
            return _error(400, str(e))
        return web.json_response((await self.runner.node_poll(name, poll)).model_dump())


def _schemas() -> dict[str, Any]:
    """The wire models as OpenAPI component schemas (their nested models included)."""
    out: dict[str, Any] = {}
    for model in (TaskSpec, Task, Template, NodePoll, NodePollAnswer):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _body(model: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}


_TASK_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
OPENAPI_SCHEMAS = _schemas()
OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/prewarm/tasks": {
        "post": {
            "summary": "Plan a prewarm task and queue it (dry_run=1: the plan only)",
            "parameters": [{"name": "dry_run", "in": "query", "schema": {"type": "string", "enum": ["1", "true"]}}],
            "requestBody": {"required": True, **_body("TaskSpec")},
            "responses": {
                "201": {"description": "the task", **_body("Task")},
                "200": {"description": "dry run: {plan}"},
                "400": {"description": "malformed"},
                "422": {"description": "refused: no such image or profile, or over the quota ({error, plan})"},
            },
        },
        "get": {"summary": "List tasks, newest first", "responses": {"200": {"description": "{tasks}"}}},
    },
    "/api/v1/prewarm/tasks/{id}": {
        "get": {"parameters": [_TASK_ID], "responses": {"200": {"description": "the task", **_body("Task")}}}
    },
    "/api/v1/prewarm/tasks/{id}/events": {
        "get": {
            "summary": "Server-sent events: the task on each change until it ends",
            "parameters": [_TASK_ID],
            "responses": {"200": {"description": "text/event-stream"}},
        }
    },
    "/api/v1/prewarm/tasks/{id}/cancel": {
        "post": {"parameters": [_TASK_ID], "responses": {"200": {"description": "cancelled", **_body("Task")}}}
    },
    "/api/v1/prewarm/templates": {
        "post": {
            "summary": "Save a task as a template: {task, name}",
            "responses": {"201": {"description": "the template", **_body("Template")}},
        },
        "get": {"summary": "List templates", "responses": {"200": {"description": "{templates}"}}},
    },
    "/api/v1/prewarm/nodes": {
        "get": {"summary": "Nodes that polled", "responses": {"200": {"description": "{nodes}"}}}
    },
    "/api/v1/prewarm/nodes/{name}/poll": {
        "post": {
            "summary": "A node daemon's poll (node token): labels and reports in, assignments out",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, **_body("NodePoll")},
            "responses": {"200": {"description": "assignments", **_body("NodePollAnswer")}},
        }
    },
}


class _Bad(Exception):
    """A request body that is not what the route takes; one line."""
