"""The web console (``/ui/``) in a real headless Chromium, against a real ``imgaccel serve`` and
the real registry: login, a job followed live to the end, escaping of users' text, a prewarm
task created from the form (to a node that reports through the real poll API), the quota
refusal with its plan, templates, and the nodes page. Screenshots go to
``$IMGACCEL_TEST_ARTIFACTS`` (else the test's tmp dir)."""

from __future__ import annotations

import gzip
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.build_images import Layout, push, unique_image
from tests.browser import WHY, By, Keys, Page, Select, artifacts_dir, chromium
from tests.fault_proxy import FaultProxy
from tests.registry import free_port, start_registry
from tests.service import ServiceProcess, WebhookReceiver, make_service
from tests.tar_forge import Header, Member, forge
from tests.test_bad_input import GZ
from tests.test_prewarm import CacheNodeProcess
from tests.test_service import notifications

pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or "-"), pytest.mark.timeout(180)]

API_TOKEN = "console-api-token-0123"
NODE_TOKEN = "console-node-token-0123"
EVENTS_TOKEN = "console-events-token-0123"
CLUSTER_TOKEN = "console-cluster-token-0123"
EVIL_NAME = b"<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
BULK = 60  # nodes labelled card=a10: a task to all of them is over the quota


@dataclass
class Env(Page):
    service: ServiceProcess = field(default=None)  # type: ignore[assignment]
    proxy: FaultProxy = field(default=None)  # type: ignore[assignment]  # the registry, as the service sees it
    hook: WebhookReceiver = field(default=None)  # type: ignore[assignment]
    state: dict[str, Any] = field(default_factory=dict)


