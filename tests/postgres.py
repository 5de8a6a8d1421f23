"""A real PostgreSQL for tests: Debian's server binaries, one cluster of its own on a free
127.0.0.1 port, run as the unprivileged ``postgres`` user (initdb refuses root), stopped and
started again by tests that need an outage.

The cluster lives in a directory of its own under /tmp (the ``postgres`` user cannot enter
pytest's root-only temporary directories); ``workdir/cluster`` links to it, and ``remove()``
stops the server and deletes it (also done at the exit of the Python process that started it,
so a cluster never outlives its tests).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.registry import free_port

USER = "postgres"  # created by Debian's postgresql package
PASSWORD = "imgaccel-test-password"  # of both the superuser and the ``imgaccel`` role
DATABASE = "imgaccel"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def missing() -> str:
    """Why a PostgreSQL cluster cannot be run here ("" when it can)."""
    if _bindir() is None:
        return "PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are missing: scripts/install installs them"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER!r} user to run PostgreSQL as"
    if os.geteuid() != 0:
        return "not root: cannot run PostgreSQL as its own user"
    if shutil.which("runuser") is None:
        return "no runuser (util-linux) to run PostgreSQL as its own user"
    return ""


@dataclass
class Postgres:
    root: Path  # the cluster's directory (owned by USER): data/, the socket, postgres.log
    port: int
    bindir: Path
    durable: bool = False  # fsync on (as in production); off by default: tests do not need it

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return self.url_of(DATABASE)

    def url_of(self, database: str) -> str:
        return f"postgresql://imgaccel@127.0.0.1:{self.port}/{database}"

    def _as_user(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["runuser", "-u", USER, "--", *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PGPASSWORD": PASSWORD}, stdin=subprocess.DEVNULL)  # fmt: skip
        if check and r.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
            )
        return r

    def start(self) -> None:
        self._as_user(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log), "-o",
                      f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                      f"-c fsync={'on' if self.durable else 'off'}", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_user(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                      check=False)  # fmt: skip

    def running(self) -> bool:
        return self._as_user(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def remove(self) -> None:
        """Stop the server (immediately) and delete the cluster."""
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run ``sql`` as the superuser over the Unix socket; its output (unaligned, tuples only)."""
        r = self._as_user(str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p",
                          str(self.port), "-U", USER, "-d", database, "-At", "-c", sql, timeout=60)  # fmt: skip
        return r.stdout

    def create_database(self, name: str) -> str:
        """A new empty database owned by ``imgaccel``; its URL."""
        self.psql(f'CREATE DATABASE "{name}" OWNER imgaccel', database="postgres")
        return self.url_of(name)


def start_postgres(workdir: Path, durable: bool = False) -> Postgres:
    """A new cluster with a database ``imgaccel`` owned by the password user ``imgaccel``
    (``durable``: with fsync, as a production server commits)."""
    bindir = _bindir()
    assert bindir is not None, missing()
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="imgaccel-pg-", dir="/tmp"))  # /tmp: reachable by USER
    try:
        shutil.chown(root, USER, USER)
        os.chmod(root, 0o700)
        link = workdir / "cluster"
        link.unlink(missing_ok=True)
        link.symlink_to(root)
        pg = Postgres(root, free_port(), bindir, durable)
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        shutil.chown(pwfile, USER, USER)
        pg._as_user(str(bindir / "initdb"), "-D", str(pg.data), "-U", USER, "-A", "scram-sha-256", "--pwfile",
                    str(pwfile), "-E", "UTF8", "--no-sync")  # fmt: skip
        pg.start()
        pg.psql(f"CREATE ROLE imgaccel LOGIN PASSWORD '{PASSWORD}'", database="postgres")
        pg.psql(f"CREATE DATABASE {DATABASE} OWNER imgaccel", database="postgres")
        deadline = time.monotonic() + 10
        while True:  # ready for password logins over TCP
            r = pg._as_user(str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg.port), check=False)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        atexit.register(pg.remove)
    except BaseException:
        Postgres(root, 0, bindir).remove()
        raise
    return pg
