"""The FUSE holder: a tiny long-lived process that owns a mount's ``/dev/fuse`` connection.

A FUSE connection lives as long as one open copy of its ``/dev/fuse`` file does. The holder
opens ``/dev/fuse``, mounts it with mount(2) (``fd=N,rootmode=40000,...``, file system type
``fuse.imgaccel``), never closes the fd, and hands copies to servers over a unix socket
(SCM_RIGHTS). A server (``blob_fs.BlobFS``) can then die — kill -9 included — without the
kernel aborting the connection: readers block, a new server takes a copy from the holder,
writes FUSE_NOTIFY_RESEND, and the requests in flight are answered (see ``fuse_wire``).

Only the holder *and* every server dying together lose the connection. When the holder is
gone but a server still runs, ``attach`` starts a new holder that takes the fd back from that
server with pidfd_getfd(2) (root, or ptrace rights over the server): the server's pid and fd
number are recorded in ``STATE_DIR/server.json`` by every ``attach``. Nothing proves that
recorded fd still belongs to this mount (pids are reused, servers close fds); the holder
checks the fd is a ``/dev/fuse`` file and relies on the state directory being private. When
neither is alive, the mount is dead (ENOTCONN) and ``attach`` detaches it and mounts afresh.

Files in the state directory (mode 0700): ``holder.sock`` (the socket, 0600; only peers with
the holder's uid or root are served), ``holder.lock`` (flock held by the live holder),
``attach.lock`` (serialises ``attach``/``unmount``), ``holder.log``, ``server.json``.

Socket protocol: the client sends one line, ``fd`` or ``stop``; the holder answers one JSON
line — ``{"pid", "mountpoint", "fresh"}`` with a copy of the fd attached for ``fd``
(``fresh`` is true only for the first copy of a connection this holder mounted: the kernel's
INIT request is still to be answered), ``{"pid", "stopping": true}`` for ``stop``.

Run as ``python -m imgaccel.snapshotter.fuse_holder --mountpoint M --state-dir S
--status-fd N [--adopt PID:FD]``; ``attach`` does that, in a new session, and the holder
forks once more so that it is nobody's child (it survives the daemon and is never a zombie).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgaccel.snapshotter.mounts import MS_NODEV, MS_NOSUID, MS_RDONLY, mount, mount_at, umount, umount_or_detach

log = logging.getLogger(__name__)

FSTYPE = "fuse.imgaccel"
"""The file system type shown in mountinfo (``fuse.`` + subtype)."""
SOURCE = "imgaccel"
MAX_READ = 1 << 20
"""The mount's ``max_read``: READ requests up to 1 MiB (the server also negotiates
``max_pages`` = 256 in INIT; the smaller of the two wins)."""
SOCKET_NAME = "holder.sock"
_SYS_PIDFD_GETFD = 438  # same number on x86-64 and arm64 (the unified syscall table)
_REPLY_MAX = 4096
_CLIENT_TIMEOUT = 5.0
_START_TIMEOUT = 30.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Attachment:
    """A server's copy of a mount's ``/dev/fuse`` fd."""

    fd: int
    fresh: bool
    """True: a new mount whose INIT request is still to be answered. False: a resume — the
    kernel is already initialised; write FUSE_NOTIFY_RESEND first."""
    holder_pid: int
    mountpoint: Path


class HolderError(RuntimeError):
    """The holder could not be started or reached."""


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A copy, in this process, of fd ``target_fd`` of process ``pid`` (pidfd_getfd(2))."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd of fd {target_fd} in pid {pid}: {os.strerror(e)}")
        os.set_inheritable(int(fd), False)
        return int(fd)
    finally:
        os.close(pidfd)


# ---------------------------------------------------------------------------------------------
# Client side (the node daemon / the server)


async def attach(mountpoint: str | Path, state_dir: str | Path) -> Attachment:
    """A copy of the mount's fd, mounting it (through a new holder) first if needed.

    Blocking work (starting the holder, mount(2)) runs in a worker thread. The caller owns
    the returned fd; ``STATE_DIR/server.json`` records this process as its user so that a
    future holder can adopt it."""
    return await asyncio.to_thread(_attach, Path(mountpoint), Path(state_dir), True)


async def ensure_holder(mountpoint: str | Path, state_dir: str | Path) -> int:
    """Make sure a holder owns the mount (for a running server that noticed it gone: the new
    holder adopts the fd recorded by this server's ``attach``); its pid."""
    att = await asyncio.to_thread(_attach, Path(mountpoint), Path(state_dir), False)
    os.close(att.fd)
    return att.holder_pid


async def unmount(mountpoint: str | Path, state_dir: str | Path, timeout: float = 10.0) -> None:
    """Unmount the FUSE mount (lazily if busy) and stop its holder. Unmount what is stacked
    on the mount's files (EROFS) first."""
    await asyncio.to_thread(_unmount, Path(mountpoint), Path(state_dir), timeout)


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mountpoint: str | Path) -> bool:
    """Abort the FUSE connection mounted at ``mountpoint`` (through fusectl, mounted if need
    be): every request waiting for a server fails at once. For taking a node down for good:
    without it, unmounting EROFS over a file nobody serves waits forever for its pending
    reads, since the holder keeps the connection open. False when nothing is mounted there."""
    existing = mount_at(mountpoint)
    if existing is None or existing.fstype != FSTYPE:
        return False
    if not any(FUSECTL.iterdir()) and mount_at(FUSECTL) is None:
        mount("none", FUSECTL, "fusectl")
    minor = int(existing.device.split(":")[1])
    (FUSECTL / str(minor) / "abort").write_text("1\n")
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_dirs(mountpoint: Path, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.mkdir(mountpoint)  # (Path.mkdir(exist_ok) stats it: ENOTCONN on a dead FUSE mount)


def _attach(mountpoint: Path, state_dir: Path, record: bool) -> Attachment:
    mountpoint = Path(os.path.abspath(mountpoint))
    _prepare_dirs(mountpoint, state_dir)
    with _locked(state_dir / "attach.lock"):
        got = _ask(state_dir, "fd")
        if got is None:
            _start_holder(mountpoint, state_dir)
            got = _ask(state_dir, "fd")
            if got is None:
                raise HolderError(f"FUSE holder for {mountpoint} started but does not answer on {state_dir}")
        reply, fd = got
        if fd is None or reply.get("mountpoint") != str(mountpoint):
            if fd is not None:
                os.close(fd)
            raise HolderError(f"FUSE holder in {state_dir} serves {reply.get('mountpoint')!r}, not {mountpoint}")
        if record:
            _write_json(state_dir / "server.json", {"pid": os.getpid(), "fd": fd})
        return Attachment(fd, bool(reply["fresh"]), int(str(reply["pid"])), mountpoint)


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _ask(state_dir: Path, command: str) -> tuple[dict[str, object], int | None] | None:
    """Send ``command`` to the holder: (reply, fd or None), or None when no holder listens."""
    path = state_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_CLIENT_TIMEOUT)
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        try:
            s.sendall(command.encode() + b"\n")
            msg, fds, _flags, _addr = socket.recv_fds(s, _REPLY_MAX, 1)
        except (ConnectionResetError, BrokenPipeError):
            return None  # the holder is exiting (its mount went away)
    if not msg:
        for fd in fds:
            os.close(fd)
        return None
    for fd in fds:
        os.set_inheritable(fd, False)
    reply = json.loads(msg)
    if not isinstance(reply, dict):
        raise HolderError(f"FUSE holder in {state_dir} answered {msg[:100]!r}")
    return reply, (fds[0] if fds else None)


