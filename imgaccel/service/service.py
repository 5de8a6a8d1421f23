"""``imgaccel serve``: the HTTP service that turns push events into conversion jobs.

Routes: ``POST /events`` (registry notifications, Harbor webhooks), the job API under
``/api/v1/jobs``, ``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json``. A job is
written to the store before ``POST /events`` answers 202. Workers, the notifier and the
reconciler run as tasks of the same event loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import sqlite3
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from imgaccel.prewarm.runner import THROTTLE_RETRY, PrewarmRunner
from imgaccel.prewarm.store import PrewarmStore, SQLitePrewarmStore
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ReferenceError, is_loopback, parse_reference, show
from imgaccel.service.console import Console
from imgaccel.service.events import EventError, parse_event_body
from imgaccel.service.job_store import STORE_ERRORS, TERMINAL, Job, JobStore, SQLiteJobStore, StoreUnavailable
from imgaccel.service.metrics import ServiceMetrics
from imgaccel.service.notifier import Notifier
from imgaccel.service.openapi import OPENAPI
from imgaccel.service.prewarm_api import PrewarmApi, page_of
from imgaccel.service.reconciler import Reconciler
from imgaccel.service.service_config import InboundAuth, ServiceConfig
from imgaccel.service.sse import Watchers
from imgaccel.service.worker import JobRunner, RegistryClients, job_key

log = logging.getLogger(__name__)
EVENT_CONTENT_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
    "application/json",
    "application/cloudevents+json",
)


def _authorized(auth: InboundAuth, request: web.Request) -> bool:
    if auth.token is None:
        return True
    got = request.headers.get(auth.header, "")
    want = auth.token.get()
    return any(hmac.compare_digest(got, v) for v in (want, f"Bearer {want}"))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Service:
    def __init__(self, config: ServiceConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.metrics = ServiceMetrics()
        self.clients = RegistryClients(config)
        self.notifier = Notifier(config, self.store, self.metrics)
        self.runner = JobRunner(
            config, self.store, self.clients, self.metrics, self.publish, self.notifier.job_finished
        )
        self.reconciler = Reconciler(config, self.clients, self.enqueue, store)
        self.prewarm = PrewarmRunner(
            config.prewarm, _prewarm_store(config, store), self._prewarm_client,
            lambda task: self.prewarm_api.publish(task),
        )  # fmt: skip
        self.prewarm_api = PrewarmApi(self.prewarm, self._api_auth, self._node_auth)
        self.watchers = Watchers()
        self.console = Console(self)

    # -- jobs ----------------------------------------------------------------------------

    async def enqueue(self, registry: str, repository: str, digest: str, tag: str | None) -> tuple[Job | None, str]:
        """Create (or find) the job for this image; (None, reason) when no rule wants it."""
        if repository == self.config.cache_repo:
            return None, "the conversion-record repository"
        rule = self.config.rule_for(repository, tag)
        if rule is None:
            return None, f"no enabled rule matches {repository}:{tag or digest}"
        key = job_key(registry, repository, digest, rule.mode)
        job, _created = await self.store.enqueue(registry, repository, digest, tag, rule.mode, rule.model_dump(), key)
        self.runner.wakeup.set()
        self.publish(job)
        return job, "queued"

    def publish(self, job: Job) -> None:
        self.watchers.publish(job.id, job.to_json)

    async def retry(self, job: Job) -> bool:
        """Queue a finished job again from its first attempt; False when it is not finished."""
        if job.state not in TERMINAL:
            return False
        job.state, job.attempts, job.next_attempt_at, job.last_error, job.skip_reason = "queued", 0, 0.0, None, None
        await self.store.save(job)
        self.runner.wakeup.set()
        self.publish(job)
        return True

    def registry_for(self, host: str | None) -> str | None:
        """The configured registry an event names; None when it is not ours to contact.

        ``host`` has passed the strict ``host[:port]`` parse (events.py, parse_reference);
        ``is_loopback`` parses it again and raises rather than answer for anything else."""
        endpoints = [r.endpoint for r in self.config.registries]
        if host and host in endpoints:
            return host
        if not host and len(endpoints) == 1:
            return endpoints[0]
        if host and not endpoints and is_loopback(host):
            return host  # the embedded defaults: a registry on this machine
        return None

    # -- handlers ------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.Response:
        if not _authorized(self.config.events_auth, request):
            self.metrics.events.labels("unauthorized").inc()
            return _error(401, "missing or wrong credential")
        try:
            if request.content_length is not None and request.content_length > self.config.max_body:
                raise web.HTTPRequestEntityTooLarge(self.config.max_body, request.content_length)
            body = await request.read()  # the application's client_max_size is max_body
        except web.HTTPRequestEntityTooLarge:
            self.metrics.events.labels("too_large").inc()
            return _error(413, f"body larger than {self.config.max_body} bytes")
        try:
            pushes, ignored = parse_event_body(json.loads(body))
        except (ValueError, EventError) as e:
            self.metrics.events.labels("malformed").inc()
            return _error(400, f"malformed event: {e}")
        jobs, skipped = [], list(ignored)
        for push in pushes:
            registry = self.registry_for(push.registry)
            if registry is None:
                skipped.append(f"{push.registry or '?'}/{push.repository}: not a configured registry")
                continue
            job, reason = await self.enqueue(registry, push.repository, push.digest, push.tag)
            if job is None:
                skipped.append(reason)
            else:
                jobs.append(job.id)
        self.metrics.events.labels("accepted" if jobs else "ignored").inc()
        return web.json_response({"jobs": jobs, "ignored": skipped}, status=202 if jobs else 200)

    def _api_auth(self, request: web.Request) -> web.Response | None:
        if not _authorized(self.config.api_auth, request):
            return _error(401, "missing or wrong credential")
        return None

    def _node_auth(self, request: web.Request) -> web.Response | None:
        """Node daemons' polls: the prewarm node token, or the API token when none is set."""
        token = self.config.prewarm.node_token
        auth = InboundAuth(token=token) if token is not None else self.config.api_auth
        if not _authorized(auth, request):
            return _error(401, "missing or wrong node credential")
        return None

    def _prewarm_client(self, endpoint: str, credentials: Credentials | None) -> RegistryClient:
        """A new client for a prewarm task: the task's credentials, else the registry's own."""
        reg = self.config.registry(endpoint)
        return RegistryClient(
            endpoint, plain_http=reg.use_plain_http(), credentials=credentials or reg.credentials(),
            docker_config=credentials is None, retry=THROTTLE_RETRY, max_connections=reg.max_connections,
        )  # fmt: skip

    async def _requested_job(self, request: web.Request) -> Job | web.Response:
        """The job named in the path, or the 401/404 response to send instead."""
        if denied := self._api_auth(request):
            return denied
        job = await self.store.get(request.match_info["id"])
        return job if job is not None else _error(404, "no such job")

    async def _job_json(self, job: Job) -> dict[str, Any]:
        out = job.to_json()
        out["deliveries"] = [
            {"url": d.url, "state": d.state, "attempts": d.attempts, "last_error": d.last_error}
            for d in await self.store.deliveries(job.id)
        ]
        return out

    async def list_jobs(self, request: web.Request) -> web.Response:
        if denied := self._api_auth(request):
            return denied
        page = page_of(request)
        if isinstance(page, web.Response):
            return page
        limit, offset = page
        jobs = await self.store.list_jobs(request.query.get("state"), request.query.get("repository"), limit, offset)
        return web.json_response({"jobs": [j.to_json() for j in jobs], "limit": limit, "offset": offset})

    async def get_job(self, request: web.Request) -> web.Response:
        job = await self._requested_job(request)
        if isinstance(job, web.Response):
            return job
        return web.json_response(await self._job_json(job))

    async def create_job(self, request: web.Request) -> web.Response:
        if denied := self._api_auth(request):
            return denied
        try:
            body = await request.json()
        except ValueError as e:
            return _error(400, f'expected {{"reference": "host/repo:tag"}}: the body is not JSON: {e}')
        text = body.get("reference") if isinstance(body, dict) else None
        if not isinstance(text, str):
            return _error(400, f'expected {{"reference": "host/repo:tag"}}: reference: {show(text)} is not a string')
        try:
            ref = parse_reference(text)
        except ReferenceError as e:
            return _error(400, f"reference: {e}")
        registry = self.registry_for(ref.registry)
        if registry is None:
            if self.config.registries:
                return _error(400, f"reference: {ref.registry} is not a configured registry")
            return _error(400, f"reference: {ref.registry} is not on loopback (no 'registries:' configured)")
        try:
            client = await self.clients.get(registry)
            digest = ref.digest or await client.manifest_exists(ref.repository, ref.reference)
        except RegistryError as e:
            return _error(502, str(e))
        if not digest or not digest.startswith("sha256:"):
            return _error(404, f"{ref}: manifest not found")
        job, reason = await self.enqueue(registry, ref.repository, digest, ref.tag if not ref.digest else None)
        if job is None:
            return _error(422, reason)
        return web.json_response(await self._job_json(job), status=202)

    async def retry_job(self, request: web.Request) -> web.Response:
        job = await self._requested_job(request)
        if isinstance(job, web.Response):
            return job
        if not await self.retry(job):
            return _error(409, f"job is {job.state}")
        return web.json_response(await self._job_json(job), status=202)

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the job's record on every change, until it is finished."""
        job = await self._requested_job(request)
        if isinstance(job, web.Response):
            return job

        async def reread() -> dict[str, Any] | None:
            latest = await self.store.get(job.id)
            return latest.to_json() if latest else None

        def final(snapshot: dict[str, Any]) -> bool:
            return snapshot["state"] in TERMINAL

        first = await self._job_json(job)
        return await self.watchers.stream(request, job.id, "job", first, final, reread, shared=self.store.shared)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        try:
            await self.store.ping()
        except Exception as e:
            problems.append(f"job store cannot write: {e}")
        for reg in self.config.registries:
            try:
                client = await self.clients.get(reg.endpoint)
                async with client.session.get(f"{client.base_url}/v2/") as resp:
                    if resp.status not in (200, 401):
                        problems.append(f"{reg.endpoint}: /v2/ answered {resp.status}")
            except Exception as e:
                problems.append(f"{reg.endpoint}: {type(e).__name__}: {e}")
        if problems:
            return web.json_response({"ready": False, "error": "; ".join(problems), "problems": problems}, status=503)
        return web.json_response({"ready": True, "problems": []})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        body = self.metrics.render(await self.store.counts())
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    # -- lifecycle -----------------------------------------------------------------------

    @web.middleware
    async def _store_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A job store that cannot write answers 503 with one JSON error, never a 500."""
        try:
            return await handler(request)
        except STORE_ERRORS as e:
            log.error("%s %s: job store: %s", request.method, request.path, e)
            return _error(503, f"job store unavailable: {str(e).removeprefix('job store: ')}")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body, middlewares=[self._store_errors])
        app.router.add_post("/events", self.events)
        app.router.add_get("/api/v1/jobs", self.list_jobs)
        app.router.add_post("/api/v1/jobs", self.create_job)
        app.router.add_get("/api/v1/jobs/{id}", self.get_job)
        app.router.add_post("/api/v1/jobs/{id}/retry", self.retry_job)
        app.router.add_get("/api/v1/jobs/{id}/events", self.job_events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/openapi.json", self.openapi)
        self.prewarm_api.add_routes(app)
        self.console.add_routes(app)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        app.on_shutdown.append(self._end_streams)
        return app

    async def _start(self, app: web.Application) -> None:
        self.store.start()
        await self.runner.start()
        self.notifier.start()
        self.reconciler.start()
        await self.prewarm.start()

    async def _end_streams(self, app: web.Application) -> None:
        """Before open requests are waited for: end the server-sent event streams."""
        self.watchers.close()
        self.prewarm_api.watchers.close()

    async def _stop(self, app: web.Application) -> None:
        await self.prewarm.stop()
        await self.reconciler.stop()
        await self.runner.stop()
        await self.notifier.stop()
        await self.clients.close()
        await self.store.close()


def _prewarm_store(config: ServiceConfig, store: JobStore) -> PrewarmStore:
    """Prewarm tasks live where the jobs do."""
    from imgaccel.service.postgres_store import PostgresJobStore

    if isinstance(store, PostgresJobStore):
        from imgaccel.prewarm.postgres_store import PostgresPrewarmStore

        return PostgresPrewarmStore(store.pool, config.store.lease_seconds)
    return SQLitePrewarmStore(config.data_dir / "jobs.sqlite")


class ServiceStartError(Exception):
    """The service cannot start (its data_dir cannot hold the job store, the database cannot be
    reached); one line."""


async def open_store(config: ServiceConfig) -> JobStore:
    """The configured job store: PostgreSQL (``store.url``, migrated) or SQLite in data_dir."""
    if config.store.url is not None:
        from imgaccel.service.postgres_store import PostgresJobStore

        s = config.store
        try:
            return await PostgresJobStore.open(
                config.store.url, s.password.get() if s.password else None, s.pool_min, s.pool_max, s.timeout,
                s.lease_seconds, config.retry.attempts, schema="migrate" if s.migrate == "auto" else "check",
            )  # fmt: skip
        except StoreUnavailable as e:
            raise ServiceStartError(str(e)) from None
    try:
        return SQLiteJobStore(config.data_dir / "jobs.sqlite")
    except (OSError, sqlite3.Error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ServiceStartError(f"data_dir {config.data_dir}: cannot keep the job store there: {reason}") from e


async def migrate_only(config: ServiceConfig) -> str:
    """``imgaccel serve --migrate``: bring the PostgreSQL schema up to date, then return."""
    if config.store.url is None:
        return "nothing to migrate: the job store is SQLite (its schema is made at start)"
    from imgaccel.service.postgres_store import SCHEMA_VERSION, PostgresJobStore

    s = config.store
    try:
        store = await PostgresJobStore.open(config.store.url, s.password.get() if s.password else None, 1, 1, s.timeout,
                                            s.lease_seconds, config.retry.attempts, schema="none")  # fmt: skip
        try:
            found = await store.migrate()
        finally:
            await store.close()
    except StoreUnavailable as e:
        raise ServiceStartError(str(e)) from None
    return (
        f"job store schema: version {found} -> {SCHEMA_VERSION}"
        if found != SCHEMA_VERSION
        else (f"job store schema: version {SCHEMA_VERSION}, up to date")
    )


def serve(config: ServiceConfig) -> None:
    host, port = config.host_port

    async def application() -> web.Application:
        service = Service(config, await open_store(config))
        log.info("imgaccel serve on %s:%d, %s", host, port,
                 "jobs in PostgreSQL" if config.store.url else f"data in {config.data_dir}")  # fmt: skip
        return service.app()

    web.run_app(application(), host=host, port=port, print=lambda *_: None, access_log=None)
