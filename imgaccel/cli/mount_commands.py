"""``imgaccel mount`` / ``umount``: serve an accelerated image as a read-only filesystem.

As root, ``mount`` puts the image at MOUNTPOINT through the kernel when it can (a read-only
overlay of EROFS layers over a FUSE data mount: ``snapshotter.image_mount``, which says where its
state lives); otherwise (not root, the kernel probe says "fuse", ``--layers``/``--layer``, or
``--fuse-tree``) it serves the tree with pyfuse3 (``reader.fuse_fs``). ``umount`` takes either down.

Before mounting, the mountpoint is checked: a FUSE mount left dead by a killed daemon (``stat``
fails with ENOTCONN) is detached, and a kernel-path mount whose process was killed is taken down
(``image_mount.unmount``), each with a log line, instead of being stacked on; a live mount of
anything at that path is refused with a one-line error saying what to run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imgaccel.reader.chunk_cache import DEFAULT_LIMIT, ChunkCache

if TYPE_CHECKING:
    from imgaccel.pusher.client import RegistryClient
    from imgaccel.reader.accelerated_image import AcceleratedImage

from imgaccel.formats.sizes import parse_size

from .common import FAILURES, describe, err, fail, parse_ref, registry_client, run_command

log = logging.getLogger(__name__)
_MAX_DEAD_MOUNTS = 16  # dead mounts stacked on one path that ``mount`` detaches before giving up


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imgaccel" / "chunks"


class MountpointError(Exception):
    """The mountpoint cannot be used; the message names it, says why and what to run."""


def _absolute(mountpoint: str) -> str:
    """The absolute path without touching the last component (a dead mount fails ``stat``)."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts_at(path: str) -> list[str]:
    """The filesystem types mounted at ``path``, bottom first (from /proc/self/mountinfo)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            parts = fields.split(" ")
            if len(parts) < 5:
                continue
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # \040 is a space
            if where == path:
                found.append(rest.split(" ", 1)[0])
    return found


def _detach(path: str) -> str | None:
    """Lazily unmount the topmost mount at ``path``; None on success, else the tool's complaint."""
    tool = shutil.which("fusermount3")
    args = [tool, "-u", "-z", path] if tool else ["umount", "-l", path]
    try:
        result = subprocess.run(args, capture_output=True, text=True)
    except OSError as e:
        return f"{args[0]}: {e.strerror}"
    return None if result.returncode == 0 else (result.stderr.strip() or f"{args[0]} exited {result.returncode}")


