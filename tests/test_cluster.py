"""The cluster database on a real PostgreSQL the tests start themselves:
config, ``floatd cluster init`` (idempotent, also when nodes race), and the
cluster fingerprint that entitlements for a cluster name."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psycopg
import pytest
from conftest import write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import free_port
from pg import fresh_database
from test_integration import floatd_cli

from floatd.config import load_config
from floatd.errors import ConfigError
from floatd.store import cluster


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    """The run's PostgreSQL (conftest.pg_dsn); each test makes its own database."""
    return pg_dsn


def node_config(tmp_path: Path, key: Ed25519PrivateKey, **state: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, key, state__backend="postgresql", **state)


def test_the_config_needs_a_dsn_for_postgresql(tmp_path: Path) -> None:
    path = tmp_path / "floatd.toml"
    path.write_text('[state]\nbackend = "postgresql"\n')
    with pytest.raises(ConfigError, match=r"state\.dsn"):
        load_config(path, env={})
    path.write_text('[state]\nbackend = "postgresql"\ndsn = "x"\ndsn_file = "/y"\n')
    with pytest.raises(ConfigError, match="not both"):
        load_config(path, env={})
    path.write_text('[state]\nbackend = "mysql"\n')
    with pytest.raises(ConfigError, match=r"state\.backend"):
        load_config(path, env={})
    path.write_text('[cluster]\nnode = "n1"\n')
    assert load_config(path, env={}).state_backend == "sqlite"  # the default, unchanged


def test_cluster_init_is_idempotent_and_names_the_cluster(
    dsn: str, tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    url = fresh_database(dsn, "init_twice")
    secret = tmp_path / "dsn.txt"
    secret.write_text(url + "\n")
    config = node_config(tmp_path, vendor_key, state__dsn_file=str(secret))
    before = floatd_cli("fingerprint", "--config", str(config))
    assert before.returncode == 1 and "cluster init" in before.stderr  # not set up yet
    first = floatd_cli("cluster", "init", "--config", str(config))
    assert first.returncode == 0, first.stderr
    again = floatd_cli("cluster", "init", "--config", str(config))
    assert again.stdout == first.stdout  # the same cluster, the same id
    shown = floatd_cli("fingerprint", "--config", str(config)).stdout.strip()
    assert first.stdout.strip().endswith(shown)
    with psycopg.connect(url) as conn:
        system, database, cluster_id = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()), current_database(),"
            " (SELECT value FROM floatd_meta WHERE key = 'cluster_id')"
        ).fetchone()  # type: ignore[misc]
        versions = conn.execute("SELECT version FROM floatd_schema").fetchall()
    recipe = f"floatd-cluster-v1:{system}:{database}:{cluster_id}"
    assert shown == hashlib.sha256(recipe.encode()).hexdigest()[:32]
    assert len(cluster_id) == 32 and versions == [
        (n,) for n in range(1, len(cluster.MIGRATIONS) + 1)
    ]
    # Another database on the same PostgreSQL is another cluster.
    other = node_config(tmp_path / "b", vendor_key, state__dsn=fresh_database(dsn, "other"))
    other_fp = floatd_cli("cluster", "init", "--config", str(other)).stdout.strip()
    assert not other_fp.endswith(shown)


def test_nodes_initialising_at_once_make_one_cluster(dsn: str) -> None:
    url = fresh_database(dsn, "racing")
    ids: list[str] = []

    def node() -> None:
        conn = cluster.connect(url)
        try:
            ids.append(cluster.init(conn))
        finally:
            conn.close()

    threads = [threading.Thread(target=node) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == 6 and len(set(ids)) == 1


def test_an_unreachable_database_is_one_line_exit_1(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    url = f"postgresql://floatd@127.0.0.1:{free_port()}/postgres"
    config = node_config(tmp_path, vendor_key, state__dsn=url)
    done = floatd_cli("cluster", "init", "--config", str(config))
    assert done.returncode == 1 and "cannot reach the cluster database" in done.stderr
    assert done.stderr.count("\n") == 1
    served = floatd_cli("serve", "--config", str(config))  # a node cannot serve without it
    assert served.returncode == 1 and "cannot reach the cluster database" in served.stderr
    (tmp_path / "single").mkdir()
    single = write_config(tmp_path / "single", vendor_key)
    no_cluster = floatd_cli("cluster", "init", "--config", str(single))
    assert no_cluster.returncode == 2 and "no cluster" in no_cluster.stderr
