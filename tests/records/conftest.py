"""Fixtures for the call-records tests: every store test runs on SQLite and on PostgreSQL.

PostgreSQL is a real server the suite starts itself (session scope): a
throw-away cluster made with ``initdb`` in a temp dir, listening on
127.0.0.1 at a free port, stopped and deleted at the end.  ``initdb`` refuses
to run as root, so as root the cluster belongs to the ``postgres`` user
(else ``nobody``) and the commands run through ``runuser``.  The binaries
are looked up on PATH, then in ``/usr/lib/postgresql/<version>/bin``
(Debian's ``postgresql`` package); without them the PostgreSQL variants are
skipped with that reason.  Each test gets its own fresh database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mediaserver.config import Settings

BACKENDS = ("sqlite", "postgres")


def _pg_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    port: int
    user: str = "postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())  # a composed statement, not a literal: psycopg wants bytes or sql.SQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; on Debian: apt-get install -y postgresql")
    owner: str | None = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            owner = name
            break
        if owner is None:
            pytest.skip("running as root and no unprivileged user (postgres, nobody) to run initdb as")
    root = Path(tempfile.mkdtemp(prefix="mediaserver-pg-"))
    data = root / "data"
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(root, entry.pw_uid, entry.pw_gid)

    def run(*argv: str) -> None:
        command = [str(bin_dir / argv[0]), *argv[1:]]
        if owner is not None:
            command = ["runuser", "-u", owner, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=root)

    port = _free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.decode()} {log}") from exc
    try:
        yield PostgresServer(port)
    finally:
        try:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def records_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Settings]]:
    """``make(**changes)``: Settings for a test server whose records go to this test's own database."""
    database_url: str | None = None
    if backend == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = "t_" + uuid.uuid4().hex[:16]
        server.admin(f"CREATE DATABASE {name}")
        database_url = server.url(name)

    def make(**changes: Any) -> Settings:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "provider": "echo",
            "drain_s": 0.5,
            "data_dir": str(tmp_path / "data"),
            "database_url": database_url,
        }
        values.update(changes)
        return Settings(**values)  # not validated: port 0 is for tests

    yield make
    if database_url is not None:
        server.admin(f"DROP DATABASE {name} WITH (FORCE)")