class FakeNode(threading.Thread):
    """A node daemon's side of the poll API: reports each assignment half done, then done."""

    def __init__(self, service: ServiceProcess, name: str, labels: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.service, self.name, self.labels = service, name, labels
        self.seen: dict[tuple[str, str], int] = {}  # assignment -> its bytes; reported running once
        self.stopped = threading.Event()

    def poll(self) -> Any:
        reports = [
            {"task_id": task, "reference": ref, "state": "succeeded", "bytes_done": total, "bytes_total": total}
            for (task, ref), total in self.seen.items()
        ]
        self.seen.clear()
        status, answer = self.service.api(
            "POST", f"/api/v1/prewarm/nodes/{self.name}/poll", {"labels": self.labels, "reports": reports}, NODE_TOKEN
        )
        assert status == 200, answer
        done = {(r["task_id"], r["reference"]) for r in reports}
        half = []
        for a in answer["assignments"]:
            if (a["task_id"], a["reference"]) not in done:
                self.seen[(a["task_id"], a["reference"])] = a["bytes_total"]
                half.append({"task_id": a["task_id"], "reference": a["reference"], "state": "running",
                             "bytes_done": a["bytes_total"] // 2, "bytes_total": a["bytes_total"]})  # fmt: skip
        if half:
            self.service.api("POST", f"/api/v1/prewarm/nodes/{self.name}/poll",
                             {"labels": self.labels, "reports": half}, NODE_TOKEN)  # fmt: skip
        return answer

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.poll()
            except Exception as e:  # the service stopping at the end of the module
                print(f"fake node {self.name}: {e}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A registry that notifies a token-protected service with prewarm nodes and a webhook."""
    work = tmp_path_factory.mktemp("console")
    port = free_port()
    registry = start_registry(work / "registry", notifications(port, EVENTS_TOKEN))
    proxy = FaultProxy(registry.host, _slow_first_blob_reads).start()  # pushes go through it too
    hook = WebhookReceiver().start()
    cache_port = free_port()
    (work / "cachenode.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{cache_port}", "data_dir": str(work / "cachenode"),
        "cluster_tokens": [{"value": CLUSTER_TOKEN}], "upstreams": [{"host": proxy.host}],
    }))  # fmt: skip
    cache_node = CacheNodeProcess(work / "cachenode.yaml", cache_port, work / "cachenode.log")
    cache_node.start()
    service = make_service(work / "service", {
        "workers": 1, "reconcile_interval": 0,
        "registries": [{"endpoint": proxy.host, "repositories": ["*"]}],
        "events_auth": {"token": {"value": EVENTS_TOKEN}},
        "api_auth": {"token": {"value": API_TOKEN}},
        "retry": {"attempts": 1, "base_delay": 1, "max_delay": 1, "request_attempts": 2},
        "webhooks": [{"url": hook.url, "target": "_accelerated$"}],
        "prewarm": {"node_token": {"value": NODE_TOKEN}, "node_poll_seconds": 0.5, "node_seen_seconds": 600,
                    "quota": "25MB", "cache_nodes": [{"address": cache_node.address}],
                    "cache_node_token": {"value": CLUSTER_TOKEN}},
    }, token=API_TOKEN, port=port).start()  # fmt: skip
    nodes = [FakeNode(service, "gpu-1", {"region": "r1", "card": "h200"})]
    nodes[0].poll()
    nodes[0].start()
    for i in range(BULK):
        FakeNode(service, f"bulk-{i}", {"region": "r1", "card": "a10"}).poll()
    try:
        with chromium() as driver:
            yield Env(driver, service.url, artifacts_dir(work / "screenshots"), service.log_path, service, proxy, hook)
    finally:
        nodes[0].stopped.set()
        service.stop()
        hook.stop()
        cache_node.stop()
        proxy.stop()
        registry.stop()


def _slow_first_blob_reads(method: str, path: str, n: int) -> str | None:
    """The first read of each blob of console/* waits 3 s: jobs stay running long enough to watch."""
    return "slow" if method == "GET" and path.startswith("/v2/console/") and "/blobs/" in path and n == 1 else None


def _row_of(env: Env, repository: str) -> str:
    """The id of the job row (in the live job list) whose source is ``repository``."""
    for row in env.driver.find_elements(By.CSS_SELECTOR, "#jobs tr[data-id]"):
        if f"/{repository}:" in row.text:
            return str(row.get_attribute("data-id"))
    return ""


def test_login_and_pushed_images_followed_live(env: Env, tmp_path: Path) -> None:
    d = env.driver
    env.get("/ui/")
    assert d.current_url.endswith("/ui/login")
    d.find_element(By.ID, "token").send_keys("wrong")
    d.find_element(By.CSS_SELECTOR, "form.card button").click()
    assert "wrong token" in env.text("[role=alert]")
    env.shot("login")
    d.find_element(By.ID, "token").send_keys(API_TOKEN)
    d.find_element(By.CSS_SELECTOR, "form.card button").click()
    env.until(lambda: d.current_url.endswith("/ui/"), 10, "the next page")
    cookie = d.get_cookie("imgaccel_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert API_TOKEN not in cookie["value"] and API_TOKEN not in d.current_url
    # Without the session the live updates are closed.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(env.service.url + "/ui/live/jobs", timeout=5)
    assert e.value.code == 401

    # A push to the registry: its job appears in the list and finishes there, no reload.
    d.execute_script("window.notReloaded = true")
    push(unique_image(tmp_path, "console-app"), "v1", f"{env.proxy.host}/console/app:v1")
    job = env.until(lambda: _row_of(env, "console/app"), 30, "the pushed image's job in the list")
    row = f'tr[data-id="{job}"]'
    env.until(lambda: "running" in env.text(row), 30, "the job running in the list")
    env.shot("jobs-running")
    env.until(lambda: "succeeded" in env.text(row), 90, "the job to succeed in the list")
    assert d.execute_script("return window.notReloaded") is True  # updated in place
    assert "console/app:v1" in env.text(row) and "v1_accelerated" in env.text(row)
    env.state["target"] = env.service.api("GET", f"/api/v1/jobs/{job}")[1]["target"]
    link = d.find_element(By.CSS_SELECTOR, f"{row} a[href^='/ui/images?ref=']")
    assert link.text == env.state["target"]
    env.shot("jobs")

    Select(d.find_element(By.ID, "f-state")).select_by_value("failed")
    d.find_element(By.CSS_SELECTOR, "form.filters button").click()
    env.until(lambda: "state=failed" in d.current_url, 10, "the next page")
    time.sleep(1)  # the filtered live stream's first update
    assert not d.find_elements(By.CSS_SELECTOR, row) and "No jobs." in env.text("#jobs")

    # A second push, followed on its own page: per-layer progress, then done, no reload.
    env.get("/ui/")
    push(unique_image(tmp_path, "console-page"), "v1", f"{env.proxy.host}/console/page:v1")
    second = env.until(lambda: _row_of(env, "console/page"), 30, "the second job in the list")
    d.find_element(By.LINK_TEXT, second).click()
    env.until(lambda: d.current_url.endswith(f"/ui/jobs/{second}"), 10, "the job's page")
    d.execute_script("window.notReloaded = true")
    assert env.text("[data-field=state]") in ("queued", "running")
    env.until(lambda: "downloading" in env.text("table.layers"), 30, "the layer downloading")
    env.shot("job-running")
    env.until(lambda: env.text("[data-field=state]") == "succeeded", 90, "the job to succeed on its page")
    assert d.execute_script("return window.notReloaded") is True
    assert "1 done of 1 started" in env.text("[data-field=layers]")
    layer = d.find_element(By.CSS_SELECTOR, "table.layers tbody tr")
    assert "done" in layer.text and "sha256:" in layer.text
    assert d.find_elements(By.XPATH, "//button[text()='Retry']")  # a finished job can be retried
    env.until(lambda: "delivered" in env.text("main"), 30, "the webhook delivery")
    assert env.hook.url in env.text("main")
    env.shot("job")


def test_an_error_with_markup_is_shown_as_text_and_retry(env: Env, tmp_path: Path) -> None:
    """A layer whose tar entry is named with markup fails its conversion; the error names the
    entry, and the page shows it as text."""
    d = env.driver
    layout = Layout(tmp_path / "evil")
    layout.tag(layout.image([(GZ, gzip.compress(forge([Member(Header(EVIL_NAME, b"0", -512), b"x" * 1024)])))]), "v1")
    push(layout.root, "v1", f"{env.proxy.host}/console/evil:v1")
    env.get("/ui/")
    job = env.until(lambda: _row_of(env, "console/evil"), 30, "the hostile image's job in the list")
    env.until(lambda: "failed" in env.text(f'tr[data-id="{job}"]'), 60, "the job to fail")
    env.get(f"/ui/jobs/{job}")
    error = env.text("[data-field=error]")
    assert EVIL_NAME.decode() in error and "negative size" in error
    assert "&lt;script&gt;" in d.page_source and "<script>window" not in d.page_source
    assert d.execute_script("return window.pwned") is None
    env.shot("job-escaped")
    first = env.service.api("GET", f"/api/v1/jobs/{job}")[1]
    d.execute_script("window.notReloaded = true")
    d.find_element(By.XPATH, "//button[text()='Retry']").click()
    env.until(lambda: d.current_url.endswith(f"/ui/jobs/{job}"), 10, "the next page")

    def failed_again() -> bool:
        now = env.service.api("GET", f"/api/v1/jobs/{job}")[1]
        return bool(now["state"] == "failed" and now["finished_at"] > first["finished_at"])

    env.until(failed_again, 60, "the retried job to fail again")
    env.until(lambda: env.text("[data-field=state]") == "failed", 10, "the page to show it failed")
    assert EVIL_NAME.decode() in env.text("[data-field=error]") and d.execute_script("return window.pwned") is None
    # without the CSRF token the same POST is refused
    req = urllib.request.Request(f"{env.service.url}/ui/jobs/{job}/retry", data=b"csrf=x", method="POST")
    req.add_header("Cookie", f"imgaccel_session={d.get_cookie('imgaccel_session')['value']}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403


def _plan(env: Env, fields: dict[str, str], template: str | None = None) -> None:
    d = env.driver
    env.get("/ui/prewarm")
    for name, value in fields.items():
        box = d.find_element(By.ID, f"c-{name}")
        if box.tag_name == "select":
            Select(box).select_by_value(value)
        else:
            box.clear()
            box.send_keys(value)
    if template:
        Select(d.find_element(By.ID, "c-template")).select_by_value(template)
    d.find_element(By.ID, "plan-button").click()
    env.until(lambda: d.find_elements(By.ID, "plan"), 15, "the plan")


def _wait_task_done(env: Env) -> str:
    d = env.driver
    d.find_element(By.ID, "confirm").click()
    env.until(lambda: d.current_url.endswith("/ui/prewarm"), 10, "the next page")
    card = d.find_element(By.CSS_SELECTOR, "article.task")  # newest first
    task = str(card.get_attribute("data-task"))
    env.until(lambda: "succeeded" in env.text(f'article[data-task="{task}"] [data-field=state]'), 60, "task done")
    return task


def test_prewarm_from_the_form_quota_and_templates(env: Env) -> None:
    d = env.driver
    target = env.state["target"]
    _plan(env, {"images": target, "region": "r1", "card": "h200", "mode": "full", "bandwidth": "10MiB"})
    assert "gpu-1" in env.text("#plan") and target in env.text("#plan")
    env.shot("prewarm-plan")
    task = _wait_task_done(env)
    card = f'article[data-task="{task}"]'
    assert "gpu-1" in env.text(card) and "succeeded" in env.text(f"{card} [data-target=gpu-1]")
    bar = d.find_element(By.CSS_SELECTOR, f"{card} progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") != "1"
    env.shot("prewarm-done")

    d.find_element(By.ID, f"tpl-{task}").send_keys("warm-app")
    d.find_element(By.CSS_SELECTOR, f"{card} form button").click()
    assert "warm-app" in env.text("main")

    # The template to every r1 node: over the quota, refused with the plan shown; nothing starts.
    _plan(env, {"region": "r1"}, template="warm-app")
    assert "over the per-task quota" in env.text("#refusal")
    assert f"{BULK + 1} target(s)" in env.text("#plan") and not d.find_elements(By.ID, "confirm")
    env.shot("prewarm-refused")

    # The template as saved (its node selector): a second task runs.
    _plan(env, {}, template="warm-app")
    assert "gpu-1" in env.text("#plan") and "full" in env.text("#plan")
    second = _wait_task_done(env)
    assert second != task
    _, body = env.service.api("GET", f"/api/v1/prewarm/tasks/{second}")
    assert body["spec"]["images"] == [target] and body["spec"]["nodes"] == "region=r1,card=h200", body


def test_a_cache_node_task_throttled_by_the_registry(env: Env) -> None:
    """No node selector: the configured cache nodes. The registry answers 429 to the first reads
    of the layer; the page shows the task throttled with the reason, then done."""
    d = env.driver
    target = env.state["target"]
    job = next(j for j in env.service.jobs("console/app") if j["state"] == "succeeded")
    layer_path = f"/v2/console/app/blobs/{job['progress']['layers'][0]['digest']}"
    first = env.proxy.seen[("GET", layer_path)]
    env.proxy.rule = lambda method, path, n: "429" if (method, path) == ("GET", layer_path) and n <= first + 3 else None
    try:
        _plan(env, {"images": target, "mode": "full"})
        assert env.text("#plan").count("127.0.0.1:") >= 2  # the image and the cache node target
        d.find_element(By.ID, "confirm").click()
        env.until(lambda: d.current_url.endswith("/ui/prewarm"), 10, "the next page")
        task = str(d.find_element(By.CSS_SELECTOR, "article.task").get_attribute("data-task"))
        card = f'article[data-task="{task}"]'
        env.until(lambda: "throttled" in env.text(f"{card} [data-field=state]"), 30, "the task throttled")
        assert "throttled by the registry (429" in env.text(f"{card} [data-field=message]")
        env.shot("prewarm-throttled")
        env.until(lambda: "succeeded" in env.text(f"{card} [data-field=state]"), 60, "the task done")
        assert "was throttled by the registry" in env.text(card) and "cache node" in env.text(card)
    finally:
        env.proxy.rule = _slow_first_blob_reads
    assert env.proxy.faults["429"] >= 1


def test_cancel_a_running_task(env: Env) -> None:
    d = env.driver
    body = {"images": [env.state["target"]], "mode": "full", "nodes": "card=a10,region=r1"}
    status, task = env.service.api("POST", "/api/v1/prewarm/tasks", body)
    assert status == 422 and "quota" in task["error"]  # all bulk nodes: refused through the API too
    FakeNode(env.service, "bulk-0", {"region": "r1", "card": "a10", "solo": "yes"}).poll()
    body = {"images": [env.state["target"]], "mode": "full", "nodes": "solo=yes"}
    status, task = env.service.api("POST", "/api/v1/prewarm/tasks", body)
    assert status == 201, task
    env.get("/ui/prewarm")
    card = f'article[data-task="{task["id"]}"]'
    env.until(lambda: "running" in env.text(f"{card} [data-field=state]") or d.refresh(), 20, "running")
    d.find_element(By.XPATH, f"//button[text()='Cancel task {task['id']}']").click()
    env.until(lambda: "cancelled" in env.text(f"{card} [data-field=state]"), 10, "cancelled")


UNLABELLED = """return Array.from(document.querySelectorAll("input:not([type=hidden]), select, textarea, progress"))
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")).map(e => e.outerHTML);"""


def test_every_control_is_labelled_and_reachable_by_keyboard(env: Env) -> None:
    d = env.driver
    job = env.service.jobs("console/app")[0]["id"]
    for path in ("/ui/", f"/ui/jobs/{job}", "/ui/prewarm", "/ui/nodes", f"/ui/images?ref={env.state['target']}"):
        env.get(path)
        assert d.execute_script(UNLABELLED) == [], path
        assert d.find_elements(By.CSS_SELECTOR, "h1"), path
        # the first Tab reaches the skip link, which leads to the content
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert d.switch_to.active_element.get_attribute("href").endswith("#main"), path


def test_without_javascript_the_pages_work_with_reloads(env: Env) -> None:
    with chromium(javascript=False) as driver:
        page = Page(driver, env.service.url, env.shots, env.service.log_path)
        page.login(API_TOKEN)
        page.get("/ui/")
        assert "console/app:v1" in page.text("#jobs")
        page.get("/ui/prewarm")
        driver.find_element(By.ID, "c-images").send_keys(env.state["target"])
        driver.find_element(By.ID, "c-region").send_keys("r1")
        driver.find_element(By.ID, "c-card").send_keys("h200")
        Select(driver.find_element(By.ID, "c-mode")).select_by_value("full")
        driver.find_element(By.ID, "plan-button").click()
        page.until(lambda: driver.find_elements(By.ID, "plan"), 15, "the plan")
        assert "gpu-1" in page.text("#plan")
        driver.find_element(By.ID, "confirm").click()
        page.until(lambda: driver.current_url.endswith("/ui/prewarm"), 10, "the task list")
        task = str(driver.find_element(By.CSS_SELECTOR, "article.task").get_attribute("data-task"))

        def done_after_reload() -> bool:
            driver.refresh()
            return "succeeded" in page.text(f'article[data-task="{task}"] [data-field=state]')

        page.until(done_after_reload, 60, "the task done, seen by reloading")
        page.shot("prewarm-no-javascript")


def test_nodes_page_and_logout(env: Env) -> None:
    d = env.driver
    env.get("/ui/nodes")
    assert "gpu-1" in env.text("main") and "card=h200" in env.text("main")
    env.shot("nodes")
    d.find_element(By.XPATH, "//button[text()='Log out']").click()
    env.until(lambda: d.current_url.endswith("/ui/login"), 10, "the login page")
    env.get("/ui/prewarm")
    assert d.current_url.endswith("/ui/login")
