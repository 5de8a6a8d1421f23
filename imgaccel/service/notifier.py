"""Completion notifications: stored deliveries, POSTed until acknowledged or expired.

When a job succeeds or finally fails, one delivery per matching webhook (its ``target`` regex
searched in the produced target reference) is written to the store, then POSTed by a loop that
retries with exponential backoff until the receiver answers 2xx, the attempts run out, or the
delivery expires. The body is JSON or a CloudEvents 1.0 structured event; with a secret, the
header ``X-Imgaccel-Signature: sha256=<hex HMAC-SHA256 of the body>`` signs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp

from imgaccel.service.job_store import STORE_ERRORS, Delivery, Job, JobStore
from imgaccel.service.metrics import ServiceMetrics
from imgaccel.service.service_config import Rule, ServiceConfig, WebhookConfig

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Imgaccel-Signature"


def intended_target(job: Job) -> str:
    """The reference the job produces (or would have produced)."""
    if job.target:
        return job.target
    suffix = Rule.model_validate(job.options).suffix
    base = f"{job.registry}/{job.repository}"
    return f"{base}:{job.tags[0]}{suffix}" if job.tags else f"{base}@{job.digest}"


def payload(job: Job) -> dict[str, Any]:
    source = f"{job.registry}/{job.repository}" + (f":{job.tags[0]}" if job.tags else "")
    return {
        "event": f"conversion.{job.state}",
        "job_id": job.id,
        "source": {"reference": source, "digest": job.digest, "tags": job.tags},
        "target": {"reference": intended_target(job), "digest": job.target_digest},
        "mode": job.mode,
        "layers": job.layers,
        "size_before": job.size_before,
        "size_after": job.size_after,
        "duration_seconds": round((job.finished_at or 0) - (job.started_at or job.created_at), 3),
        "attempts": job.attempts,
        "error": job.last_error if job.state == "failed" else None,
    }


def _body(hook: WebhookConfig, job: Job, delivery_id: str) -> str:
    data = payload(job)
    if hook.format == "cloudevents":
        data = {
            "specversion": "1.0",
            "id": delivery_id,
            "source": "imgaccel",
            "type": f"io.imgaccel.conversion.{job.state}",
            "subject": intended_target(job),
            "time": datetime.now(UTC).isoformat(),
            "datacontenttype": "application/json",
            "data": data,
        }
    return json.dumps(data, separators=(",", ":"))


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Notifier:
    def __init__(self, config: ServiceConfig, store: JobStore, metrics: ServiceMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def job_finished(self, job: Job) -> None:
        """Store one delivery per matching webhook (before anything is sent)."""
        target = intended_target(job)
        now = time.time()
        for hook in self.config.webhooks:
            if not re.search(hook.target, target):
                continue
            delivery_id = uuid.uuid4().hex[:16]
            await self.store.add_delivery(
                Delivery(
                    id=delivery_id,
                    job_id=job.id,
                    url=hook.url,
                    payload=_body(hook, job, delivery_id),
                    format=hook.format,
                    state="pending",
                    created_at=now,
                    expires_at=now + hook.expire_after,
                )
            )
        self.wakeup.set()

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._task = asyncio.create_task(self._loop(), name="imgaccel-notifier")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session:
            await self._session.close()

    def _hook(self, url: str) -> WebhookConfig | None:
        return next((h for h in self.config.webhooks if h.url == url), None)

    async def _loop(self) -> None:
        while True:
            try:
                due = await self.store.due_deliveries(time.time(), 50)
            except STORE_ERRORS as e:  # a database outage: try again shortly
                log.warning("notifier: %s", e)
                due = []
            if due:
                await asyncio.gather(*(self._send(d) for d in due))
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), 0.5)

    async def _send(self, d: Delivery) -> None:
        assert self._session is not None
        hook = self._hook(d.url)
        body = d.payload.encode()
        headers = {
            "Content-Type": "application/cloudevents+json" if d.format == "cloudevents" else "application/json",
            "User-Agent": "imgaccel-notifier",
        }
        if hook and hook.secret:
            headers[SIGNATURE_HEADER] = sign(hook.secret.get(), body)
        d.attempts += 1
        try:
            async with self._session.post(d.url, data=body, headers=headers) as resp:
                ok = 200 <= resp.status < 300
                error = None if ok else f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            ok, error = False, f"{type(e).__name__}: {e}"
        if ok:
            d.state, d.last_error = "delivered", None
        else:
            self.metrics.notification_failures.inc()
            d.last_error = error
            max_attempts = hook.max_attempts if hook else 1
            if d.attempts >= max_attempts or time.time() >= d.expires_at:
                d.state = "failed"
                log.warning("notification %s to %s given up: %s", d.id, d.url, error)
            else:
                backoff = min(1.0 * 2 ** (d.attempts - 1), 300.0)
                d.next_attempt_at = time.time() + backoff * random.uniform(0.5, 1.0)
        try:
            await self.store.save_delivery(d)
        except STORE_ERRORS as e:  # sent again once its claim runs out: at least once, as webhooks are
            log.warning("notification %s: state not saved: %s", d.id, e)