def _live_server(state_dir: Path) -> tuple[int, int] | None:
    """(pid, fd) of the server recorded in server.json if it still holds a /dev/fuse fd there."""
    try:
        rec = json.loads((state_dir / "server.json").read_text())
        pid, fd = int(rec["pid"]), int(rec["fd"])
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
            return pid, fd
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _start_holder(mountpoint: Path, state_dir: Path) -> None:
    adopt: tuple[int, int] | None = None
    existing = mount_at(mountpoint)
    if existing is not None:
        if existing.fstype != FSTYPE:
            raise HolderError(f"{mountpoint} already has a {existing.fstype} mount")
        adopt = _live_server(state_dir)
        if adopt is None:
            log.warning("FUSE mount %s has neither a holder nor a live server: detaching the dead mount", mountpoint)
            umount(mountpoint, detach=True)
    args = [sys.executable, "-m", "imgaccel.snapshotter.fuse_holder", "--mountpoint", str(mountpoint)]
    args += ["--state-dir", str(state_dir)]
    if adopt is not None:
        args += ["--adopt", f"{adopt[0]}:{adopt[1]}"]
        log.warning(
            "FUSE holder for %s is gone; a new one adopts fd %d of server pid %d", mountpoint, adopt[1], adopt[0]
        )
    r, w = os.pipe()
    try:
        args += ["--status-fd", str(w)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(state_dir / "holder.log", "ab") as logf:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(w,),
                start_new_session=True,
                cwd="/",
                env=env,
            )
        os.close(w)
        w = -1
        status = _read_status(r, _START_TIMEOUT)
        proc.wait(_START_TIMEOUT)  # the first process exits once its child is in the background
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if not status.startswith("ok"):
        detail = status.strip() or f"exited without a word (see {state_dir / 'holder.log'})"
        raise HolderError(f"FUSE holder for {mountpoint}: {detail}")


