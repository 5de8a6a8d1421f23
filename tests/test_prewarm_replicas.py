"""Prewarm tasks shared by two ``imgaccel serve`` replicas on one real PostgreSQL: a node polls
one replica while the task runs on the other, "at most max_running at once" holds across the
replicas, a cancel through one replica stops the task on the other, and a task whose replica
dies runs again on the survivor. Nodes are played by the test through the poll API (the node
daemon's side is tested in tests/test_prewarm.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.build_images import push, unique_image
from tests.helpers import run_cli
from tests.postgres import PASSWORD, Postgres, missing, start_postgres
from tests.registry import Registry
from tests.service import ServiceProcess, make_service

Cluster = tuple[list[ServiceProcess], str, Postgres]  # the replicas, the image, the database
pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "-")
TOKEN = "api-token-replicas-0123"
NODE_TOKEN = "node-token-replicas-0123"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[tuple[list[ServiceProcess], str, Postgres]]:
    work = tmp_path_factory.mktemp("prewarm-replicas")
    source = f"{registry.host}/prewarm-replicas/app:v1"
    push(unique_image(work, "prewarm-replicas"), "v1", source)
    r = run_cli("convert", source, "--mode", "full")
    assert r.code == 0, r.err
    pg = start_postgres(work / "pg")
    replicas: list[ServiceProcess] = []
    try:
        for i in range(2):
            replicas.append(make_service(work / f"serve-{i}", {
                "reconcile_interval": 0, "rules": [{"repository": "none", "enabled": False}],
                "api_auth": {"token": {"value": TOKEN}},
                "store": {"url": pg.url, "password": {"value": PASSWORD}, "lease_seconds": 3},
                "prewarm": {"node_token": {"value": NODE_TOKEN}, "node_poll_seconds": 0.5, "node_timeout": 600,
                            "max_running": 2},
            }, token=TOKEN).start())  # fmt: skip
        yield replicas, source + "_containerd_accelerated", pg
    finally:
        for s in replicas:
            s.stop()
        pg.stop()
        pg.remove()


def poll(svc: ServiceProcess, node: str, labels: dict[str, str], reports: list[dict[str, Any]] | None = None) -> Any:
    status, body = svc.api("POST", f"/api/v1/prewarm/nodes/{node}/poll", {"labels": labels, "reports": reports or []},
                           token=NODE_TOKEN)  # fmt: skip
    assert status == 200, body
    return body


def wait_state(svc: ServiceProcess, task_id: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, task = svc.api("GET", f"/api/v1/prewarm/tasks/{task_id}")
        assert status == 200, task
        if task["state"] in states:
            return dict(task)
        assert time.monotonic() < deadline, f"task {task_id} stayed {task['state']}"
        time.sleep(0.1)


def test_a_node_reports_to_either_replica(cluster: Cluster) -> None:
    (a, b), ref, _ = cluster
    poll(b, "node-1", {"zone": "z1"})  # known to every replica through the database
    status, task = a.api("POST", "/api/v1/prewarm/tasks", {"images": [ref], "mode": "full", "nodes": "zone=z1"})
    assert status == 201, task
    wait_state(b, task["id"], ("running",))
    (assignment,) = poll(b, "node-1", {"zone": "z1"})["assignments"]
    assert assignment["task_id"] == task["id"] and assignment["reference"] == ref
    report = {"task_id": task["id"], "reference": ref, "bytes_total": 100}
    poll(a, "node-1", {"zone": "z1"}, [{**report, "state": "running", "bytes_done": 40}])
    seen = wait_state(b, task["id"], ("running",))
    deadline = time.monotonic() + 10
    while seen["targets"][0]["bytes_done"] != 40:  # merged by whichever replica runs the task
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
        seen = wait_state(b, task["id"], ("running",))
    answer = poll(b, "node-1", {"zone": "z1"}, [{**report, "state": "succeeded", "bytes_done": 100}])
    assert answer["assignments"] == []
    done = wait_state(a, task["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded" and done["targets"][0]["bytes_done"] == 100, done


def test_max_running_holds_across_replicas_and_a_cancel_reaches_the_runner(
    cluster: Cluster,
) -> None:
    (a, b), ref, pg = cluster
    poll(a, "ghost", {"ghost": "yes"})  # never reports: its tasks run until cancelled
    ids = []
    for i in range(3):
        status, task = (a, b)[i % 2].api("POST", "/api/v1/prewarm/tasks",
                                         {"images": [ref], "mode": "full", "nodes": "ghost=yes"})  # fmt: skip
        assert status == 201, task
        ids.append(task["id"])
    wait_state(a, ids[0], ("running",))
    wait_state(a, ids[1], ("running",))
    time.sleep(3)  # both replicas had time to take the third, if they would
    assert pg.psql("select count(*) from prewarm_tasks where state in ('running', 'throttled')").strip() == "2"
    assert wait_state(b, ids[2], ("queued",))["state"] == "queued"
    owners = pg.psql(f"select lease_owner from prewarm_tasks where id = '{ids[0]}'").strip()
    assert owners  # held by one replica: cancel it through both, whichever holds it
    status, body = b.api("POST", f"/api/v1/prewarm/tasks/{ids[0]}/cancel")
    assert status == 200 and body["state"] == "cancelled", body
    wait_state(a, ids[2], ("running",), timeout=20)  # the freed slot goes to the queued task
    time.sleep(2)  # the replica that ran it has seen the cancel at its next write
    assert wait_state(a, ids[0], ("cancelled",))["state"] == "cancelled"
    for task_id in ids[1:]:
        a.api("POST", f"/api/v1/prewarm/tasks/{task_id}/cancel")


def test_a_task_runs_again_when_its_replica_dies(cluster: Cluster) -> None:
    (a, b), ref, pg = cluster
    poll(a, "ghost-2", {"ghost2": "yes"})
    status, task = a.api("POST", "/api/v1/prewarm/tasks", {"images": [ref], "mode": "full", "nodes": "ghost2=yes"})
    assert status == 201, task
    wait_state(a, task["id"], ("running",))
    holder = pg.psql(f"select lease_owner from prewarm_tasks where id = '{task['id']}'").strip()
    assert holder
    # Which replica holds it is not known from outside: kill one; if the lease does not move to
    # the other within the lease (3 s) plus a look for orphans (2 s), the victim was not the
    # holder: start it again and kill the other.
    survivor = b
    for victim, survivor in ((a, b), (b, a)):  # noqa: B007 - the survivor is used after the loop
        victim.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = pg.psql(f"select lease_owner from prewarm_tasks where id = '{task['id']}'").strip()
            if now and now != holder:
                break
            time.sleep(0.3)
        else:
            victim.start()
            continue
        break
    else:
        raise AssertionError("the task was not taken over")
    taken = wait_state(survivor, task["id"], ("running",))
    assert taken["attempts"] >= 2, taken  # started again by the survivor
    victim.start()
    survivor.api("POST", f"/api/v1/prewarm/tasks/{task['id']}/cancel")
