"""``imgaccel serve`` end to end: the real registry notifies the real service process."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.build_images import push, unique_image
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli
from tests.registry import Registry, free_port, start_registry
from tests.service import ServiceProcess, WebhookReceiver, make_service, wait_for

TOKEN = "intake-secret"
API_TOKEN = "api-secret"
HOOK_SECRET = "hook-secret"


@dataclass
class Env:
    registry: Registry
    service: ServiceProcess
    hook: WebhookReceiver


def notifications(port: int, token: str) -> str:
    return f"""notifications:
  events:
    includereferences: true
  endpoints:
    - name: imgaccel
      url: http://127.0.0.1:{port}/events
      headers:
        Authorization: [Bearer {token}]
      timeout: 2s
      threshold: 3
      backoff: 1s
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A registry that notifies a service (token-protected intake and API, a signed webhook)."""
    work = tmp_path_factory.mktemp("svc")
    port = free_port()
    registry = start_registry(work / "registry", notifications(port, TOKEN))
    hook = WebhookReceiver(statuses=[500]).start()
    config = {
        "registries": [{"endpoint": registry.host, "repositories": ["*"]}],
        "rules": [
            {"repository": "full/*", "mode": "full"},
            {"repository": "*", "tag": "(?!skip-).*", "mode": "index"},
        ],
        "events_auth": {"token": {"value": TOKEN}},
        "api_auth": {"token": {"value": API_TOKEN}},
        "reconcile_interval": 0,
        "max_body": 65536,
        "webhooks": [{"url": hook.url, "target": "_accelerated$", "secret": {"value": HOOK_SECRET}}],
    }
    service = make_service(work / "service", config, token=API_TOKEN, port=port).start()
    try:
        yield Env(registry, service, hook)
    finally:
        service.stop()
        hook.stop()
        registry.stop()


def tags(registry: Registry, repo: str) -> set[str]:
    return set(registry.tags(repo))


def test_push_converts_and_notifies_once(env: Env, tmp_path: Path) -> None:
    reg = env.registry
    push(unique_image(tmp_path, "svc-push"), "v1", f"{reg.host}/team/app:v1")
    wait_for(lambda: "v1_accelerated" in tags(reg, "team/app"), what="v1_accelerated")
    assert run_cli("check", f"{reg.host}/team/app:v1_accelerated").code == 0
    job = env.service.wait_job(lambda j: j["repository"] == "team/app" and j["state"] == "succeeded")
    assert job["tags"] == ["v1"] and job["target"] == f"{reg.host}/team/app:v1_accelerated"
    assert job["target_digest"].startswith("sha256:")
    # The webhook answered 500 first: one retry, then exactly one acknowledged delivery.
    wait_for(lambda: len(env.hook.requests) >= 2, what="webhook retry")
    time.sleep(1.5)
    mine = [r for r in env.hook.requests if json.loads(r[1])["job_id"] == job["id"]]
    assert [status for _, _, status in mine] == [500, 200]
    for headers, body, _ in mine:
        expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Imgaccel-Signature"] == expected
    payload = json.loads(mine[-1][1])
    assert payload["event"] == "conversion.succeeded" and payload["target"]["digest"] == job["target_digest"]
    assert payload["size_before"] > 1_000_000 and 0 < payload["size_after"] < 50_000 and payload["layers"] == 1
    _, body = env.service.api("GET", f"/api/v1/jobs/{job['id']}")
    assert body["deliveries"][0]["state"] == "delivered" and body["deliveries"][0]["attempts"] == 2


def test_two_tags_of_one_digest_convert_once(env: Env, tmp_path: Path) -> None:
    reg = env.registry
    layout = unique_image(tmp_path, "svc-twotags")
    push(layout, "v1", f"{reg.host}/team/twice:a")
    push(layout, "v1", f"{reg.host}/team/twice:b")
    wait_for(lambda: {"a_accelerated", "b_accelerated"} <= tags(reg, "team/twice"), what="both twins")
    jobs = env.service.jobs("team/twice")
    assert len(jobs) == 1 and sorted(jobs[0]["tags"]) == ["a", "b"]
    wait_for(lambda: env.service.jobs("team/twice")[0]["state"] == "succeeded", what="job settles")


def test_full_mode_rule_and_no_loops(env: Env, tmp_path: Path) -> None:
    reg = env.registry
    push(unique_image(tmp_path, "svc-full"), "v1", f"{reg.host}/full/app:v1")
    wait_for(lambda: "v1_containerd_accelerated" in tags(reg, "full/app"), what="full twin")
    assert run_cli("check", f"{reg.host}/full/app:v1_containerd_accelerated").code == 0
    time.sleep(2)  # the service's own pushes must not have created jobs
    jobs = env.service.jobs("full/app")
    assert len(jobs) == 1 and jobs[0]["mode"] == "full"


def test_rules_skip_and_digest_only(env: Env, tmp_path: Path) -> None:
    reg = env.registry
    push(unique_image(tmp_path, "svc-skip"), "v1", f"{reg.host}/team/skipped:skip-me")
    time.sleep(2)
    assert env.service.jobs("team/skipped") == []
    # A push by digest converts by digest and invents no tag.
    layout = unique_image(tmp_path, "svc-digest")
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    push(layout, "v1", f"{reg.host}/team/bydigest@{digest}")
    job = env.service.wait_job(lambda j: j["repository"] == "team/bydigest" and j["state"] == "succeeded")
    assert job["tags"] == [] and "@sha256:" in job["target"]
    assert tags(reg, "team/bydigest") <= {digest.replace(":", "-")}  # only the referrers index tag


def test_bad_requests_create_no_job(env: Env) -> None:
    before = len(env.service.jobs())
    url = f"{env.service.url}/events"
    good = json.dumps({"events": []}).encode()

    def post(body: bytes, headers: dict[str, str]) -> int:
        req = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    assert post(b"{not json", auth) == 400
    assert post(json.dumps({"hello": 1}).encode(), auth) == 400
    assert post(good, {"Content-Type": "application/json"}) == 401
    assert post(good, {"Authorization": "Bearer wrong"}) == 401
    assert post(b"{" + b" " * 70000 + b"}", auth) == 413
    blob = {"mediaType": "application/octet-stream", "digest": "sha256:" + "a" * 64, "repository": "x"}
    event = {"events": [{"action": "push", "target": blob}]}
    assert post(json.dumps(event).encode(), auth) == 200  # a blob push: acknowledged, ignored
    many = json.dumps({"events": event["events"] * 300}).encode()  # a large body within the limit
    assert 40_000 < len(many) < 65536 and post(many, auth) == 200
    assert len(env.service.jobs()) == before
    assert env.service.api("GET", "/api/v1/jobs", token=None)[0] == 401
    assert env.service.api("GET", "/api/v1/jobs", token="nope")[0] == 401


def test_api_and_metrics(env: Env) -> None:
    status, spec = env.service.api("GET", "/openapi.json")
    assert status == 200 and "/api/v1/jobs/{id}/events" in spec["paths"]
    assert env.service.api("GET", "/readyz")[0] == 200
    with urllib.request.urlopen(f"{env.service.url}/metrics") as r:
        text = r.read().decode()
    assert 'imgaccel_jobs{state="succeeded"}' in text and "imgaccel_conversion_duration_seconds_bucket" in text
    assert "imgaccel_notification_failures_total 1.0" in text
    jobs = env.service.jobs()
    r = run_cli("jobs", "list", "--server", env.service.url, "--token", API_TOKEN)
    assert r.code == 0 and jobs[0]["id"] in r.out
    r = run_cli("jobs", "watch", jobs[0]["id"], "--server", env.service.url, "--token", API_TOKEN)
    assert r.code == (0 if jobs[0]["state"] == "succeeded" else 1) and jobs[0]["id"] in r.out
    assert run_cli("jobs", "list", "--server", env.service.url).code == 1  # no token


@pytest.fixture(scope="module")
def quiet_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with notifications switched off."""
    reg = start_registry(tmp_path_factory.mktemp("quiet"))
    try:
        yield reg
    finally:
        reg.stop()


