"""Helpers shared by tests: run the real CLI in a subprocess, hash things."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes = b""


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """``imgaccel ARGS`` in a subprocess; stdout kept as text and as raw bytes."""
    proc = subprocess.run(
        [sys.executable, "-m", "imgaccel.cli.main", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        timeout=600,
    )
    return Result(
        proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), proc.stdout
    )


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


ACCEPT = "application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json"


def get_bytes(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req) as r:
        return bytes(r.read())


def get_json(url: str) -> dict:
    return dict(json.loads(get_bytes(url)))
