"""A real PostgreSQL server for tests: initdb into a temporary folder, started on a free loopback
port, stopped at the end of the session.

Use it by importing the fixtures into a test module or a conftest:

    from tests.postgres import postgres_database_url, postgres_url  # noqa: F401  (fixtures)

`postgres_url` is one database for the session; `postgres_database_url` is a fresh, empty database
per test (dropped afterwards). DIFFMESH_TEST_POSTGRES_URL points both at an existing server instead
(a CI service container). PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` user, else `nobody` (via runuser). Where the binaries are missing or the server cannot
start, the tests that need it skip with the exact reason printed.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from diffmesh.mesh import free_port
from tests.tools import skip

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
EXISTING_SERVER_ENV = "DIFFMESH_TEST_POSTGRES_URL"
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


class PostgresUnavailable(Exception):
    """Why no server could be had (the skip reason)."""


def find_binaries() -> Path:
    candidates = ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for folder in candidates:
        if all((Path(folder) / name).exists() for name in SERVER_BINARIES):
            return Path(folder)
    raise PostgresUnavailable(f"PostgreSQL server binaries ({', '.join(SERVER_BINARIES)}) not found in "
                              f"{', '.join(candidates)}")


def server_user() -> str | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root (PostgreSQL refuses to) and runuser is missing")
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root (PostgreSQL refuses to) and no 'postgres' or 'nobody' user exists")


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@dataclass
class PostgresServer:
    """initdb + pg_ctl start in a temporary folder; `stop()` removes everything."""

    binaries: Path
    user: str | None
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="diffmesh-pg-")))
    port: int = 0
    start_seconds: float = 0.0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        began = time.monotonic()
        if self.user is not None:
            # The server user must own its data and socket folder; mkdtemp made it root's, mode 0700.
            shutil.chown(self.root, self.user)
        init = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--no-sync", "--no-instructions")
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip()[-600:]}")
        failure = ""
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            # Test data needs no durability: fsync off makes startup and every commit faster.
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                           "synchronous_commit = off\nfull_page_writes = off\n")
            started = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
            if started.returncode == 0:
                self._wait_until_accepting(deadline=time.monotonic() + 30)
                self.start_seconds = time.monotonic() - began
                return
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            failure = f"pg_ctl start failed ({started.returncode}): {started.stderr.strip()[-300:]} log: {log[-600:]}"
        raise PostgresUnavailable(failure)

    def _wait_until_accepting(self, deadline: float) -> None:
        import psycopg

        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"server started but refuses connections: {exc}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server `server_url` reaches; returns its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of the `postgres` database of a server this session started (or DIFFMESH_TEST_POSTGRES_URL)."""
    existing = os.environ.get(EXISTING_SERVER_ENV)
    if existing:
        yield existing
        return
    try:
        server = PostgresServer(find_binaries(), server_user())
    except PostgresUnavailable as exc:
        skip(str(exc))
    try:
        server.start()
    except (PostgresUnavailable, subprocess.TimeoutExpired, OSError) as exc:
        server.stop()
        skip(f"PostgreSQL could not start: {exc}")
    print(f"PostgreSQL started on 127.0.0.1:{server.port} in {server.start_seconds:.2f} s")
    try:
        yield server.url()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """One database shared by the whole session (tests sharing it must not assume it is empty)."""
    name = f"diffmesh_test_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_server_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_server_url, name)


@pytest.fixture
def postgres_database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    name = f"diffmesh_test_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_server_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_server_url, name)
