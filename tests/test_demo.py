"""`bemi-asgi demo` as a user runs it: a subprocess serving real HTTP, stopped by a signal, leaving nothing behind."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest

from bemi_asgi.ops.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
READY = "Press Ctrl-C to stop"
SEEDED_STEP = "seeded "  # the stderr step line printed just before the instructions
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """Live PostgreSQL server processes started on `pgdata` (the postmaster's command line names it)."""
    found = []
    for process in psutil.process_iter():
        try:
            args = process.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if args and Path(args[0]).name == "postgres" and str(pgdata) in args:
            found.append(process)
    return found


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Demo:
    """A `bemi-asgi demo` subprocess whose stdout and stderr are collected as they come."""

    def __init__(self, port: int, data_dir: Path) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bemi_asgi", "demo", "--port", str(port), "--data-dir", str(data_dir)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        self.readers: list[threading.Thread] = []
        for stream, sink in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            assert stream is not None
            reader = threading.Thread(target=self._collect, args=(stream, sink), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _collect(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self.lines.put(line)

    def drain(self) -> None:
        """Wait until the readers have collected everything the exited process wrote."""
        for reader in self.readers:
            reader.join(10)

    def output(self) -> str:
        return "".join(self.stderr) + "".join(self.stdout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the demo printed its instructions (it is seeded and serving) and its step lines up to the
        seeding have been read too: stdout and stderr are read by two threads, so the instructions on stdout can
        arrive before the step lines written earlier to stderr."""
        deadline = time.monotonic() + timeout
        while READY not in "".join(self.stdout) or SEEDED_STEP not in "".join(self.stderr):
            if self.process.poll() is not None:
                self.drain()
                pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the demo was not ready within {timeout} s:\n{self.output()}")
            with contextlib.suppress(queue.Empty):
                self.lines.get(timeout=0.2)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30) -> int:
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the demo did not stop within {timeout} s of signal {signum}:\n{self.output()}")
        self.drain()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-demo-test-"))
    base.chmod(0o755)  # under root the server runs as another user, which must reach the data directory
    try:
        yield base / "demo"
    finally:
        for process in postgres_processes(base / "demo" / "pgdata"):  # only after a failed test
            process.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    try:
        yield started
    finally:
        for demo in started:
            demo.kill()


def start(demos: list[Demo], data_dir: Path, port: int | None = None) -> Demo:
    demo = Demo(port or free_port(), data_dir)
    demos.append(demo)
    return demo


def test_demo_serves_the_example_with_history_and_stops_cleanly(data_dir: Path, demos: list[Demo]) -> None:
    """Changes made through the demo's API by two users show in the history (and the change browser) with each
    user's context; SIGINT exits 0 and leaves no PostgreSQL server running on the demo's data directory."""
    demo = start(demos, data_dir)
    demo.wait_ready()
    assert f"curl {demo.base}/todos/" in "".join(demo.stdout)
    assert "-H 'X-User: alice'" in "".join(demo.stdout)
    for url in (f"{demo.base}/bemi/overview", f"{demo.base}/docs", f"{demo.base}/api/history/changes"):
        assert url in "".join(demo.stdout)
    for step in ("starting PostgreSQL", "applying the migration", "worker running", "seeded 8 changes"):
        assert step in "".join(demo.stderr), demo.output()
    assert postgres_processes(data_dir / "pgdata"), demo.output()

    with httpx.Client(base_url=demo.base, trust_env=False, timeout=30) as client:
        created = client.post("/todos", json={"title": "Water the plants"}, headers={"X-User": "carol"})
        assert created.status_code == 201, created.text
        todo_id = created.json()["id"]
        headers = {"X-User": "dave", "X-Request-ID": "req-42", "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
        updated = client.patch(f"/todos/{todo_id}", json={"done": True}, headers=headers)
        assert updated.status_code == 200, updated.text
        history = client.get(f"/todos/{todo_id}/history").json()
        traced = client.get(f"/traces/{TRACE}/changes").json()
        seeded = client.get("/changes", params={"limit": 100}).json()
        browser = client.get("/bemi/")
        overview = client.get("/bemi/overview")
        api = client.get("/api/history/changes", params={"table": "todos", "limit": 100})
    assert browser.status_code == 200, browser.text
    assert "req-42" in browser.text  # the change browser lists the request's change
    assert '<svg id="chart"' in overview.text
    assert '<rect class="bar op-CREATE"' in overview.text  # the seeded changes were made in the last 24 hours
    assert {change["ref"] for change in api.json()["changes"]} == {str(change["id"]) for change in seeded}

    assert [(change["operation"], change["context"]["user"]) for change in history] == [
        ("CREATE", "carol"),
        ("UPDATE", "dave"),
    ], demo.output()
    context = dict(history[1]["context"])
    assert context.pop("trace_id") == TRACE  # the caller's trace, continued by the request's span if any
    assert re.fullmatch("[0-9a-f]{16}", context.pop("span_id"))
    assert context == {"user": "dave", "endpoint": f"PATCH /todos/{todo_id}", "request_id": "req-42"}
    assert [change["id"] for change in traced] == [history[1]["id"]]
    assert history[1]["diff"] == {
        "done": {"before": False, "after": True},
        "updated_at": {"before": history[0]["after"]["updated_at"], "after": history[1]["after"]["updated_at"]},
    }
    users = {change["context"].get("user") or change["context"].get("job") for change in seeded}
    assert users == {"alice", "bob", "purge_done", "carol", "dave"}

    assert demo.stop(signal.SIGINT) == 0, demo.output()
    assert postgres_processes(data_dir / "pgdata") == [], demo.output()


def test_demo_second_run_replaces_a_killed_run_and_busy_port_fails_first(data_dir: Path, demos: list[Demo]) -> None:
    """A run on the data directory of a killed run (its PostgreSQL still running) stops that server and starts
    afresh; a busy HTTP port fails with a clear error and a non-zero exit before PostgreSQL starts."""
    first = start(demos, data_dir)
    first.wait_ready()
    first.kill()  # SIGKILL: no cleanup at all
    leftover = postgres_processes(data_dir / "pgdata")
    assert leftover  # the killed run's server is still there, with its postmaster.pid

    second = start(demos, data_dir)
    second.wait_ready()
    assert "a previous run left running" in "".join(second.stderr), second.output()
    assert not any(running(process) for process in leftover)
    with httpx.Client(base_url=second.base, trust_env=False, timeout=30) as client:
        todos = client.get("/todos").json()
    assert [todo["title"] for todo in todos] == ["Write the Q3 report"]  # the seed alone: the cluster is new
    assert second.stop(signal.SIGTERM) == 0, second.output()
    assert postgres_processes(data_dir / "pgdata") == [], second.output()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fresh = data_dir.parent / "fresh"
        third = start(demos, fresh, port)
        code = third.process.wait(30)
    third.drain()
    assert code == 1, third.output()
    assert f"port {port} on 127.0.0.1 is already in use" in "".join(third.stderr)
    assert "--port" in "".join(third.stderr)
    assert "starting PostgreSQL" not in third.output()
    assert not fresh.exists()