def _fuse_answers(path: str, timeout: float = 5.0) -> bool | None:
    """Whether the FUSE daemon behind ``path`` answers: ``statfs`` always goes to it (a plain
    ``stat`` may be served from attributes the kernel cached before the daemon died). False:
    the connection is gone (ENOTCONN); None: no answer within ``timeout`` (a hung daemon)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            answer.append(True)
        except OSError as e:
            answer.append(e.errno != errno.ENOTCONN)

    thread = threading.Thread(target=probe, name="statfs-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else None


def _take_down_orphan(mountpoint: str, path: str) -> bool:
    """Take down a kernel-path mount at ``path`` whose mount process was killed; whether there was one."""
    from imgaccel.snapshotter import image_mount

    if not image_mount.orphaned(path):
        return False
    log.warning("%s: a mount whose imgaccel mount process is gone is in the way; taking it down", mountpoint)
    try:
        image_mount.unmount(path)
    except OSError as e:
        raise MountpointError(f"{mountpoint}: taking down the mount left by a killed process failed: {e}") from None
    return True


def prepare_mountpoint(mountpoint: str) -> None:
    """Make sure a new mount at ``mountpoint`` is the only one there: detach FUSE mounts left
    dead by a killed daemon (logged), refuse any live mount. Raises ``MountpointError``."""
    path = _absolute(mountpoint)
    for _ in range(_MAX_DEAD_MOUNTS):
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise MountpointError(f"{mountpoint}: cannot use as a mountpoint: {e.strerror}") from None
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise MountpointError(f"{mountpoint}: cannot use as a mountpoint: not a directory")
            mounted = mounts_at(path)
            if not mounted:
                return
            top = mounted[-1]
            if _take_down_orphan(mountpoint, path):
                continue
            answers = _fuse_answers(path) if top.startswith("fuse") else True
            if answers is None:
                raise MountpointError(
                    f"{mountpoint}: the {top} filesystem mounted here does not answer; "
                    f"run 'fusermount3 -u -z {path}' (or stop its daemon) first"
                )
            if answers:
                raise MountpointError(
                    f"{mountpoint}: a {top} filesystem is already mounted here; "
                    f"unmount it first (imgaccel umount {path})"
                )
        log.warning("%s: a FUSE mount whose daemon is gone is in the way; detaching it", mountpoint)
        problem = _detach(path)
        if problem:
            raise MountpointError(
                f"{mountpoint}: a dead FUSE mount is in the way and detaching it failed ({problem}); "
                f"run 'fusermount3 -u -z {path}'"
            )
    raise MountpointError(f"{mountpoint}: more than {_MAX_DEAD_MOUNTS} dead FUSE mounts are stacked here")


@click.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--platform", help="os/arch[/variant] to mount (default: this machine's).")
@click.option("--plain-http", is_flag=True, help="Speak HTTP, not HTTPS, to the registry.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir,
              show_default="$XDG_CACHE_HOME/imgaccel/chunks", help="Chunk cache shared by every mount.")  # fmt: skip
@click.option("--cache-size", default=str(DEFAULT_LIMIT), help="Chunk cache limit (e.g. 10GiB).")
@click.option("--layers", "per_layer", is_flag=True,
              help="One directory per layer (0, 1, ...) in overlayfs form, for a snapshotter to stack.")  # fmt: skip
@click.option("--layer", "only_layer", metavar="DIGEST",
              help="Serve only this layer, as directory 0 in overlayfs form (a snapshotter's lowerdir).")  # fmt: skip
@click.option("--fetch-gap", default="64KiB", show_default=True,
              help="Merge Range requests for chunks at most this far apart in the blob.")  # fmt: skip
@click.option("--daemon", is_flag=True, help="Mount in the background; returns once the mount is ready.")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path), help="With --daemon: write the pid here.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="With --daemon: log here.")
@click.option("--label", default="default", show_default=True, help="Hot-chunk profile to prefetch in the background.")
@click.option("--no-prefetch", is_flag=True, help="Do not prefetch the image's hot-chunk profile.")
@click.option("--background-fetch", "background_rate", metavar="RATE",
              help="After the profile, fetch the rest of the image at up to RATE bytes/s (e.g. 20MiB).")  # fmt: skip
@click.option("--max-requests", default=32, show_default=True, type=click.IntRange(2, 256),
              help="Range requests in flight to the registry; background work uses at most 3/4.")  # fmt: skip
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write Prometheus metrics (bytes fetched, cache hits, latency) here every 5 s.")  # fmt: skip
@click.option("--fuse-tree", is_flag=True,
              help="Serve the tree with pyfuse3 even where the kernel path (root: EROFS + overlay) works.")  # fmt: skip
def mount(ref: str, mountpoint: str, platform: str | None, plain_http: bool, cache_dir: Path, cache_size: str,
          per_layer: bool, only_layer: str | None, fetch_gap: str, daemon: bool, pid_file: Path | None,
          log_file: Path | None, label: str, no_prefetch: bool, background_rate: str | None, max_requests: int,
          metrics_file: Path | None, fuse_tree: bool) -> None:  # fmt: skip
    """Mount REF read-only at MOUNTPOINT (merged layers), fetching chunks as they are read."""
    parsed = parse_ref(ref)
    try:
        limit, gap = parse_size(cache_size), parse_size(fetch_gap) if fetch_gap.strip() not in ("0", "") else 0
        rate = parse_size(background_rate) if background_rate else 0
    except ValueError:
        raise click.UsageError("--cache-size / --fetch-gap / --background-fetch: not a size (e.g. 10GiB)") from None
    try:
        prepare_mountpoint(mountpoint)
    except MountpointError as e:
        fail(str(e))
        sys.exit(1)
    cache = ChunkCache(cache_dir, limit)
    if daemon and _daemonize(mountpoint, pid_file, log_file):
        return  # the parent: the mount is up; the forked child serves it

    async def go() -> None:
        from imgaccel.reader.accelerated_image import open_image
        from imgaccel.reader.fuse_fs import serve_mount
        from imgaccel.reader.layer_reader import FetchSlots
        from imgaccel.reader.node_metrics import NodeMetrics
        from imgaccel.reader.prefetch import fetch_rest, replay_profile
        from imgaccel.reader.profiles import find_profile
        from imgaccel.snapshotter.image_mount import KernelPathUnavailable

        async def warm(client: RegistryClient, image: AcceleratedImage) -> None:
            """Profile first (foreground reads keep priority), then the rest if asked."""
            if not no_prefetch:
                try:
                    profile = await find_profile(client, image, label)
                except FAILURES as e:
                    log.warning("cannot look up profile %r: %s", label, describe(e))
                    profile = None
                if profile is None:
                    log.info("no profile %r for %s", label, image.manifest_digest)
                else:
                    log.info("prefetching %d chunks of profile %r", len(profile.chunks), label)
                    started = time.monotonic()
                    n = await replay_profile(image, profile)
                    log.info("profile %r: %d chunks cached in %.2f s", label, n, time.monotonic() - started)
            if rate:
                await fetch_rest(image, rate)

        async with registry_client(parsed, plain_http, max_connections=max_requests) as client:
            slots = FetchSlots(max_requests, max_requests * 3 // 4)
            started = time.monotonic()
            image = await open_image(client, parsed, platform, cache, slots)
            log.info("opened %s (%s mode, %d layers) in %.2f s", parsed, image.mode, len(image.layers),
                     time.monotonic() - started)  # fmt: skip
            for layer in image.layers:
                layer.gap = gap
            served = image
            if only_layer:  # the profile and metrics still cover the whole image
                if only_layer not in image.layer_digests:
                    raise ValueError(f"{parsed}: the image has no layer {only_layer}")
                i = image.layer_digests.index(only_layer)
                served = dataclasses.replace(image, layers=[image.layers[i]], layer_digests=[only_layer])
            background: list[asyncio.Task[Any]] = [asyncio.create_task(warm(client, image))]
            if metrics_file:
                background.append(asyncio.create_task(NodeMetrics(image).write_every(metrics_file)))

            def ready() -> None:
                log.info("mounted %s after %.2f s", parsed, time.monotonic() - started)

            try:
                tree = per_layer or only_layer is not None
                if not (tree or fuse_tree):
                    try:
                        await _serve_kernel_mount(served, mountpoint, ready)
                        return
                    except KernelPathUnavailable as e:
                        level = logging.INFO if os.geteuid() != 0 else logging.WARNING
                        log.log(level, "%s: serving the tree with pyfuse3, not through the kernel: %s", mountpoint, e)
                await serve_mount(served, mountpoint, ready, tree)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

    try:
        asyncio.run(go())
    except FAILURES as e:
        fail(describe(e))
        sys.exit(1)
    except RuntimeError as e:  # pyfuse3: mounting failed
        fail(f"{mountpoint}: cannot mount: {e}")
        sys.exit(1)


async def _serve_kernel_mount(image: AcceleratedImage, mountpoint: str, ready: Callable[[], None]) -> None:
    """Serve ``image`` at ``mountpoint`` through the kernel until it is unmounted or signalled;
    ``KernelPathUnavailable`` (nothing mounted) when it cannot."""
    from imgaccel.snapshotter.image_mount import kernel_mount

    async with kernel_mount(image, mountpoint) as mounted:
        ready()
        why = await mounted.wait()
        log.info("%s: taking the mount down (%s)", mountpoint, why)


def _daemonize(mountpoint: str, pid_file: Path | None, log_file: Path | None) -> bool:
    """Fork: the child detaches (new session, output to the log) and returns False to go on
    mounting; the parent waits until the mount is up and returns True. Forking (no second
    interpreter start) keeps ``mount --daemon`` fast; no thread or event loop exists yet."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        os.setsid()
        fd = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        if log_file:  # a daemon's log says what it did (opened, mounted, prefetched), not only failures
            root = logging.getLogger()
            root.setLevel(min(root.level, logging.INFO))
            for handler in root.handlers:
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return False
    deadline = time.monotonic() + 60
    while not os.path.ismount(mountpoint):
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            raise click.ClickException(f"mount failed (exit {code}); see {log_file or 'the log'}")
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGTERM)
            raise click.ClickException("mount did not come up within 60 s")
        time.sleep(0.01)
    if pid_file:
        pid_file.write_text(f"{child}\n")
    click.echo(f"mounted at {mountpoint} (pid {child})")
    return True


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint: str) -> None:
    """Unmount an imgaccel mount (lazily if its daemon is gone)."""
    from imgaccel.snapshotter.image_mount import unmount as unmount_kernel_mount

    try:
        if unmount_kernel_mount(mountpoint):  # the kernel path's overlay, its layers and process
            return
    except OSError as e:
        raise click.ClickException(f"{mountpoint}: {e.strerror or e}") from None
    tool = shutil.which("fusermount3") or shutil.which("umount")
    if tool is None:
        raise click.ClickException("neither fusermount3 nor umount is installed")
    lazy: list[str] = []
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise click.ClickException(f"{mountpoint}: {e.strerror}") from None
    if _fuse_answers(_absolute(mountpoint)) is False:  # a dead mount (its daemon was killed)
        lazy = ["-z"] if tool.endswith("fusermount3") else ["-l"]
    args = [tool, "-u", *lazy, mountpoint] if tool.endswith("fusermount3") else [tool, *lazy, mountpoint]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"{mountpoint}: {result.stderr.strip() or 'unmount failed'}")