def test_reconciler_converts_without_notifications(quiet_registry: Registry, tmp_path: Path) -> None:
    push(unique_image(tmp_path, "svc-recon"), "v1", f"{quiet_registry.host}/silent/app:v3")
    config = {"registries": [{"endpoint": quiet_registry.host}], "reconcile_interval": 1}
    service = make_service(tmp_path / "svc", config).start()
    try:
        wait_for(lambda: "v3_accelerated" in quiet_registry.tags("silent/app"), what="reconciled twin")
        assert run_cli("check", f"{quiet_registry.host}/silent/app:v3_accelerated").code == 0
    finally:
        service.stop()


@pytest.mark.parametrize("kind", ["harbor", "cloudevents"])
def test_harbor_payloads(quiet_registry: Registry, tmp_path: Path, kind: str) -> None:
    repo = f"harbor/{kind}"
    layout = unique_image(tmp_path, f"svc-{kind}")
    push(layout, "v1", f"{quiet_registry.host}/{repo}:v1")
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    data = {
        "resources": [{"digest": digest, "tag": "v1", "resource_url": f"{quiet_registry.host}/{repo}:v1"}],
        "repository": {"name": kind, "namespace": "harbor", "repo_full_name": repo, "repo_type": "private"},
    }
    if kind == "harbor":
        body, ctype = (
            {"type": "PUSH_ARTIFACT", "occur_at": 1, "operator": "admin", "event_data": data},
            "application/json",
        )
    else:
        body = {"specversion": "1.0", "id": "1", "source": "harbor", "type": "harbor.artifact.pushed", "data": data}
        ctype = "application/cloudevents+json"
    config = {
        "registries": [{"endpoint": quiet_registry.host}],
        "reconcile_interval": 0,
        "events_auth": {"token": {"value": "h"}},
    }
    service = make_service(tmp_path / "svc", config).start()
    try:
        req = urllib.request.Request(
            f"{service.url}/events", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": ctype, "Authorization": "h"},
        )  # fmt: skip
        with urllib.request.urlopen(req) as r:
            assert r.status == 202
        wait_for(lambda: "v1_accelerated" in quiet_registry.tags(repo), what=f"{kind} twin")
    finally:
        service.stop()


