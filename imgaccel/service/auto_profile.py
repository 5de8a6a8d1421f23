"""Start-up profiles for every converted image: run it in a sandbox, push what it read.

This module owns the profile step of a conversion job whose rule has ``profile:``
(``service_config.ProfileRule``), on both sides of a process boundary:

* **In the service** (``record_profile``): says why the step cannot run here
  (``missing_prerequisite``: not root, no runc, no /dev/fuse), starts ``python -m
  imgaccel.service.auto_profile`` in a session of its own with a ``ProfileRequest`` on its
  stdin (it carries the registry credentials), gives it ``seconds`` + ``SETUP_GRACE``, stops
  it (SIGTERM, then SIGKILL) when that runs out or the service stops, and then clears whatever
  the run left (``clean_run``: the runc container, its cgroups, every mount, the run's
  directory). ``sweep`` does the same, when the service starts, for runs a killed service left.
* **In the child** (``_record``): opens the accelerated image for the host's platform only,
  mounts it lazily through the kernel (``snapshotter.image_mount.kernel_mount``: EROFS layers
  over a FUSE data mount this process serves, so every data read the workload makes reaches
  the image's layer readers, which note it for a profile), writes an OCI runtime bundle and
  runs the image's Entrypoint + Cmd with ``runc run``: read-only root, new PID, mount, network
  (loopback only), IPC and UTS namespaces, a memory cgroup limit, runc's default capabilities
  minus CAP_NET_BIND_SERVICE. After ``seconds`` (or when the workload exits, or on SIGTERM)
  the container is killed (SIGKILL to its PID namespace) and deleted, everything is unmounted,
  and the chunks it read are pushed as a profile referrer of the accelerated image
  (``reader.profiles``). It prints one JSON ``ProfileOutcome`` line on stdout; its log goes to
  stderr. It gets SIGTERM when the service dies (PR_SET_PDEATHSIG), and cleans up.

The sandbox's root is an overlay whose only lower layer is the lazy mount, with a small tmpfs
as its upper layer, only so that runc can create the mount points (/proc, /dev, /tmp, ...) an
image may lack; runc then remounts it read-only (``root.readonly``), so the workload cannot
write to it. Files, per service, under ``<data_dir>/auto-profile/``::

    runc/                 runc's --root: the state of the containers below
    runs/<id>/            one run; <id> is the runc container id and its cgroup's name
        lazy/             the image mounted lazily (its state: /run/imgaccel/mounts/<hash>/)
        scratch/          tmpfs: upper/ and work/ of the root overlay
        rootfs/           the root overlay (the bundle's root.path)
        config.json       the OCI runtime configuration
        runc.log          runc's own log (JSON lines)
        workload.log      the workload's stdout and stderr
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from imgaccel.formats import oci
from imgaccel.pusher.auth import Credentials
from imgaccel.pusher.client import RegistryClient, RetryPolicy
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import AcceleratedImage, host_platform_label, open_image
from imgaccel.reader.merged_view import PathError
from imgaccel.reader.profiles import build_profile, push_profile
from imgaccel.service.child_process import relay_stderr, spawn_module
from imgaccel.snapshotter import image_mount
from imgaccel.snapshotter.mounts import MS_NODEV, MS_NOSUID, mount, mount_at, mounts, umount_or_detach

log = logging.getLogger(__name__)

RUNC = "runc"
SETUP_GRACE = 120.0  # seconds on top of ProfileRule.seconds: opening, mounting, tearing down, pushing
STOP_GRACE = 30.0  # seconds a child gets to clean up after SIGTERM before it is killed
CONTAINER_PREFIX = "imgaccel-profile-"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # containerd's
CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL"]  # runc's default set without CAP_NET_BIND_SERVICE
MAX_CONFIG = 8 << 20  # bytes of image config read
MAX_USER_TABLE = 1 << 20  # bytes of /etc/passwd or /etc/group read
ProfileState = Literal["pushed", "skipped", "failed"]


# -- what the two sides exchange ---------------------------------------------------------------


class ProfileRequest(BaseModel):
    """What the child needs for one run, as one JSON document on its stdin."""

    model_config = ConfigDict(extra="forbid")
    registry: str
    repository: str
    digest: str  # the accelerated image's top manifest or index
    plain_http: bool
    username: str | None = None
    password: str | None = None
    request_attempts: int = 6
    max_connections: int = 8
    label: str
    seconds: float
    memory_limit: int  # bytes: the sandbox's memory cgroup limit
    run_dir: str  # <work root>/runs/<container id>
    runc_root: str
    log_level: int = logging.INFO


@dataclass
class ProfileOutcome:
    """How the profile step went; ``job.progress["profile"]`` is its dict."""

    state: ProfileState
    label: str
    chunks: int = 0
    bytes: int = 0  # uncompressed bytes of the chunks in the profile
    digest: str | None = None  # the pushed profile's artifact manifest
    workload: str | None = None  # e.g. "exited with status 0 after 0.4 s", "killed after 10 s"
    error: str | None = None  # why it was skipped or failed
    seconds: float = 0.0  # how long the whole step took

    def to_progress(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.state == "pushed":
            what = f"{self.chunks} chunks, {self.bytes} bytes; the workload {self.workload}"
            return f"profile {self.label!r} pushed in {self.seconds:.1f} s: {what}"
        return f"profile {self.label!r} {self.state} after {self.seconds:.1f} s: {self.error}"


class ProfileSkipped(Exception):
    """The image cannot be profiled here (platform, no entrypoint, no kernel path); one line."""


class ProfileFailed(Exception):
    """The profile step went wrong; one line naming the object and the cause."""


@dataclass(frozen=True)
class RunDirs:
    """The paths of one run (see the module doc)."""

    root: Path

    @property
    def container_id(self) -> str:
        return self.root.name

    @property
    def lazy(self) -> Path:
        return self.root / "lazy"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def runc_log(self) -> Path:
        return self.root / "runc.log"

    @property
    def workload_log(self) -> Path:
        return self.root / "workload.log"


def work_root(data_dir: Path) -> Path:
    """Where a service with this ``data_dir`` keeps its runs and runc state."""
    return data_dir.resolve() / "auto-profile"


def new_run(root: Path) -> tuple[Path, Path]:
    """A fresh run directory (created) and runc's --root under ``root``."""
    runs, runc_root = root / "runs", root / "runc"
    runs.mkdir(parents=True, exist_ok=True, mode=0o700)
    runc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    run = runs / f"{CONTAINER_PREFIX}{secrets.token_hex(6)}"
    run.mkdir(mode=0o700)
    return run, runc_root