@click.group()
def cache() -> None:
    """Inspect and maintain the local chunk cache."""


cache_dir_opt = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir,
    show_default="$XDG_CACHE_HOME/imgaccel/chunks",
)  # fmt: skip


@cache.command("stats")
@cache_dir_opt
def cache_stats(cache_dir: Path) -> None:
    """Entries and bytes in the cache."""
    entries = ChunkCache(cache_dir).entries()
    click.echo(f"{cache_dir}: {len(entries)} entries, {sum(size for _, size in entries)} bytes")


@cache.command("gc")
@cache_dir_opt
@click.option("--max-size", required=True, help="Evict least recently used entries down to this size.")
def cache_gc(cache_dir: Path, max_size: str) -> None:
    """Evict least recently used entries until the cache fits MAX_SIZE."""
    try:
        limit = parse_size(max_size)
    except ValueError:
        raise click.UsageError(f"--max-size: {max_size!r} is not a size") from None
    removed = ChunkCache(cache_dir, limit).evict(target=1.0)
    click.echo(f"evicted {removed} entries")


@cache.command("verify")
@cache_dir_opt
def cache_verify(cache_dir: Path) -> None:
    """Re-hash every entry; damaged ones are removed (they are fetched again when needed)."""
    checked, removed = ChunkCache(cache_dir).verify()
    for p in removed:
        click.echo(f"removed damaged entry {p}")
    click.echo(f"verified {checked} entries, {len(removed)} damaged")
    sys.exit(1 if removed else 0)


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("ref")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--label", default="default", show_default=True, help="Profile name (e.g. the workload).")
@click.option("--duration", default="30s", show_default=True, help="Stop recording after this long (30s, 2m).")
@click.option("--platform", help="os/arch[/variant] (default: this machine's).")
@click.option("--plain-http", is_flag=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir)
@click.option("--no-push", is_flag=True, help="Print the profile instead of attaching it to the image.")
def record(ref: str, command: tuple[str, ...], label: str, duration: str, platform: str | None, plain_http: bool,
           cache_dir: Path, no_push: bool) -> None:  # fmt: skip
    """Mount REF, run COMMAND chrooted into it, and record the chunks it reads, in order, as a
    hot-chunk profile attached to the image (``imgaccel record REF -- python -c 'import x'``)."""
    import tempfile

    import pyfuse3

    from imgaccel.reader.accelerated_image import open_image
    from imgaccel.reader.fuse_fs import serve_mount
    from imgaccel.reader.profiles import build_profile, push_profile

    parsed = parse_ref(ref)
    try:
        limit = _seconds(duration)
    except (ValueError, IndexError):
        raise click.UsageError(f"--duration: {duration!r} is not a duration") from None

    async def go() -> int:
        async with registry_client(parsed, plain_http) as client:
            image = await open_image(client, parsed, platform, ChunkCache(cache_dir))
            with tempfile.TemporaryDirectory(prefix="imgaccel-record-") as mnt:
                ready = asyncio.Event()
                mounted = asyncio.create_task(serve_mount(image, mnt, ready.set))
                await ready.wait()
                proc = await asyncio.create_subprocess_exec("chroot", mnt, *command)
                try:
                    code = await asyncio.wait_for(proc.wait(), limit)
                except TimeoutError:
                    proc.terminate()
                    code = await proc.wait()
                pyfuse3.terminate()
                await mounted
            profile = build_profile(image, label)
            if not profile.chunks:
                fail(f"{parsed}: the command (exit {code}) read no file data; no profile recorded")
                return 1
            size = sum(image.layers[c.layer].index.chunks[c.chunk].u_size for c in profile.chunks)
            if no_push:
                click.echo(profile.model_dump_json(indent=2))
            else:
                digest = await push_profile(client, image, profile)
                click.echo(f"{parsed}: profile {label!r}: {len(profile.chunks)} chunks, {size} bytes -> {digest}")
            if code:
                err.print(f"note: the command exited with {code}")
            return 0

    run_command(parsed, go)


