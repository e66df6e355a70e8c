"""A real PostgreSQL server for the registry's tests: Debian's `postgresql` binaries, a fresh data
folder, loopback only, a free port; stopped (fast shutdown) at the end of the session."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

from tests.serve_fixtures import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or (
        [shutil.which(name)] if shutil.which(name) else []
    )
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (scripts/test.sh does it)")
    return found[-1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres_server():
    """The server's base URL (no database): `postgresql://lorafleet@127.0.0.1:<port>`."""
    folder = tempfile.mkdtemp(prefix="lorafleet-pg-")
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = os.path.join(folder, "data"), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "check": True}
    subprocess.run(
        _as_server_user([_bin("initdb"), "-D", data, "-U", "lorafleet", "--auth=trust", "-E", "UTF8"]), **quiet
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [_bin("pg_ctl"), "-D", data, "-l", os.path.join(folder, "server.log"), "-o", options, "-w"]
    subprocess.run(_as_server_user([*ctl, "start"]), **quiet)
    try:
        yield f"postgresql://lorafleet@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"]), check=False)
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(server_url: str, key: str) -> str:
    """A database of its own for one test (named from `key`), created if missing; its URL."""
    import psycopg

    name = "t" + hashlib.sha1(key.encode()).hexdigest()[:16]
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
