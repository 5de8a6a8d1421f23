"""The web console of ``imgaccel serve`` under ``/ui/``: conversions, prewarm tasks, images
(``image_page.py``), nodes.

Server-rendered HTML (Jinja2, autoescaped: image names and errors come from users) with a
little vanilla JavaScript for live updates; every page works without it (plain reloads).

Sessions: ``/ui/login`` checks the API token and sets a signed session cookie (HttpOnly,
SameSite=Strict, Path=/ui): ``<expiry>.<nonce>.<HMAC-SHA256 of both>``, keyed by a key derived
from the API token. No session is kept in memory, so every replica of a Deployment accepts the
session, and changing the token ends every session. The token itself never leaves the login
POST (not in the cookie, not in a URL). Forms carry a CSRF token: an HMAC of the session
cookie under the same key. Without an API token configured no login is needed (the key is then
random per process). The browser sends the cookie only under ``/ui``: live updates are
server-sent events under ``/ui/live/...`` carrying fragments of the same templates
(``live.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from pydantic import ValidationError

from imgaccel.formats.prewarm import TERMINAL_TASK, ImageProgress, Task, TaskSpec, check_name
from imgaccel.formats.sizes import format_size, parse_size
from imgaccel.prewarm.runner import TaskRefused
from imgaccel.service.cache_node_stats import scraper_for
from imgaccel.service.console.image_page import ImagePage
from imgaccel.service.console.live import stream_rendered
from imgaccel.service.job_store import TERMINAL, Job

if TYPE_CHECKING:
    from imgaccel.service.service import Service

HERE = Path(__file__).parent
COOKIE = "imgaccel_session"
SESSION_SECONDS = 12 * 3600
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
}
JOB_STATES = ("queued", "running", "succeeded", "failed", "skipped")


@dataclass(frozen=True)
class Session:
    cookie: str  # the signed cookie value
    csrf: str  # what the session's forms must carry
    logged_in: bool  # (False: the service has no token; there is nothing to log out of)


def _duration(start: float | None, end: float | None) -> str:
    if start is None:
        return ""
    seconds = (end or time.time()) - start
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


class Console:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._open_key = secrets.token_bytes(32)  # the signing key while no API token is configured
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
        self.env.filters["size"] = lambda n: format_size(n or 0)
        self.env.filters["when"] = _when
        self.env.globals["duration"] = _duration
        self.env.globals["image_totals"] = _image_totals

    # -- sessions ------------------------------------------------------------------------

    @property
    def _token(self) -> str | None:
        auth = self.service.config.api_auth
        return auth.token.get() if auth.token is not None else None

    def _key(self) -> bytes:
        token = self._token
        if token is None:
            return self._open_key
        return hashlib.sha256(b"imgaccel-console-session\0" + token.encode()).digest()

    def _sign(self, text: str) -> str:
        return hmac.new(self._key(), text.encode(), hashlib.sha256).hexdigest()

    def session(self, request: web.Request) -> Session | None:
        """The request's session: a cookie signed under the current key and not expired."""
        cookie = request.cookies.get(COOKIE, "")
        expires, _, rest = cookie.partition(".")
        nonce, _, signature = rest.partition(".")
        if not (expires.isdigit() and nonce and signature) or int(expires) < time.time():
            return None
        if not hmac.compare_digest(signature, self._sign(f"{expires}.{nonce}")):
            return None
        return Session(cookie, self._sign("csrf." + cookie), self._token is not None)

    def _new_session(self, response: web.StreamResponse) -> Session:
        head = f"{int(time.time() + SESSION_SECONDS)}.{secrets.token_urlsafe(16)}"
        cookie = f"{head}.{self._sign(head)}"
        response.set_cookie(COOKIE, cookie, path="/ui", httponly=True, samesite="Strict", max_age=SESSION_SECONDS)
        return Session(cookie, self._sign("csrf." + cookie), self._token is not None)

    # -- rendering -----------------------------------------------------------------------

    def _render(self, name: str, session: Session | None, status: int = 200, **context: Any) -> web.Response:
        html = self.env.get_template(name).render(
            csrf=session.csrf if session else "", logged_in=session is not None and session.logged_in,
            **context,
        )  # fmt: skip
        return web.Response(text=html, content_type="text/html", status=status, headers=HEADERS)

    def _fragment(self, name: str, session: Session, **context: Any) -> str:
        return self.env.get_template(name).render(csrf=session.csrf, **context)

    async def _form(self, request: web.Request) -> tuple[Session, Any]:
        """A POSTed form of a session with its CSRF token; else 403."""
        s = self.session(request)
        form = await request.post()
        if s is None:
            raise web.HTTPSeeOther("/ui/login")
        if not hmac.compare_digest(str(form.get("csrf", "")), s.csrf):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page and try again")
        return s, form

    async def _session_for_get(self, request: web.Request) -> tuple[Session, web.Response | None]:
        """The session (a new one when the service has no token); else the redirect to log in."""
        s = self.session(request)
        if s is not None:
            return s, None
        if self._token is not None:
            raise web.HTTPSeeOther("/ui/login")
        holder = web.Response()
        return self._new_session(holder), holder

    def _finish(self, response: web.Response, holder: web.Response | None) -> web.Response:
        if holder is not None:
            for name, morsel in holder.cookies.items():
                response.cookies[name] = morsel
        return response

    # -- routes --------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ui", self.root)
        r.add_get("/ui/", self.jobs)
        r.add_get("/ui/login", self.login_form)
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_get("/ui/jobs/{id}", self.job)
        r.add_post("/ui/jobs/{id}/retry", self.retry)
        r.add_get("/ui/prewarm", self.prewarm)
        r.add_post("/ui/prewarm/plan", self.prewarm_plan)
        r.add_post("/ui/prewarm/create", self.prewarm_create)
        r.add_post("/ui/prewarm/tasks/{id}/cancel", self.prewarm_cancel)
        r.add_post("/ui/prewarm/tasks/{id}/template", self.prewarm_template)
        r.add_get("/ui/nodes", self.nodes)
        ImagePage(self).add_routes(app)
        r.add_static("/ui/static", HERE / "static")
        r.add_get("/ui/live/jobs", self.live_jobs)
        r.add_get("/ui/live/jobs/{id}", self.live_job)
        r.add_get("/ui/live/prewarm", self.live_prewarm)

    async def root(self, request: web.Request) -> web.Response:
        return _redirect("/ui/")

    async def login_form(self, request: web.Request) -> web.Response:
        if self._token is None:
            return _redirect("/ui/")
        return self._render("login.html", None, error=None)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = str(form.get("token", ""))
        want = self._token
        if want is None:
            return _redirect("/ui/")
        if not hmac.compare_digest(given.encode(), want.encode()):
            return self._render("login.html", None, status=401, error="wrong token")
        response = _redirect("/ui/")
        self._new_session(response)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        await self._form(request)
        response = _redirect("/ui/login" if self._token else "/ui/")
        response.del_cookie(COOKIE, path="/ui")
        return response

    @staticmethod
    def _job_filters(request: web.Request) -> tuple[str, str]:
        """The list's filters ("": none): a known state, a repository."""
        state = request.query.get("state", "")
        return (state if state in JOB_STATES else ""), request.query.get("repository", "")

    async def _job_list(self, request: web.Request) -> list[Job]:
        state, repository = self._job_filters(request)
        return await self.service.store.list_jobs(state or None, repository or None, 200, 0)

    async def jobs(self, request: web.Request) -> web.Response:
        s, holder = await self._session_for_get(request)
        jobs = await self._job_list(request)
        state, repository = self._job_filters(request)
        query = urlencode({k: v for k, v in (("state", state), ("repository", repository)) if v})
        page = self._render("jobs.html", s, jobs=jobs, states=JOB_STATES, state=state, repository=repository,
                            query=query, running=any(j.state not in TERMINAL for j in jobs), page="jobs")  # fmt: skip
        return self._finish(page, holder)

    async def _job_context(self, job: Job) -> dict[str, Any]:
        deliveries = await self.service.store.deliveries(job.id)
        return {"job": job, "deliveries": deliveries, "terminal": job.state in TERMINAL}

    async def job(self, request: web.Request) -> web.Response:
        s, holder = await self._session_for_get(request)
        job = await self.service.store.get(request.match_info["id"])
        if job is None:
            return self._finish(self._render("message.html", s, 404, title="No such job", text="No such job.",
                                             page="jobs"), holder)  # fmt: skip
        return self._finish(self._render("job.html", s, page="jobs", **await self._job_context(job)), holder)

    # -- live updates (server-sent events; see live.py) ------------------------------------

    def _live_session(self, request: web.Request) -> Session:
        s = self.session(request)
        if s is None:
            raise web.HTTPUnauthorized(text="no console session: log in at /ui/login", headers=HEADERS)
        return s

    async def live_jobs(self, request: web.Request) -> web.StreamResponse:
        s = self._live_session(request)

        async def render() -> dict[str, Any]:
            jobs = await self._job_list(request)
            items = [[j.id, self._fragment("_job_rows.html", s, jobs=[j])] for j in jobs]
            return {"items": items or [["empty", self._fragment("_job_rows.html", s, jobs=[])]]}

        return await stream_rendered(request, render, self.service.watchers, self.service.store.shared, HEADERS)

    async def live_job(self, request: web.Request) -> web.StreamResponse:
        s = self._live_session(request)
        job_id = request.match_info["id"]

        async def render() -> dict[str, Any]:
            job = await self.service.store.get(job_id)
            if job is None:
                return {"html": "<p>No such job.</p>", "final": True}
            context = await self._job_context(job)
            # final once the job is finished and its webhook deliveries too
            final = context["terminal"] and all(d.state != "pending" for d in context["deliveries"])
            return {"html": self._fragment("_job_live.html", s, **context), "final": final}

        return await stream_rendered(request, render, self.service.watchers, self.service.store.shared, HEADERS)

    async def live_prewarm(self, request: web.Request) -> web.StreamResponse:
        s = self._live_session(request)
        store = self.service.prewarm.store

        async def render() -> dict[str, Any]:
            tasks = await store.list_tasks(None, 100, 0)
            items = [[t.id, self._fragment("_task_card.html", s, t=t, terminal=TERMINAL_TASK)] for t in tasks]
            return {"items": items or [["empty", '<p class="empty" data-key="empty">No tasks.</p>']]}

        watchers = self.service.prewarm_api.watchers
        return await stream_rendered(request, render, watchers, self.service.store.shared, HEADERS)

    async def retry(self, request: web.Request) -> web.Response:
        await self._form(request)
        job = await self.service.store.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound(text="no such job")
        await self.service.retry(job)  # (a job that is not finished is left alone)
        return _redirect(f"/ui/jobs/{job.id}")

    async def _prewarm_context(self) -> dict[str, Any]:
        store = self.service.prewarm.store
        return {
            "tasks": await store.list_tasks(None, 100, 0), "templates": await store.templates(),
            "terminal": TERMINAL_TASK, "quota": self.service.config.prewarm.quota, "page": "prewarm",
            "credential_names": sorted(self.service.config.prewarm.credentials),
        }  # fmt: skip

    async def prewarm(self, request: web.Request) -> web.Response:
        s, holder = await self._session_for_get(request)
        return self._finish(self._render("prewarm.html", s, form={}, **await self._prewarm_context()), holder)

    async def _spec(self, request: web.Request) -> tuple[Session, dict[str, str], TaskSpec | str]:
        s, raw = await self._form(request)
        form = {k: str(raw.get(k, "")).strip() for k in FORM_FIELDS}
        try:
            return s, form, _spec_from_form(form)
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            return s, form, str(msg).removeprefix("Value error, ")

    async def prewarm_plan(self, request: web.Request) -> web.Response:
        """The create form's first step: the plan, with a button to start it."""
        return await self._plan_or_create(request, start=False)

    async def prewarm_create(self, request: web.Request) -> web.Response:
        return await self._plan_or_create(request, start=True)

    async def _plan_or_create(self, request: web.Request, start: bool) -> web.Response:
        s, form, spec = await self._spec(request)
        if isinstance(spec, str):
            return self._render("prewarm.html", s, 400, form=form, error=spec, **await self._prewarm_context())
        try:
            _, plan = await self.service.prewarm.create(spec, dry_run=not start)
        except TaskRefused as e:
            return self._render("prewarm.html", s, 422, form=form, error=f"refused: {e}", plan=e.plan,
                                **await self._prewarm_context())  # fmt: skip
        if start:
            return _redirect("/ui/prewarm")
        return self._render("prewarm.html", s, form=form, plan=plan, confirm=True, **await self._prewarm_context())

    async def prewarm_cancel(self, request: web.Request) -> web.Response:
        await self._form(request)
        await self.service.prewarm.cancel(request.match_info["id"])
        return _redirect("/ui/prewarm")

    async def prewarm_template(self, request: web.Request) -> web.Response:
        s, form = await self._form(request)
        try:
            name = check_name(str(form.get("name", "")).strip(), "template name")
            await self.service.prewarm.save_template(request.match_info["id"], name)
        except ValueError as e:
            return self._render("prewarm.html", s, 400, form={}, error=str(e), **await self._prewarm_context())
        except KeyError:
            raise web.HTTPNotFound(text="no such prewarm task") from None
        return _redirect("/ui/prewarm")

    async def nodes(self, request: web.Request) -> web.Response:
        s, holder = await self._session_for_get(request)
        seen = await self.service.prewarm.store.nodes(0.0)
        cache_nodes = await scraper_for(self.service).stats()  # each at most once per 2 s, 2 s timeout
        page = self._render("nodes.html", s, nodes=seen, now=time.time(), cache_nodes=cache_nodes, page="nodes")
        return self._finish(page, holder)