@click.command()
@click.argument("ref")
@click.option("--label", default="default", show_default=True)
@click.option("--platform")
@click.option("--plain-http", is_flag=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir)
@click.option("--max-requests", default=32, show_default=True, type=click.IntRange(2, 256),
              help="Range requests in flight to the registry.")  # fmt: skip
def prefetch(ref: str, label: str, platform: str | None, plain_http: bool, cache_dir: Path, max_requests: int) -> None:
    """Warm the chunk cache from the image's hot-chunk profile, without mounting."""
    from imgaccel.reader.accelerated_image import open_image
    from imgaccel.reader.layer_reader import FetchSlots
    from imgaccel.reader.prefetch import replay_profile
    from imgaccel.reader.profiles import find_profile

    parsed = parse_ref(ref)

    async def go() -> int:
        async with registry_client(parsed, plain_http, max_connections=max_requests) as client:
            slots = FetchSlots(max_requests, max_requests - 1)  # nothing else is reading
            image = await open_image(client, parsed, platform, ChunkCache(cache_dir), slots)
            profile = await find_profile(client, image, label)
            if profile is None:
                fail(f"{parsed}: no profile labelled {label!r} for {image.manifest_digest}")
                return 1
            started = time.monotonic()
            n = await replay_profile(image, profile)
            requests = sum(layer.stats.requests for layer in image.layers)
            click.echo(f"{parsed}: {n} of {len(profile.chunks)} profile chunks cached, {image.bytes_fetched()} bytes "
                       f"fetched with {requests} requests in {time.monotonic() - started:.2f} s")  # fmt: skip
            return 0

    run_command(parsed, go)