# -- the service side ------------------------------------------------------------------------------


def missing_prerequisite() -> str | None:
    """Why the profile step cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "not running as root (the lazy mount and the runc sandbox need it)"
    if shutil.which(RUNC) is None:
        return "runc is not installed"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (the lazy mount needs FUSE)"
    return None


async def record_profile(request: ProfileRequest, job_id: str = "") -> ProfileOutcome:
    """Run the profile step in a child process (see the module doc). Never raises for a failed
    step: the outcome says what happened. Cancelling it stops the child and cleans up."""
    started = time.monotonic()
    try:
        outcome = await _run_child(request, job_id)
    except OSError as e:
        outcome = ProfileOutcome("failed", request.label, error=f"cannot start the profile process: {e}")
    finally:
        await asyncio.to_thread(_clean_quietly, Path(request.run_dir), Path(request.runc_root))
    outcome.seconds = round(time.monotonic() - started, 2)
    return outcome


async def _run_child(request: ProfileRequest, job_id: str) -> ProfileOutcome:
    timeout = request.seconds + SETUP_GRACE
    proc = await spawn_module("imgaccel.service.auto_profile")
    assert proc.stdin and proc.stdout and proc.stderr
    lines: list[bytes] = []
    tail: deque[str] = deque(maxlen=20)
    readers = asyncio.gather(
        _read_lines(proc.stdout, lines), relay_stderr(proc.stderr, tail, f"job {job_id} profile", logging.DEBUG)
    )
    try:
        proc.stdin.write(request.model_dump_json().encode())
        proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(readers), timeout)
            await proc.wait()
        except TimeoutError:
            await _stop_child(proc)
            return ProfileOutcome("failed", request.label, error=f"the profile step exceeded {timeout:g} s")
    finally:
        if proc.returncode is None:  # cancelled: the service is stopping
            await _stop_child(proc)
        with contextlib.suppress(Exception):
            await readers
    return _child_outcome(lines, proc.returncode or 0, request.label, list(tail))


async def _read_lines(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (the child tears its sandbox down), then SIGKILL to its session."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _child_outcome(lines: list[bytes], code: int, label: str, tail: list[str]) -> ProfileOutcome:
    for line in reversed(lines):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            data = json.loads(line)
            return ProfileOutcome(**{k: data[k] for k in data if k in ProfileOutcome.__dataclass_fields__})
    last = next((t for t in reversed(tail) if t.strip()), "")
    how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    return ProfileOutcome("failed", label, error=f"the profile process {how} without an outcome: {last[-300:]}")


def _clean_quietly(run_dir: Path, runc_root: Path) -> None:
    try:
        if left := clean_run(run_dir, runc_root):
            log.warning("%s: cleaned up after the profile process: %s", run_dir, ", ".join(left))
    except OSError as e:
        log.error("%s: cleaning up failed: %s", run_dir, e)


def sweep(root: Path) -> list[str]:
    """Clear every run a previous service left under ``root`` (its process was killed); the
    container ids cleared. Blocking: run it in a thread."""
    runs = root / "runs"
    cleared = []
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        if run.is_dir() and run.name.startswith(CONTAINER_PREFIX):
            _clean_quietly(run, root / "runc")
            cleared.append(run.name)
    return cleared


def clean_run(run_dir: Path, runc_root: Path) -> list[str]:
    """Take down what the run at ``run_dir`` left: its runc container (killed), cgroups, root
    overlay, scratch tmpfs and lazy mount; then remove the directory. What had to be taken down
    (empty when the run had cleaned up after itself). OSError when a mount stays. Blocking."""
    if not run_dir.is_dir():
        return []
    run = RunDirs(run_dir)
    done = []
    if (runc_root / run.container_id).exists():
        _runc_sync(runc_root, "delete", "--force", run.container_id)
        done.append(f"container {run.container_id}")
    done += [f"cgroup {p}" for p in remove_cgroups(run.container_id)]
    for path in (run.rootfs, run.scratch):
        if mount_at(path) is not None:
            umount_or_detach(path)
            done.append(str(path))
    if image_mount.unmount(run.lazy):
        done.append(str(run.lazy))
    prefix = os.path.realpath(run_dir) + "/"
    if left := [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]:
        raise OSError(f"{run_dir}: still mounted under it: {', '.join(left)}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return done


def _runc_sync(runc_root: Path, *args: str) -> int:
    try:
        r = subprocess.run([RUNC, "--root", str(runc_root), *args], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("runc %s: %s", " ".join(args), e)
        return -1
    return r.returncode


def remove_cgroups(container_id: str) -> list[str]:
    """Remove the (empty) cgroup directories named ``container_id`` that runc left in any
    hierarchy; the ones removed."""
    removed = []
    for m in mounts():
        if m.fstype not in ("cgroup", "cgroup2"):
            continue
        path = Path(m.mountpoint) / container_id
        if path.is_dir():
            try:
                path.rmdir()
                removed.append(str(path))
            except OSError as e:
                log.warning("cgroup %s: cannot remove it: %s", path, e.strerror or e)
    return removed


# -- the child: image -> sandbox -> profile -------------------------------------------------------


@dataclass
class WorkloadProcess:
    """The sandbox's process, from the image config."""

    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int