def _read_status(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timed out starting"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk


def _unmount(mountpoint: Path, state_dir: Path, timeout: float) -> None:
    mountpoint = Path(os.path.abspath(mountpoint))
    existing = mount_at(mountpoint)
    if existing is not None and existing.fstype == FSTYPE:
        umount_or_detach(mountpoint)
    if not state_dir.is_dir():
        return
    with _locked(state_dir / "attach.lock"):
        got = _ask(state_dir, "stop")
        if got is not None:
            reply, fd = got
            if fd is not None:
                os.close(fd)
            _wait_gone(int(str(reply["pid"])), timeout)
        _wait_holder_lock(state_dir, timeout)


def _wait_holder_lock(state_dir: Path, timeout: float) -> None:
    """Wait until no holder holds ``holder.lock`` (a holder exiting on its own after the
    unmount may not answer ``stop`` any more)."""
    path = state_dir / "holder.lock"
    if not path.exists():
        return
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HolderError(f"FUSE holder of {state_dir} did not exit within {timeout:.0f} s") from None
                time.sleep(0.02)
    finally:
        os.close(fd)


def _wait_gone(pid: int, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            log.error("FUSE holder pid %d did not stop within %.0f s: killing it", pid, timeout)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


# ---------------------------------------------------------------------------------------------
# The holder process


@dataclass
class _Holder:
    mountpoint: Path
    fuse_fd: int
    listener: socket.socket
    fresh: bool

    def serve(self) -> None:
        """Hand out fd copies until told to stop or the connection dies (unmounted)."""
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.fuse_fd, 0)  # only POLLERR/POLLHUP: the connection was aborted
        while True:
            for fd, events in poller.poll():
                if fd == self.fuse_fd and events & (select.POLLERR | select.POLLHUP):
                    log.info("FUSE connection of %s is gone (unmounted or aborted); holder exits", self.mountpoint)
                    return
                if fd == self.listener.fileno() and self._serve_client():
                    return

    def _serve_client(self) -> bool:
        """Answer one client; True when told to stop."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return False
        with conn:
            conn.settimeout(_CLIENT_TIMEOUT)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                uid = int.from_bytes(creds[4:8], sys.byteorder)
                if uid not in (0, os.getuid()):
                    log.warning("refusing FUSE holder client with uid %d", uid)
                    return False
                command = conn.recv(64).strip()
                if command == b"fd":
                    reply = {"pid": os.getpid(), "mountpoint": str(self.mountpoint), "fresh": self.fresh}
                    socket.send_fds(conn, [json.dumps(reply).encode()], [self.fuse_fd])
                    self.fresh = False
                    log.info("handed the FUSE fd of %s to a server", self.mountpoint)
                    return False
                if command == b"stop":
                    conn.sendall(json.dumps({"pid": os.getpid(), "stopping": True}).encode())
                    log.info("FUSE holder of %s told to stop", self.mountpoint)
                    return True
                log.warning("FUSE holder client sent unknown command %r", command[:20])
            except OSError as e:
                log.warning("FUSE holder client failed: %s", e)
        return False


def _open_connection(mountpoint: Path, adopt: str | None) -> tuple[int, bool]:
    """(fuse fd, fresh): adopted from a live server, or a new mount."""
    if adopt:
        pid_s, fd_s = adopt.split(":")
        fd = pidfd_getfd(int(pid_s), int(fd_s))
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target != "/dev/fuse":
            os.close(fd)
            raise HolderError(f"fd {fd_s} of pid {pid_s} is {target}, not /dev/fuse")
        return fd, False
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_READ}"
    mount(SOURCE, mountpoint, FSTYPE, MS_NOSUID | MS_NODEV | MS_RDONLY, opts)
    return fd, True


def _holder_main(mountpoint: Path, state_dir: Path, status_fd: int, adopt: str | None) -> int:
    status = os.fdopen(status_fd, "w")
    try:
        lock_fd = os.open(state_dir / "holder.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HolderError(f"another FUSE holder already runs for {state_dir}") from None
        sock_path = state_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # stale: we hold the lock, so no live holder listens there
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(sock_path))
        os.chmod(sock_path, 0o600)
        listener.listen(16)
        fuse_fd, fresh = _open_connection(mountpoint, adopt)
    except Exception as e:
        status.write(f"error: {e}\n")
        status.close()
        return 1
    if os.fork() != 0:
        os._exit(0)  # the parent's parent waits for this; the child is reparented to init
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info(
        "FUSE holder pid %d owns fd %d of %s (%s)", os.getpid(), fuse_fd, mountpoint, "adopted" if adopt else "mounted"
    )
    status.write(f"ok {os.getpid()}\n")
    status.close()
    try:
        _Holder(mountpoint, fuse_fd, listener, fresh).serve()
    finally:
        with contextlib.suppress(OSError):
            if os.stat(sock_path).st_ino == os.fstat(listener.fileno()).st_ino:
                sock_path.unlink()
        listener.close()
        os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Own a FUSE mount's /dev/fuse fd and hand out copies.")
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--status-fd", required=True, type=int)
    parser.add_argument("--adopt", help="PID:FD of a live server whose fd to take over (pidfd_getfd)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fuse_holder: %(message)s")
    return _holder_main(args.mountpoint, args.state_dir, args.status_fd, args.adopt)


if __name__ == "__main__":
    sys.exit(main())
