"""The registry's PostgreSQL database beyond the rules both databases share (test_registry_rules.py):
reconnecting after the server ends the connection, and a clear error when it cannot be reached."""

import psycopg
import pytest

from lora_registry import database
from lora_registry.adapter_store import AdapterStore
from lora_registry.registry import LoraRegistry
from serve_app.errors import ConfigError
from tests.postgres_server import fresh_database
from tests.serve_fixtures import free_port
from tests.unit.test_registry_rules import BASE


def test_a_dropped_database_connection_is_made_again(tmp_path, postgres_server):
    database_url = fresh_database(postgres_server, str(tmp_path))
    store = AdapterStore(database=database.Database(database_url))
    first = store.put("a", "/x", "tiny-chat", 4, ("q_proj",))
    pid = store.db.conn.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as admin:  # the server ends the registry's connection
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    second = store.put("b", "/y", "tiny-chat", 4, ("q_proj",))  # reconnects, then commits
    assert store.db.conn.info.backend_pid != pid and second.adapter_id == first.adapter_id + 1
    assert list(AdapterStore(database=database.Database(database_url)).all()) == ["a", "b"]


def test_an_unreachable_database_is_a_clear_error_without_the_password(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "CONNECT_ATTEMPTS", 2)
    port = free_port()  # nothing listens there
    url = f"postgresql://reg:s3cret@127.0.0.1:{port}/registry"
    with pytest.raises(ConfigError, match=rf"postgresql://reg:\*\*\*@127.0.0.1:{port}/registry is unreachable") as e:
        LoraRegistry(str(tmp_path / "state"), [BASE], [], {}, url)
    assert "s3cret" not in str(e.value)
