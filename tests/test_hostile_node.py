"""Hostile images on the node: broken hardlinks, control characters and undecodable bytes in
names, and a mountpoint left dead by a killed daemon. Real registry, real FUSE mounts."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from imgaccel.cli.mount_commands import mounts_at
from imgaccel.cli.quoting import shell_escape
from imgaccel.formats.layer_index import Entry
from imgaccel.reader.merged_view import BrokenHardlink, MergedView
from tests.helpers import run_cli, sha256
from tests.raw_push import push_image
from tests.registry import Registry

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None and os.geteuid() == 0
needs_fuse = pytest.mark.skipif(not FUSE_OK, reason="needs /dev/fuse, fusermount3 and root")


# --- quoting ---------------------------------------------------------------------------------

QUOTED = {  # what GNU ls --quoting-style=shell-escape prints (coreutils 9, C.UTF-8)
    "plain.txt": "plain.txt",
    "a@b%c+d,e:f": "a@b%c+d,e:f",
    "-x": "-x",
    "x~": "x~",
    "a{b": "a{b",
    "café": "café",
    "a b": "'a b'",
    "~x": "'~x'",
    "{": "'{'",
    "a=b": "'a=b'",
    "a$b": "'a$b'",
    "it's": '"it\'s"',
    "a'b$": "'a'\\''b$'",
    "a\nb": "'a'$'\\n''b'",
    "\nb": "''$'\\n''b'",
    "a\n": "'a'$'\\n'",
    "a\n\tb": "'a'$'\\n\\t''b'",
    "a\x1b[31mred": "'a'$'\\033''[31mred'",
    "\x7f": "''$'\\177'",
    "\udcff": "''$'\\377'",  # the byte 0xff, as surrogateescape decodes it
    "x\udcc3": "'x'$'\\303'",
    "a'b\nc": "'a'\\''b'$'\\n''c'",
    "\n'": "''$'\\n'\\'''",
    "i'\x01": "'''i'\\'''$'\\001'",  # GNU's leading '' (harmless), kept
}


@pytest.mark.parametrize("name", list(QUOTED))
def test_shell_escape(name: str) -> None:
    assert shell_escape(name) == QUOTED[name]


def test_shell_escape_reads_back_in_bash() -> None:
    """What bash makes of the quoted form is the name, byte for byte (coreutils 9.1 prints
    the second one wrongly, as '\\001'\\'''$'\\001')."""
    for name in ["a\nb", "\x01'\x01", "i'\x01", "x\x1b[0m'$`y", "caf\udcff", "it's", "{"]:
        raw = name.encode("utf-8", "surrogateescape")
        out = subprocess.run(["bash", "-c", f"printf %s {shell_escape(name)}"], capture_output=True, check=True)
        assert out.stdout == raw, name


@pytest.mark.skipif(
    subprocess.run(["ls", "--quoting-style=shell-escape", "/"], capture_output=True).returncode != 0,
    reason="GNU ls is not installed",
)
def test_shell_escape_agrees_with_gnu_ls() -> None:
    names = [n.encode("utf-8", "surrogateescape") for n in QUOTED]
    for c in string.punctuation + " \x01\x07\r":
        if c not in "/.":
            names += [f"a{c}b".encode(), f"{c}b".encode(), f"a{c}".encode(), c.encode(), f"i'{c}".encode()]
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory() as d:
        for raw in names:
            p = os.path.join(os.fsencode(d), raw)
            Path(os.fsdecode(p)).touch()
            out = subprocess.run(["ls", "--quoting-style=shell-escape", "-1", d], capture_output=True, env=env)
            os.unlink(p)
            gnu = out.stdout.decode("utf-8", "surrogateescape").rstrip("\n")
            assert shell_escape(raw.decode("utf-8", "surrogateescape")) == gnu, raw


# --- hardlinks in the merged view ------------------------------------------------------------


def _view(*entries: Entry) -> MergedView:
    return MergedView([list(entries)])


def test_hardlink_chains_resolve_and_loops_end() -> None:
    view = _view(
        Entry("d", "dir", mode=0o755),
        Entry("d/file", "reg", size=5, offset=512),
        Entry("d/one", "hardlink", linkname="d/file"),
        Entry("d/two", "hardlink", linkname="./d/../d/one"),  # a link to a link
        Entry("d/self", "hardlink", linkname="d/self"),
        Entry("d/loop-a", "hardlink", linkname="d/loop-b"),
        Entry("d/loop-b", "hardlink", linkname="d/loop-a"),
        Entry("d/to-dir", "hardlink", linkname="d"),
        Entry("d/up", "hardlink", linkname="../../d/file"),
        Entry("d/missing", "hardlink", linkname="nowhere/x"),
        Entry("d/to-loop", "hardlink", linkname="d/loop-a"),
    )
    file = view.find("d/file")
    assert file is not None
    for name in ("one", "two"):
        node = view.find(f"d/{name}")
        assert node is not None and view.data_entry(node) is file.entry
    reasons = {
        "self": "loop",
        "loop-a": "loop",
        "loop-b": "loop",
        "to-loop": "loop",
        "to-dir": "not a regular file",
        "up": "climbs above the root",
        "missing": "not in its layer",
    }
    for name, reason in reasons.items():
        node = view.find(f"d/{name}")
        assert node is not None
        with pytest.raises(BrokenHardlink) as err:
            view.data_entry(node)
        assert reason in str(err.value) and err.value.layer == 0 and err.value.entry is node.entry


def test_long_hardlink_chain_is_cut() -> None:
    chain = [Entry(f"l{i}", "hardlink", linkname=f"l{i + 1}") for i in range(100)]
    view = _view(*chain, Entry("l100", "reg", size=1))
    node = view.find("l0")
    assert node is not None
    with pytest.raises(BrokenHardlink):
        view.data_entry(node)
    short = view.find("l70")
    assert short is not None and view.data_entry(short).name == "l100"


# --- real images -----------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes, str]]) -> bytes:
    """A tar of (name, type, data-or-linkname); names may hold surrogateescape'd bytes."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name, kind, value in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode = kind, 1_700_000_000, 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind == tarfile.REGTYPE:
                data = value.encode("utf-8", "surrogateescape")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.linkname = value
                tf.addfile(ti)
    return buf.getvalue()


def _push(registry: Registry, repo: str, tar: bytes, mode: str = "index") -> str:
    blob = gzip.compress(tar, mtime=0)
    push_image(registry.host, repo, "v1", [(GZ, blob)], [sha256(tar)])
    ref = f"{registry.host}/{repo}:v1"
    r = run_cli("convert", ref, "--mode", mode, "--no-cache")
    assert r.code == 0, r.err
    return ref + ("_accelerated" if mode == "index" else "_containerd_accelerated")


class Mounted:
    """``imgaccel mount --daemon`` at ``where``; on exit unmounted, the daemon gone, and no
    mount of any kind left at ``where`` (dead ones are detached)."""

    def __init__(self, ref: str, where: Path, tmp: Path) -> None:
        self.ref, self.where, self.tmp = ref, where, tmp
        where.mkdir(exist_ok=True)
        self.log = tmp / f"{where.name}.log"
        self.pid_file = tmp / f"{where.name}.pid"
        self.pids: list[int] = []

    def mount(self) -> tuple[int, str]:
        r = run_cli("mount", self.ref, str(self.where), "--daemon", "--no-prefetch", "--fuse-tree", "--cache-dir",
                    str(self.tmp / "cache"), "--log-file", str(self.log), "--pid-file", str(self.pid_file))  # fmt: skip
        if r.code == 0:
            self.pids.append(int(self.pid_file.read_text()))
        return r.code, r.err

    def __enter__(self) -> Mounted:
        code, stderr = self.mount()
        assert code == 0, stderr + (self.log.read_text() if self.log.exists() else "")
        return self

    def __exit__(self, *exc: object) -> None:
        run_cli("umount", str(self.where))
        deadline = time.monotonic() + 20
        for pid in self.pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for _ in range(8):
            if not mounts_at(str(self.where)):
                break
            subprocess.run(["fusermount3", "-u", "-z", str(self.where)], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours (the daemon is forked by the CLI, not by us) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# Looks at the mounted tree from a separate process, with a time limit: a request the
# filesystem never answers must fail the test, not hang it.
_PROBE = """
import json, os, sys
d = sys.argv[1].encode()
out = {"names": sorted(n.decode() for n in os.listdir(d)), "stat": {}, "data": {}}
for n in os.listdir(d):
    p = os.path.join(d, n)
    for attempt in range(2):
        try:
            st = os.lstat(p)
            out["stat"][n.decode()] = [st.st_ino, st.st_size]
            with open(p, "rb") as f:
                out["data"][n.decode()] = f.read().decode()
        except OSError as e:
            out["stat"][n.decode()] = e.errno
print(json.dumps(out))
"""


def _probe(directory: Path) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", _PROBE, str(directory)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


BROKEN = {"missing": "nowhere/x", "self": "d/self", "loop-a": "d/loop-b", "loop-b": "d/loop-a", "to-dir": "d",
          "up": "../../d/ok.txt"}  # fmt: skip


@needs_fuse
@pytest.mark.parametrize("mode", ["index", "full"])
def test_broken_hardlinks_answer_eio_alone(registry: Registry, tmp_path: Path, mode: str) -> None:
    members = [("d", tarfile.DIRTYPE, ""), ("d/ok.txt", tarfile.REGTYPE, "fine\n")]
    members += [(f"d/{name}", tarfile.LNKTYPE, target) for name, target in BROKEN.items()]
    members += [("d/link", tarfile.LNKTYPE, "d/ok.txt"), ("d/chain", tarfile.LNKTYPE, "d/link")]  # link to link
    members += [("d/zz.txt", tarfile.REGTYPE, "last\n")]
    ref = _push(registry, f"hostile/hardlinks-{mode}", _tar(members), mode)
    with Mounted(ref, tmp_path / "mnt", tmp_path) as m:
        seen = _probe(m.where / "d")
        assert seen["names"] == sorted(["ok.txt", "zz.txt", "chain", "link", *BROKEN])
        stats = seen["stat"]
        assert isinstance(stats, dict)
        assert seen["data"] == {"ok.txt": "fine\n", "zz.txt": "last\n", "link": "fine\n", "chain": "fine\n"}
        assert stats["link"][0] == stats["ok.txt"][0] == stats["chain"][0]  # one inode
        for name in BROKEN:
            assert stats[name] == errno.EIO, name
        assert os.stat(m.where / "d/ok.txt").st_nlink == 3
    log = m.log.read_text()
    for name in BROKEN:
        lines = [ln for ln in log.splitlines() if f"entry 'd/{name}'" in ln]
        assert len(lines) == 1, log  # logged once though stat'ed twice
        assert "layer 0 (sha256:" in lines[0] and "answers EIO" in lines[0]
    assert "Traceback" not in log

    r = run_cli("ls", ref, "/d")
    assert r.code == 0 and r.out.split() == sorted(["ok.txt", "zz.txt", "chain", "link", *BROKEN]), r.err
    r = run_cli("ls", "-l", ref, "/d")
    assert r.code == 1 and "Traceback" not in r.err
    sizes = {ln.split()[-1]: ln.split()[-2] for ln in r.out.splitlines()}
    assert sizes == {"ok.txt": "5", "zz.txt": "5", "chain": "5", "link": "5", **{n: "?" for n in BROKEN}}
    errors = r.err.strip().splitlines()
    assert len(errors) == len(BROKEN) and all(ln.startswith("error: /d/") for ln in errors), r.err
    assert "error: /d/missing: hardlink target nowhere/x is not in its layer" in errors
    r = run_cli("cat", ref, "/d/self")
    assert r.code == 1 and "loop" in r.err and len(r.err.strip().splitlines()) == 1


@needs_fuse
def test_undecodable_and_control_names(registry: Registry, tmp_path: Path) -> None:
    """A name with the byte 0xff reaches FUSE as that byte and reads back; ``ls`` escapes it,
    and a newline or ESC in a name, the way GNU ls does. (Needs the index to keep such names:
    conversion fails with a JSON serialization error without that change.)"""
    ff = b"caf\xff.txt".decode("utf-8", "surrogateescape")
    tar = _tar(
        [
            ("d", tarfile.DIRTYPE, ""),
            (f"d/{ff}", tarfile.REGTYPE, "raw byte\n"),
            ("d/evil\n\x1b[2Jname", tarfile.REGTYPE, "control\n"),
            ("d/plain", tarfile.SYMTYPE, ff),
            ("d/hard", tarfile.LNKTYPE, f"d/{ff}"),
        ]
    )
    assert b"d/caf\xff.txt\x00" in tar  # the raw byte is in the tar, not an encoding of it
    ref = _push(registry, "hostile/names", tar)
    with Mounted(ref, tmp_path / "mnt", tmp_path) as m:
        d = os.fsencode(m.where / "d")
        assert sorted(os.listdir(d)) == sorted([b"caf\xff.txt", b"evil\n\x1b[2Jname", b"hard", b"plain"])
        with open(os.path.join(d, b"caf\xff.txt"), "rb") as f:
            assert f.read() == b"raw byte\n"
        assert os.readlink(os.path.join(d, b"plain")) == b"caf\xff.txt"
        with open(os.path.join(d, b"plain"), "rb") as f:
            assert f.read() == b"raw byte\n"
        assert os.stat(os.path.join(d, b"hard")).st_ino == os.stat(os.path.join(d, b"caf\xff.txt")).st_ino
    r = run_cli("ls", ref, "/d")
    assert r.code == 0, r.err
    assert r.raw.split(b"\n")[:-1] == [b"'caf'$'\\377''.txt'", b"'evil'$'\\n\\033''[2Jname'", b"hard", b"plain"]
    r = run_cli("ls", "-l", ref, "/d")
    assert r.code == 0 and r.out.splitlines()[-1].endswith(" plain -> 'caf'$'\\377''.txt'"), r.err
    r = run_cli("cat", ref, f"/d/{ff}")  # argv carries the raw byte
    assert r.code == 0 and r.raw == b"raw byte\n", r.err


@needs_fuse
def test_mount_over_a_dead_mount_replaces_it(registry: Registry, tmp_path: Path) -> None:
    ref = _push(registry, "hostile/dead-mount", _tar([("hello.txt", tarfile.REGTYPE, "hello\n")]))
    with Mounted(ref, tmp_path / "mnt", tmp_path) as m:
        where = str(m.where)
        # A live mount is not stacked on: one line saying what to run.
        code, stderr = m.mount()
        assert code == 1 and "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "already mounted" in lines[0] and f"imgaccel umount {where}" in lines[0]
        assert len(mounts_at(where)) == 1
        # The daemon is killed: the mount stays, dead.
        os.kill(m.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _alive(m.pids[0]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OSError) as err:
            os.statvfs(where)  # (os.stat may still answer from attributes the kernel cached)
        assert err.value.errno == errno.ENOTCONN
        assert len(mounts_at(where)) == 1
        # A new mount detaches the dead one (and says so) instead of stacking on it.
        code, stderr = m.mount()
        assert code == 0, stderr
        assert "daemon is gone" in stderr and "detaching" in stderr
        assert mounts_at(where) == ["fuse.imgaccel"]
        assert (m.where / "hello.txt").read_text() == "hello\n"
    assert mounts_at(where) == []
