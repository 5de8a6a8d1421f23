"""Image references, loopback detection (plain HTTP only on loopback by default), credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from imgaccel.pusher.auth import load_docker_credentials, parse_challenge
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import ImageRef, ReferenceError, is_loopback, parse_reference


def test_parse_reference() -> None:
    assert parse_reference("127.0.0.1:5000/team/app:v1") == ImageRef("127.0.0.1:5000", "team/app", "v1")
    assert parse_reference("localhost/app") == ImageRef("localhost", "app", "latest")
    digest = "sha256:" + "a" * 64
    ref = parse_reference(f"reg.example:443/a/b@{digest}")
    assert ref.digest == digest and ref.tag is None and ref.reference == digest
    assert str(ref.with_tag("x_accelerated")) == "reg.example:443/a/b:x_accelerated"
    for bad in ("app:v1", "127.0.0.1:5000/UPPER:v1", "127.0.0.1:5000/a:bad tag", "127.0.0.1:5000/a@sha256:12"):
        with pytest.raises(ReferenceError):
            parse_reference(bad)


def test_plain_http_only_on_loopback() -> None:
    for host in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.8.9.10", "[::1]:5000"):
        assert is_loopback(host), host
        assert RegistryClient(host, credentials=None).base_url.startswith("http://")
    for host in ("registry.example.com", "10.0.0.5:5000", "192.168.1.2"):
        assert not is_loopback(host), host
        assert RegistryClient(host, credentials=None).base_url.startswith("https://")
    assert RegistryClient("10.0.0.5:5000", plain_http=True, credentials=None).base_url == "http://10.0.0.5:5000"


def test_docker_config_credentials(tmp_path: Path) -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {"reg:5000": {"auth": auth}, "https://other": {"username": "bob", "password": "x"}}})
    )
    creds = load_docker_credentials("reg:5000", tmp_path / "config.json")
    assert creds is not None and (creds.username, creds.password) == ("alice", "pa:ss")
    other = load_docker_credentials("other", tmp_path / "config.json")
    assert other is not None and other.username == "bob"
    assert load_docker_credentials("nowhere", tmp_path / "config.json") is None


def test_bearer_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"')
    assert c.scheme == "bearer" and c.params["realm"] == "https://auth.example/token"
    assert c.params["scope"] == "repository:a:pull"
