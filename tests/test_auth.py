"""Credentials: a real registry with htpasswd basic auth; Docker config file credentials."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.build_images import push, unique_image
from tests.helpers import run_cli
from tests.registry import Registry, start_registry
from tests.token_auth import TokenServer


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("authreg")
    htpasswd = subprocess.run(
        ["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, text=True, check=True
    ).stdout
    (d / "htpasswd").write_text(htpasswd)
    reg = start_registry(d, f"auth:\n  htpasswd:\n    realm: imgaccel-test\n    path: {d / 'htpasswd'}\n")
    try:
        yield reg
    finally:
        reg.stop()


def docker_config(tmp: Path, host: str, user: str, password: str) -> dict[str, str]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (tmp / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(tmp)}


def test_credentials(auth_registry: Registry, tmp_path: Path) -> None:
    host = auth_registry.host
    ref = f"{host}/private/app:v1"
    push(unique_image(tmp_path, "auth"), "v1", ref, creds="alice:s3cret")
    empty = tmp_path / "none"
    empty.mkdir()
    r = run_cli("convert", ref, env={"DOCKER_CONFIG": str(empty)})
    assert r.code == 1 and "authentication required and no credentials" in r.err and "private/app" in r.err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    r = run_cli("convert", ref, env=docker_config(wrong, host, "alice", "nope"))
    assert r.code == 1 and "rejected the credentials" in r.err
    right = tmp_path / "right"
    right.mkdir()
    env = docker_config(right, host, "alice", "s3cret")
    r = run_cli("convert", ref, env=env)
    assert r.code == 0, r.err
    assert run_cli("check", ref + "_accelerated", env=env).code == 0


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, TokenServer]]:
    d = tmp_path_factory.mktemp("tokenreg")
    tokens = TokenServer(d, "carol", "t0ken").start()
    reg = start_registry(d, tokens.registry_config())
    try:
        yield reg, tokens
    finally:
        reg.stop()
        tokens.stop()


def test_bearer_token_flow(token_registry: tuple[Registry, TokenServer], tmp_path: Path) -> None:
    reg, tokens = token_registry
    ref = f"{reg.host}/secure/app:v1"
    push(unique_image(tmp_path, "bearer"), "v1", ref, creds="carol:t0ken")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    r = run_cli("convert", ref, env=docker_config(wrong, reg.host, "carol", "nope"))
    assert r.code == 1 and "token service refused the credentials" in r.err
    right = tmp_path / "right"
    right.mkdir()
    env = docker_config(right, reg.host, "carol", "t0ken")
    before = tokens.requests
    r = run_cli("convert", ref, "--mode", "full", env=env)
    assert r.code == 0, r.err
    assert tokens.requests > before  # the bearer flow was used, not anonymous access
    assert run_cli("cat", ref + "_containerd_accelerated", "/etc/motd", env=env).out == "unique\n"