async def _profile(request: ProfileRequest) -> ProfileOutcome:
    credentials = Credentials(request.username, request.password or "") if request.username else None
    async with RegistryClient(
        request.registry,
        plain_http=request.plain_http,
        credentials=credentials,
        retry=RetryPolicy(attempts=request.request_attempts),
        max_connections=request.max_connections,
    ) as client:
        ref = ImageRef(request.registry, request.repository, digest=request.digest)
        await _check_host_platform(client, ref)
        image = await open_image(client, ref)
        process = await workload_process(client, image)
        workload = await _record(image, process, request)
        profile = build_profile(image, request.label)
        if not profile.chunks:
            raise ProfileSkipped(f"the workload read no file data ({workload})")
        size = sum(image.layers[c.layer].index.chunks[c.chunk].u_size for c in profile.chunks)
        digest = await push_profile(client, image, profile)
    return ProfileOutcome("pushed", request.label, len(profile.chunks), size, digest, workload)


async def _check_host_platform(client: RegistryClient, ref: ImageRef) -> None:
    wanted = host_platform_label()
    top = await client.get_manifest(ref.repository, ref.reference)
    if top.media_type not in oci.INDEX_TYPES:
        return  # a single manifest: its config says (``workload_process``)
    index = oci.ImageIndex.model_validate_json(top.data)
    have = {label for d in index.manifests if d.platform for label in (d.platform.label(), _os_arch(d.platform))}
    if wanted not in have:
        raise ProfileSkipped(f"{ref}: no {wanted} manifest (profiles are recorded for the host's platform only)")


def _os_arch(p: oci.Platform) -> str:
    return f"{p.os}/{p.architecture}"


