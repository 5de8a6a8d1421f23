"""The prewarm API's answers to bad and borderline requests (a real ``imgaccel serve`` and a
real registry; nothing is prewarmed: tests/test_prewarm.py runs tasks end to end), and the
pure pieces it rests on: node selectors and sizes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.build_images import push, unique_image
from imgaccel.formats.prewarm import TaskSpec, parse_selector, selector_matches
from imgaccel.formats.sizes import parse_size
from tests.registry import Registry
from tests.service import ServiceProcess, make_service

TOKEN = "api-token-0123456789"
NODE_TOKEN = "node-token-0123456789"


def test_node_selectors() -> None:
    reqs = parse_selector("region=cn-east, card!=a10,gpu")
    assert selector_matches(reqs, {"region": "cn-east", "card": "h200", "gpu": "8"})
    assert not selector_matches(reqs, {"region": "cn-east", "card": "a10", "gpu": "8"})
    assert not selector_matches(reqs, {"region": "cn-east", "card": "h200"})
    assert not selector_matches(reqs, {"region": "us-west", "card": "h200", "gpu": "1"})
    for bad in ("", "region=cn-east,", "re gion=x", "card=h 200", "=x"):
        with pytest.raises(ValueError, match="node selector"):
            parse_selector(bad)


def test_sizes() -> None:
    assert parse_size("100GB") == 100 * 10**9
    assert parse_size("200GiB") == 200 << 30
    assert parse_size("4k") == 4 << 10
    assert parse_size("1.5MiB") == 3 << 19
    assert parse_size("512") == 512
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("ten gigabytes")


def test_a_task_names_each_image_once() -> None:
    with pytest.raises(ValueError, match="named twice"):
        TaskSpec(images=["r.example/a:1", "r.example/a:1"])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[tuple[ServiceProcess, str]]:
    work = tmp_path_factory.mktemp("prewarm-api")
    plain = f"{registry.host}/prewarm-api/plain:v1"
    push(unique_image(work, "prewarm-api"), "v1", plain)
    service = make_service(work / "service", {
        "reconcile_interval": 0, "rules": [{"repository": "none", "enabled": False}],
        "api_auth": {"token": {"value": TOKEN}},
        "prewarm": {"cache_nodes": [{"address": "127.0.0.1:9"}], "node_token": {"value": NODE_TOKEN},
                    "credentials": {"team-a": {"username": "robot", "password": {"value": "pw"}}}},
    }, token=TOKEN).start()  # fmt: skip
    try:
        yield service, plain
    finally:
        service.stop()


def test_bad_requests_get_one_line_errors(service: tuple[ServiceProcess, str], tmp_path: Path) -> None:
    svc, plain = service
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"images": ["not a reference"]}, 422, "image 'not a reference'"),
        ({"images": [plain], "mode": "warm"}, 400, "mode"),
        ({"images": [plain], "nodes": "card=h 200"}, 400, "node selector"),
        ({"images": [plain], "bandwidth": 10}, 400, "bandwidth"),
        ({"images": [plain], "nodes": "card=h200"}, 422, "no node matches 'card=h200'"),
        ({"images": [plain], "credentials": "team-b"}, 422, "credentials 'team-b' are not configured"),
        ({"images": [plain], "mode": "hot"}, 422, "not an accelerated image"),  # stored: failed
        ({"template": "nothing-saved"}, 422, "no template named 'nothing-saved'"),
        ({}, 422, "no images"),
        ({"images": [plain], "surprise": 1}, 400, "surprise"),
    ]
    for body, status, message in cases:
        got, answer = svc.api("POST", "/api/v1/prewarm/tasks", body)
        assert (got, message in answer["error"]) == (status, True), (body, answer)
        assert "\n" not in answer["error"]
    got, answer = svc.api("POST", "/api/v1/prewarm/tasks", {"images": [plain]}, token=None)
    assert got == 401
    got, answer = svc.api("GET", "/api/v1/prewarm/tasks/nope")
    assert got == 404 and "no prewarm task 'nope'" in answer["error"]


def test_a_dry_run_plans_a_plain_image_in_full_mode(service: tuple[ServiceProcess, str]) -> None:
    svc, plain = service
    before = svc.api("GET", "/api/v1/prewarm/tasks")[1]["tasks"]
    got, answer = svc.api("POST", "/api/v1/prewarm/tasks?dry_run=1", {"images": [plain], "mode": "full"})
    assert got == 200, answer
    (image,) = answer["plan"]["images"]
    assert image["mode"] == "full" and len(image["blobs"]) == 2  # config and the one layer
    assert answer["plan"]["total_bytes"] == sum(b["size"] for b in image["blobs"])
    assert answer["plan"]["targets"] == ["127.0.0.1:9"] and answer["plan"]["quota"] == 100 * 10**9
    got, listed = svc.api("GET", "/api/v1/prewarm/tasks")
    assert got == 200 and listed["tasks"] == before, "a dry run stores no task"


def test_node_polls_are_checked(service: tuple[ServiceProcess, str]) -> None:
    svc, _ = service
    got, _ = svc.api("POST", "/api/v1/prewarm/nodes/n1/poll", {"labels": {}}, token=TOKEN)
    assert got == 401, "the API token is not the node token"
    got, answer = svc.api("POST", "/api/v1/prewarm/nodes/n1/poll", {"labels": {"bad key!": "x"}}, token=NODE_TOKEN)
    assert got == 400 and "label key" in answer["error"]
    got, answer = svc.api("POST", "/api/v1/prewarm/nodes/../poll", {"labels": {}}, token=NODE_TOKEN)
    assert got in (400, 404)
    got, answer = svc.api("POST", "/api/v1/prewarm/nodes/n1/poll", {"labels": {"zone": "a"}}, token=NODE_TOKEN)
    assert got == 200 and answer == {"version": 1, "assignments": [], "poll_seconds": 5.0}
    got, nodes = svc.api("GET", "/api/v1/prewarm/nodes")
    assert [(n["name"], n["labels"]) for n in nodes["nodes"]] == [("n1", {"zone": "a"})]


def test_the_command_line_client(service: tuple[ServiceProcess, str]) -> None:
    from tests.helpers import run_cli

    svc, plain = service
    auth = ("--server", svc.url, "--token", TOKEN)
    r = run_cli("prewarm", "create", plain, "--mode", "full", "--dry-run", *auth)
    assert r.code == 0 and "plan: 1 image(s) to 1 target(s)" in r.out and "full, 2 blobs" in r.out, r.out + r.err
    r = run_cli("prewarm", "create", plain, "--mode", "hot", *auth)
    assert r.code == 1 and r.err.count("\n") == 1 and "not an accelerated image" in r.err, r.err
    listed = run_cli("prewarm", "list", "--state", "failed", *auth)
    task_id = listed.out.split()[0]
    assert listed.code == 0 and "failed" in listed.out and plain in listed.out
    shown = run_cli("prewarm", "show", task_id, *auth)
    assert shown.code == 0 and "not an accelerated image" in shown.out
    r = run_cli("prewarm", "cancel", task_id, *auth)
    assert r.code == 1 and "is failed already" in r.err
    r = run_cli("prewarm", "nodes", *auth)
    assert r.code == 0
    r = run_cli("prewarm", "list", "--server", svc.url, "--token", "wrong")
    assert r.code == 1 and "401" in r.err