FORM_FIELDS = ("images", "template", "credentials", "region", "card", "labels", "mode", "bandwidth")


def _spec_from_form(form: dict[str, str]) -> TaskSpec:
    """The create form as a TaskSpec (ValueError, ValidationError name the bad field)."""
    body: dict[str, Any] = {"images": [line.strip() for line in form["images"].splitlines() if line.strip()]}
    if form["template"]:
        body["template"] = form["template"]
        if not body["images"]:
            del body["images"]
    if form["credentials"]:
        body["credentials"] = form["credentials"]
    terms = [f"region={form['region']}"] if form["region"] else []
    terms += [f"card={form['card']}"] if form["card"] else []
    terms += [t.strip() for t in form["labels"].split(",") if t.strip()]
    if terms:
        body["nodes"] = ",".join(terms)
    if form["mode"]:
        body["mode"] = form["mode"]
    if form["bandwidth"]:
        try:
            body["bandwidth"] = parse_size(form["bandwidth"])
        except ValueError as e:
            raise ValueError(f"bandwidth: {e}") from None
    return TaskSpec.model_validate(body)


def _image_totals(task: Task) -> list[ImageProgress]:
    """A task's progress per image, summed over its targets (in the order of the spec)."""
    totals: dict[str, ImageProgress] = {}
    for target in task.targets:
        for i in target.images:
            t = totals.setdefault(i.reference, ImageProgress(reference=i.reference))
            t.bytes_done += i.bytes_done
            t.bytes_total += i.bytes_total
    return list(totals.values())


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})