def test_sigkill_mid_conversion_resumes(quiet_registry: Registry, tmp_path: Path) -> None:
    """Blob downloads go through a slow proxy so the kill lands mid-conversion."""
    repo = "crash/app"
    push(unique_image(tmp_path, "svc-crash"), "v1", f"{quiet_registry.host}/{repo}:v1")

    def slow(method: str, path: str, n: int) -> str | None:
        return "slow" if method == "GET" and "/blobs/sha256:" in path else None

    proxy = FaultProxy(quiet_registry.host, slow).start()
    try:
        config = {"registries": [{"endpoint": proxy.host}], "reconcile_interval": 0, "cache_repo": None}
        service = make_service(tmp_path / "svc", config).start()
        status, job = service.api("POST", "/api/v1/jobs", {"reference": f"{proxy.host}/{repo}:v1"})
        assert status == 202, job
        service.wait_job(
            lambda j: j["id"] == job["id"] and j["state"] == "running" and j["progress"].get("layers_started")
        )
        service.kill()
        assert "v1_accelerated" not in quiet_registry.tags(repo)  # no tag on a half-done image
        service.start()
        done = service.wait_job(lambda j: j["id"] == job["id"] and j["state"] == "succeeded")
        assert done["attempts"] == 2
        assert "v1_accelerated" in quiet_registry.tags(repo)
        assert run_cli("check", f"{quiet_registry.host}/{repo}:v1_accelerated").code == 0
        service.stop()
    finally:
        proxy.stop()


def test_the_replicas_deployment_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from imgaccel.service.service_config import ServiceConfig
    from tests.helpers import ROOT

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "service.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
    for name in ("PGPASSWORD", "REGISTRY_PASSWORD", "EVENTS_TOKEN", "API_TOKEN"):
        monkeypatch.setenv(name, "x")
    config = ServiceConfig.model_validate(yaml.safe_load(docs[0]["data"]["imgaccel.yaml"]))
    assert config.store.url == "postgresql://imgaccel@postgres.imgaccel.svc:5432/imgaccel"
    assert docs[1]["spec"]["replicas"] == 3
    probes = docs[1]["spec"]["template"]["spec"]["containers"][0]
    assert (
        probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
