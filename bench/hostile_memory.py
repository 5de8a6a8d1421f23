"""Peak memory of the service's conversion process on hostile and on large-but-honest layers.

    .venv/bin/python -m bench.hostile_memory [--files 100000]

Pushes to a local registry (a) a layer whose one PAX header is 200 MB, (b) a layer of
``--files`` small files, and (c) as the baseline, a one-file layer; then runs the conversion
process exactly as ``imgaccel serve`` does (``python -m imgaccel.service.isolated_job``, a
JobRequest on stdin, default limits) in both modes, and prints for each its outcome, wall
time and peak RSS (the child's VmHWM, which it reports itself), with the ratio to the
baseline's peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgaccel.converter.options import ConvertOptions
from imgaccel.service.isolated_job import JobRequest, options_to_wire
from tests.helpers import sha256
from tests.raw_push import push_image
from tests.registry import start_registry
from tests.tar_forge import Header, Member, forge, regular

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def many_files(n: int) -> bytes:
    return forge([regular(f"d{i // 1000:03d}/file-{i:06d}.txt", b"%d\n" % i) for i in range(n)])


def run_child(host: str, repo: str, mode: str) -> tuple[str, float, int]:
    request = JobRequest(
        registry=host,
        repository=repo,
        tag="v1",
        plain_http=True,
        request_attempts=3,
        max_connections=8,
        options=options_to_wire(ConvertOptions(mode=mode, cache_repo=None)),  # type: ignore[arg-type]
        memory_limit=4 << 30,
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgaccel.service.isolated_job"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MALLOC_ARENA_MAX": "2"},
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(request.model_dump_json().encode())
    proc.stdin.close()
    last = b"{}"
    for line in proc.stdout:
        last = line
    proc.wait()
    event = json.loads(last)
    outcome = "converted" if event.get("event") == "result" else f"refused: {event.get('message', '?')[78:150]}"
    return outcome, time.monotonic() - t0, int(event.get("peak_rss", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgaccel-bench-") as tmp:
        reg = start_registry(Path(tmp) / "registry")
        try:
            layers = {
                "baseline": forge([regular("a", b"1")]),
                "pax-200MB": forge([Member(Header(b"p", b"0", 3), b"abc", {b"comment": b"z" * (200 << 20)})]),
                f"files-{args.files}": many_files(args.files),
            }
            for name, tar in layers.items():
                blob = gzip.compress(tar, 1)
                push_image(reg.host, f"bench/{name.lower()}", "v1", [(GZ, blob)], [sha256(tar)])
                print(f"{name}: tar {len(tar)} bytes, gzip {len(blob)} bytes", flush=True)
            base: dict[str, int] = {}
            for mode in ("index", "full"):
                for name in layers:
                    outcome, secs, rss = run_child(reg.host, f"bench/{name.lower()}", mode)
                    base.setdefault(mode, rss)
                    print(
                        f"{mode:5s} {name:14s} {secs:6.2f} s  peak RSS {rss / 2**20:7.1f} MiB "
                        f"({rss / base[mode]:5.2f}x baseline)  {outcome}",
                        flush=True,
                    )
        finally:
            reg.stop()


if __name__ == "__main__":
    main()
