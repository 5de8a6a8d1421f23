"""The web console (``/ui/``) in a real headless Chromium, against a real ``imgaccel serve`` and
the real registry: login, a job followed live to the end, escaping of users' text, a prewarm
task created from the form (to a node that reports through the real poll API), the quota
refusal with its plan, templates, and the nodes page. Screenshots go to
``$IMGACCEL_TEST_ARTIFACTS`` (else the test's tmp dir)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fixtures.build_images import push, unique_image
from imgaccel.service.job_store import SQLiteJobStore
from imgaccel.service.service_config import Rule
from tests.registry import Registry
from tests.service import ServiceProcess, make_service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    WHY = ""
except ImportError:
    WHY = "selenium is not installed (pip install selenium)"
for _path, _what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver (chromedriver)")):
    if not WHY and not os.path.exists(_path):
        WHY = f"{_what} is not installed (apt-get install chromium chromium-driver)"
pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or "-"), pytest.mark.timeout(180)]

API_TOKEN = "console-api-token-0123"
NODE_TOKEN = "console-node-token-0123"
EVIL_ERROR = "<script>window.pwned = 1</script> conversion failed"
EVIL_REPO = "evil/<img src=x onerror=window.pwned=2>"
BULK = 60  # nodes labelled card=a10: a task to all of them is over the quota


@dataclass
class Env:
    service: ServiceProcess
    registry: Registry
    driver: Any
    shots: Path
    evil_job: str
    state: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str) -> None:
        self.driver.get(self.service.url + path)

    def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def until(self, predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = predicate()
            except (NoSuchElementException, StaleElementReferenceException):
                got = None
            if got:
                return got
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"timed out waiting for {what}; log: {self.service.log_path.read_text()[-2000:]}")

    def text(self, css: str) -> str:
        """The element's text; retried while the page reloads itself (a task that ended)."""
        for _ in range(50):
            try:
                return str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            except (NoSuchElementException, StaleElementReferenceException):
                time.sleep(0.1)
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)


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


def _seed_evil_job(data_dir: Path) -> str:
    """A failed job whose repository and error hold markup, as a user-controlled registry could."""

    async def seed() -> str:
        store = SQLiteJobStore(data_dir / "jobs.sqlite")
        try:
            job, _ = await store.enqueue("127.0.0.1:1", EVIL_REPO, "sha256:" + "0" * 64, "v1", "index",
                                         Rule().model_dump(), "console-evil")  # fmt: skip
            job.state, job.last_error, job.attempts = "failed", EVIL_ERROR, 1
            job.started_at = job.finished_at = time.time()
            await store.save(job)
            return job.id
        finally:
            await store.close()

    return asyncio.run(seed())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("IMGACCEL_TEST_ARTIFACTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    evil = _seed_evil_job(work / "service" / "data")
    service = make_service(work / "service", {
        "workers": 1, "reconcile_interval": 0,
        "api_auth": {"token": {"value": API_TOKEN}},
        "retry": {"attempts": 1, "base_delay": 1, "max_delay": 1, "request_attempts": 2},
        "prewarm": {"node_token": {"value": NODE_TOKEN}, "node_poll_seconds": 0.5, "node_seen_seconds": 600,
                    "quota": "25MB"},
    }, token=API_TOKEN).start()  # fmt: skip
    nodes = [FakeNode(service, "gpu-1", {"region": "r1", "card": "h200"})]
    nodes[0].poll()
    nodes[0].start()
    for i in range(BULK):
        FakeNode(service, f"bulk-{i}", {"region": "r1", "card": "a10"}).poll()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=opts)
    try:
        yield Env(service, registry, driver, shots, evil)
    finally:
        driver.quit()
        nodes[0].stopped.set()
        service.stop()


def test_login_and_a_job_followed_live(env: Env, tmp_path: Path) -> None:
    d = env.driver
    env.get("/ui/")
    assert d.current_url.endswith("/ui/login")
    env.get("/ui/login")
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
    # Without the session the API under /ui is closed.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(env.service.url + "/ui/api/v1/jobs", timeout=5)
    assert e.value.code == 401

    d.execute_script("window.notReloaded = true")
    ref = f"{env.registry.host}/console/app:v1"
    push(unique_image(tmp_path, "console-app"), "v1", ref)
    status, job = env.service.api("POST", "/api/v1/jobs", {"reference": ref})
    assert status == 202, job
    row = f'tr[data-id="{job["id"]}"]'
    env.until(lambda: d.find_element(By.CSS_SELECTOR, row), 10, "the new job's row")
    env.until(lambda: "succeeded" in env.text(row), 90, "the job to succeed on the page")
    assert d.execute_script("return window.notReloaded") is True  # updated in place
    assert "console/app:v1" in env.text(row) and "_accelerated" in env.text(row)
    env.state["target"] = env.service.api("GET", f"/api/v1/jobs/{job['id']}")[1]["target"]
    env.shot("jobs")

    Select(d.find_element(By.ID, "f-state")).select_by_value("failed")
    d.find_element(By.CSS_SELECTOR, "form.filters button").click()
    env.until(lambda: "state=failed" in d.current_url, 10, "the next page")
    assert not d.find_elements(By.CSS_SELECTOR, row)
    assert d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{env.evil_job}"]')

    env.get(f"/ui/jobs/{job['id']}")
    assert env.text("[data-field=state]") == "succeeded"
    assert "1 done of 1 started" in env.text("[data-field=layers]")
    env.shot("job")


def test_users_text_is_escaped_and_retry(env: Env) -> None:
    d = env.driver
    env.get("/ui/")
    time.sleep(2.5)  # one live update: rows rebuilt by the script
    assert EVIL_REPO in env.text(f'tr[data-id="{env.evil_job}"]')
    env.get(f"/ui/jobs/{env.evil_job}")
    assert env.text("[data-field=error]") == EVIL_ERROR
    assert "&lt;script&gt;" in d.page_source and EVIL_REPO not in d.page_source
    assert d.execute_script("return window.pwned") is None
    env.shot("job-escaped")
    d.find_element(By.XPATH, "//button[text()='Retry']").click()
    env.until(lambda: d.current_url.endswith(f"/ui/jobs/{env.evil_job}"), 10, "the next page")
    env.until(lambda: env.text("[data-field=error]") != EVIL_ERROR, 10, "the error cleared by the retry")
    # without the CSRF token the same POST is refused
    req = urllib.request.Request(f"{env.service.url}/ui/jobs/{env.evil_job}/retry", data=b"csrf=x", method="POST")
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


def test_nodes_page_and_logout(env: Env) -> None:
    d = env.driver
    env.get("/ui/nodes")
    assert "gpu-1" in env.text("main") and "card=h200" in env.text("main")
    env.shot("nodes")
    d.find_element(By.XPATH, "//button[text()='Log out']").click()
    env.until(lambda: d.current_url.endswith("/ui/login"), 10, "the login page")
    env.get("/ui/prewarm")
    assert d.current_url.endswith("/ui/login")