async def workload_process(client: RegistryClient, image: AcceleratedImage) -> WorkloadProcess:
    """Entrypoint + Cmd, Env, WorkingDir and User of the image's platform manifest's config."""
    repo = image.ref.repository
    manifest = oci.ImageManifest.model_validate_json((await client.get_manifest(repo, image.manifest_digest)).data)
    what = f"{image.ref.registry}/{repo}@{manifest.config.digest}"
    try:
        raw = json.loads(await client.read_blob(repo, manifest.config.digest, MAX_CONFIG))
    except ValueError as e:
        raise ProfileFailed(f"image config {what}: not JSON: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("config") or {}, dict):
        raise ProfileFailed(f"image config {what}: not a JSON object with an object 'config'")
    arch, os_name, host = raw.get("architecture"), raw.get("os"), host_platform_label()
    if arch and os_name and f"{os_name}/{arch}" != host:
        raise ProfileSkipped(f"{what}: the image is {os_name}/{arch}, this host {host}")
    config = raw.get("config") or {}
    args = _strings(config, "Entrypoint", what) + _strings(config, "Cmd", what)
    if not args:
        raise ProfileSkipped(f"image config {what}: no Entrypoint or Cmd to run")
    env = _strings(config, "Env", what)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    cwd = str(config.get("WorkingDir") or "/")
    uid, gid = await resolve_user(image, str(config.get("User") or ""))
    return WorkloadProcess(args, env, cwd if cwd.startswith("/") else "/" + cwd, uid, gid)


def _strings(config: dict[str, Any], key: str, what: str) -> list[str]:
    value = config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileFailed(f"image config {what}: {key} is not a list of strings")
    return list(value)


async def resolve_user(image: AcceleratedImage, user: str) -> tuple[int, int]:
    """``User`` ("uid", "uid:gid", "name", "name:group") as numbers, names looked up in the
    image's /etc/passwd and /etc/group as containerd does (those reads count in the profile);
    a name the image does not list is 0."""
    name, _, group = user.partition(":")
    if not name:
        return 0, 0
    passwd = [] if name.isdigit() and group else await _user_table(image, "/etc/passwd")
    entry = next((e for e in passwd if (e[2] if name.isdigit() else e[0]) == name), None)
    uid = int(name) if name.isdigit() else _number(entry, 2)
    if not group:
        return uid, _number(entry, 3)
    if group.isdigit():
        return uid, int(group)
    groups = await _user_table(image, "/etc/group")
    return uid, _number(next((e for e in groups if e[0] == group), None), 2)


def _number(entry: list[str] | None, field: int) -> int:
    if entry is None or not entry[field].isdigit():
        return 0
    return int(entry[field])


async def _user_table(image: AcceleratedImage, path: str) -> list[list[str]]:
    """The colon-separated lines (with at least 4 fields) of a file of the image, resolved
    inside the image; empty when it has none."""
    try:
        data = await image.read_file(path, 0, MAX_USER_TABLE)
    except (PathError, OSError) as e:
        log.info("%s: %s: %s", image.ref, path, e)
        return []
    lines = (line.split(":") for line in data.decode(errors="replace").splitlines())
    return [fields for fields in lines if len(fields) >= 4]


async def _record(image: AcceleratedImage, process: WorkloadProcess, request: ProfileRequest) -> str:
    """Mount ``image`` lazily, run the workload in the sandbox, take it all down; how the
    workload ended. The image's layer readers now hold the reads."""
    run = RunDirs(Path(request.run_dir))
    run.lazy.mkdir(exist_ok=True)
    try:
        async with image_mount.kernel_mount(image, run.lazy) as m, _sandbox_root(run):
            config = bundle_config(process, run.rootfs, run.container_id, request.memory_limit)
            run.config.write_text(json.dumps(config, indent=1))
            return await _run_workload(m, run, Path(request.runc_root), request.seconds)
    except image_mount.KernelPathUnavailable as e:
        raise ProfileSkipped(f"cannot mount the image lazily here: {e}") from e


@asynccontextmanager
async def _sandbox_root(run: RunDirs) -> AsyncIterator[Path]:
    """The sandbox's root: an overlay of the lazy mount under a small tmpfs upper layer."""
    for path in (run.lazy, run.scratch, run.rootfs):
        if any(c in str(path) for c in ",:"):
            raise ProfileFailed(f"{path}: an overlay cannot use a path with ',' or ':'")
    run.scratch.mkdir(exist_ok=True)
    run.rootfs.mkdir(exist_ok=True)
    try:
        await asyncio.to_thread(_mount_sandbox_root, run)
        yield run.rootfs
    finally:
        await asyncio.to_thread(_unmount_sandbox_root, run)


def _mount_sandbox_root(run: RunDirs) -> None:
    mount("tmpfs", run.scratch, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0700")
    upper, work = run.scratch / "upper", run.scratch / "work"
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={run.lazy},upperdir={upper},workdir={work}"
    mount("overlay", run.rootfs, "overlay", MS_NOSUID | MS_NODEV, options)


def _unmount_sandbox_root(run: RunDirs) -> None:
    for path in (run.rootfs, run.scratch):
        if mount_at(path) is not None:
            umount_or_detach(path)


_NO_EXEC = ["nosuid", "noexec", "nodev"]
SANDBOX_MOUNTS: list[dict[str, Any]] = [  # ``runc spec``'s, without the cgroup file system, plus /tmp and /run
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": [*_NO_EXEC, "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": _NO_EXEC},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*_NO_EXEC, "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]  # fmt: skip
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def bundle_config(process: WorkloadProcess, rootfs: Path, container_id: str, memory_limit: int) -> dict[str, Any]:
    """The OCI runtime configuration of the sandbox (runc's ``runc spec`` defaults, with a
    read-only root, no network but its own loopback, no CAP_NET_BIND_SERVICE, a memory limit)."""
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": process.uid, "gid": process.gid},
            "args": process.args,
            "env": process.env,
            "cwd": process.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "imgaccel-profile",
        "mounts": SANDBOX_MOUNTS,
        "linux": {
            "cgroupsPath": f"/{container_id}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}], "memory": {"limit": memory_limit}},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


async def _run_workload(m: image_mount.KernelMount, run: RunDirs, runc_root: Path, seconds: float) -> str:
    """``runc run`` the bundle for at most ``seconds``; then kill and delete the container."""
    started = time.monotonic()
    with open(run.workload_log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            RUNC, "--root", str(runc_root), "--log", str(run.runc_log), "--log-format", "json",
            "run", "--bundle", str(run.root), run.container_id,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        ended = await _wait_workload(proc, m, seconds, started)
    finally:
        await _stop_container(proc, runc_root, run.container_id)
        _log_output(run.workload_log)
    if error := _runc_error(run.runc_log):
        raise ProfileFailed(f"runc could not run the sandbox {run.container_id}: {error}")
    return ended


async def _wait_workload(proc: asyncio.subprocess.Process, m: image_mount.KernelMount, seconds: float,
                         started: float) -> str:  # fmt: skip
    exited = asyncio.ensure_future(proc.wait())
    stopped = asyncio.ensure_future(m.wait())  # SIGTERM, or the lazy mount went away
    try:
        done, _ = await asyncio.wait({exited, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (exited, stopped):
            task.cancel()
    if exited in done:
        return f"exited with status {exited.result()} after {time.monotonic() - started:.1f} s"
    if stopped in done:
        raise ProfileFailed(f"stopped before the workload ended: {stopped.result()}")
    return f"killed after {seconds:g} s"


async def _stop_container(proc: asyncio.subprocess.Process, runc_root: Path, container_id: str) -> None:
    """SIGKILL everything in the container's PID namespace, reap ``runc run``, delete the
    container and its cgroups."""
    await _runc(runc_root, "kill", container_id, "KILL")  # fails when it has exited: fine
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    await _runc(runc_root, "delete", "--force", container_id)
    await asyncio.to_thread(remove_cgroups, container_id)


async def _runc(runc_root: Path, *args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        RUNC, "--root", str(runc_root), *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("runc %s: no answer in 30 s", " ".join(args))
        return -1
    if proc.returncode:
        log.debug("runc %s: %s", " ".join(args), err.decode(errors="replace").strip())
    return proc.returncode or 0


def _log_output(path: Path, lines: int = 20) -> None:
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            log.info("workload: %s", line[:300])


def _runc_error(path: Path) -> str | None:
    """The first error runc itself logged (not the workload's), if any."""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal"):
                    return str(entry.get("msg", line))[:500]
    return None


# -- the child's main ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the service dies, so the sandbox is taken down."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


async def _child(request: ProfileRequest) -> ProfileOutcome:
    try:
        return await _profile(request)
    except ProfileSkipped as e:
        return ProfileOutcome("skipped", request.label, error=str(e))
    except Exception as e:
        log.debug("profile step failed", exc_info=True)
        return ProfileOutcome("failed", request.label, error=str(e) or type(e).__name__)
    finally:
        await asyncio.to_thread(_clean_quietly, Path(request.run_dir), Path(request.runc_root))


def _child_main() -> int:
    _die_with_parent()
    request = ProfileRequest.model_validate_json(sys.stdin.buffer.read())
    logging.basicConfig(level=request.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    outcome = asyncio.run(_child(request))
    try:
        sys.stdout.write(json.dumps(asdict(outcome)) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the service is gone; the sandbox is down all the same
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
