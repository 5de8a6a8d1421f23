"""A BlobFS server process for tests and benchmarks: serves local files until unmounted or killed.

``python -m tests.blobfs_server MOUNTPOINT STATE_DIR NAME=FILE... [--delay S]`` prints
``ready`` once every file is added (after a restart: re-added under the same node ids), and on
SIGTERM prints one JSON line of its request statistics before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from imgaccel.snapshotter.blob_fs import BlobFS, FileSource


class DelayedFileSource(FileSource):
    """A local file whose every read first waits ``delay`` seconds (a slow registry)."""

    def __init__(self, path: str | Path, delay: float, threaded: bool) -> None:
        super().__init__(path, threaded=threaded)
        self.delay = delay

    async def read(self, offset: int, size: int) -> bytes:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().read(offset, size)


async def serve(args: argparse.Namespace) -> int:
    fs = await BlobFS.open(args.mountpoint, args.state_dir)
    for spec in args.files:
        name, _, path = spec.partition("=")
        await fs.add(name, DelayedFileSource(path, args.delay, threaded=not args.inline))
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    unmounted = asyncio.ensure_future(fs.wait_unmounted())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), unmounted], return_when=asyncio.FIRST_COMPLETED)
    unmounted.cancel()
    await fs.close(grace=1.0)
    stats = fs.stats
    print(
        json.dumps(
            {
                "requests": dict(stats.requests),
                "read_sizes": {str(k): v for k, v in sorted(stats.read_sizes.items())},
                "read_bytes": stats.read_bytes,
                "read_errors": stats.read_errors,
                "resent": stats.resent,
                "inflight_max": stats.inflight_max,
            }
        ),
        flush=True,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("files", nargs="+", metavar="NAME=FILE")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every read waits first")
    parser.add_argument("--inline", action="store_true", help="pread on the loop thread (page-cached files)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
