"""A reader process for restart tests: reads files over and over and checks their sha256.

``python -m tests.blobfs_reader EXPECT.json --passes N [--threads T] [--drop-cache]`` where
EXPECT.json maps paths to sha256 hex digests. Each thread reads every file per pass in random
chunk sizes (1 B to 2 MiB). Prints ``reading`` after the first successful read, then one JSON
line: passes, bytes, errors (path, pass, message) and the longest gap between two reads
returning (the stall a restart causes). Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time


class Reader:
    def __init__(self, expect: dict[str, str], passes: int, drop_cache: bool) -> None:
        self.expect = expect
        self.passes = passes
        self.drop_cache = drop_cache
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.bytes = 0
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.started = threading.Event()

    def tick(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.max_gap = max(self.max_gap, now - self.last)
            self.last = now
            self.bytes += n
        if not self.started.is_set():
            self.started.set()
            print("reading", flush=True)

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        for p in range(self.passes):
            for path, digest in self.expect.items():
                try:
                    h = hashlib.sha256()
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        while True:
                            chunk = os.read(fd, int(2 ** rnd.uniform(0, 21)))
                            self.tick(len(chunk))
                            if not chunk:
                                break
                            h.update(chunk)
                        if self.drop_cache:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                    if h.hexdigest() != digest:
                        raise ValueError("sha256 mismatch")
                except Exception as e:
                    with self.lock:
                        self.errors.append(f"{path} pass {p}: {type(e).__name__}: {e}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("expect")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--drop-cache", action="store_true")
    args = parser.parse_args()
    with open(args.expect) as f:
        expect = json.load(f)
    reader = Reader(expect, args.passes, args.drop_cache)
    t0 = time.monotonic()
    threads = [threading.Thread(target=reader.run, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {
        "passes": args.passes,
        "threads": args.threads,
        "bytes": reader.bytes,
        "seconds": round(time.monotonic() - t0, 3),
        "max_gap": round(reader.max_gap, 3),
        "errors": reader.errors[:20],
    }
    print(json.dumps(result), flush=True)
    return 1 if reader.errors else 0


if __name__ == "__main__":
    sys.exit(main())
