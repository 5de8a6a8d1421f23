"""Session fixtures: a real registry, the fixture images pushed to it with skopeo, and a CLI runner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.build_images import build, push
from tests.helpers import run_cli
from tests.registry import Registry, start_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="session")
def images(registry: Registry, layouts: dict[str, Path]) -> dict[str, str]:
    """name -> pushed reference (``127.0.0.1:PORT/fixtures/<name>:v1``)."""
    refs = {}
    for name, layout in layouts.items():
        ref = f"{registry.host}/fixtures/{name}:v1"
        push(layout, "v1", ref)
        refs[name] = ref
    return refs


@pytest.fixture(scope="session")
def converted(images: dict[str, str]) -> dict[str, str]:
    """The app image converted in both modes: mode -> target reference."""
    out = {}
    for mode, suffix in (("index", "_accelerated"), ("full", "_containerd_accelerated")):
        r = run_cli("convert", images["app"], "--mode", mode)
        assert r.code == 0, r.err
        out[mode] = images["app"] + suffix
    return out
