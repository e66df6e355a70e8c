"""The registry's database: a SQLite file (the embedded default) or PostgreSQL (clusters: the
registry's replica may restart on any node, and its state must not live on one node's disk).

Both run the same statements: `?` placeholders (rewritten to `%s` for psycopg), upserts with
`INSERT ... ON CONFLICT` and `RETURNING` (SQLite >= 3.35, PostgreSQL). The schema is versioned in
`schema_version` and migrated forward when the database is opened. A PostgreSQL connection that
drops is re-made with backoff; an unreachable server at start is a ConfigError naming the URL
(without its password).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from serve_app.errors import ConfigError, ServiceUnavailableError
from serve_app.platform import replica_logger

logger = replica_logger(__name__)

# Version i + 1 of the schema is MIGRATIONS[i] applied to version i. Never change a shipped step; add one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS adapters (
            name TEXT PRIMARY KEY,
            adapter_id INTEGER NOT NULL UNIQUE,
            path TEXT NOT NULL,
            base_model TEXT NOT NULL,
            rank INTEGER NOT NULL,
            target_modules TEXT NOT NULL,
            version INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ],
    [
        "ALTER TABLE adapters ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE adapters ADD COLUMN preload INTEGER NOT NULL DEFAULT 0",
    ],
    [  # tenant keys (key_store.py): hashed, never deleted (a revoked key's name stays taken)
        """CREATE TABLE IF NOT EXISTS api_keys (
            name TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            key_hint TEXT NOT NULL,
            models TEXT NOT NULL,
            can_register INTEGER NOT NULL,
            requests_per_minute INTEGER,
            tokens_per_minute INTEGER,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION
        )""",
    ],
    ["ALTER TABLE adapters ADD COLUMN checksum TEXT"],  # adapters from object stores (remote_sources.py)
]
CONNECT_ATTEMPTS = 6  # with backoff 0.25, 0.5, 1, 2, 4 s: about 8 s before giving up
OPERATION_ATTEMPTS = 3


class Database:
    """One connection, its dialect, transactions and migrations."""

    def __init__(self, url: str):
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.lock = threading.RLock()  # one connection: the registry's loop and its registration thread take turns
        self.conn = self._connect()
        self.migrate()

    @classmethod
    def for_state_dir(cls, database_url: str | None, state_dir: Path) -> Database:
        """`database_url`, or the embedded SQLite file `<state_dir>/registry.sqlite`."""
        return cls(database_url or f"sqlite:///{state_dir / 'registry.sqlite'}")

    def _connect(self):
        if not self.postgres:
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            return conn
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "registry.database_url is a PostgreSQL URL, and psycopg is not installed: "
                "pip install 'lorafleet[postgres]'"
            ) from None
        delay = 0.25
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as e:
                if attempt == CONNECT_ATTEMPTS:
                    raise ConfigError(
                        f"the registry's database {redacted(self.url)} is unreachable after {attempt} attempts: "
                        f"{str(e).strip().splitlines()[0]}. Check registry.database_url and that the server runs."
                    ) from None
                logger.warning("registry database %s unreachable, retrying in %.2f s", redacted(self.url), delay)
                time.sleep(delay)
                delay *= 2

    def run(self, operation: Callable[[], object]):
        """Run `operation` (its statements, in a transaction where it opens one); on PostgreSQL a
        dropped connection is re-made and the operation run again (every store operation is safe to
        repeat: a repeated registration gets one more id)."""
        with self.lock:
            return self._run(operation)

    def _run(self, operation: Callable[[], object]):
        if not self.postgres:
            return operation()
        import psycopg

        for attempt in range(1, OPERATION_ATTEMPTS + 1):
            try:
                return operation()
            except psycopg.OperationalError as e:
                if attempt == OPERATION_ATTEMPTS:
                    raise ServiceUnavailableError(
                        f"the registry's database is unavailable: {str(e).strip().splitlines()[0]}"
                    ) from None
                logger.warning("registry database connection lost (%s); reconnecting", e)
                with contextlib.suppress(Exception):
                    self.conn.close()
                try:
                    self.conn = self._connect()
                except ConfigError as unreachable:
                    raise ServiceUnavailableError(unreachable.message) from None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        cursor = self.conn.execute(sql.replace("?", "%s") if self.postgres else sql, params)
        return cursor.fetchall() if cursor.description else []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Committed when the block ends (before the caller acknowledges anything), rolled back on error."""
        if self.postgres:
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def migrate(self) -> None:
        with self.transaction():
            self.query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = self.query("SELECT version FROM schema_version")
            version = rows[0][0] if rows else self._version_before_versioning()
            if not rows:
                self.query("INSERT INTO schema_version VALUES (?)", (version,))
                if version:  # a file of before: any table it lacks, and an id counter past its ids
                    for statement in MIGRATIONS[0]:
                        self.query(statement)
                    if not self.query("SELECT 1 FROM counters WHERE key = 'adapter_id'"):
                        top = self.query("SELECT COALESCE(MAX(adapter_id), 0) FROM adapters")[0][0]
                        self.query("INSERT INTO counters VALUES ('adapter_id', ?)", (top,))
            for step in MIGRATIONS[version:]:
                for statement in step:
                    self.query(statement)
            if version < len(MIGRATIONS):
                self.query("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
                logger.info("registry database %s: schema %d -> %d", redacted(self.url), version, len(MIGRATIONS))

    def _version_before_versioning(self) -> int:
        """SQLite files of lorafleet before `schema_version`: 0 (new), 1 (adapters) or 2 (pinned/preload)."""
        if self.postgres:
            return 0
        columns = {row[1] for row in self.query("PRAGMA table_info(adapters)")}
        return 0 if not columns else 2 if "pinned" in columns else 1

    def integrity_ok(self) -> bool:
        if self.postgres:
            return self.query("SELECT 1") == [(1,)]
        return self.query("PRAGMA integrity_check")[0][0] == "ok"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
