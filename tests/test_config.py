"""Config loading: defaults, validation naming the key, env and CLI overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from floatd.config import SCHEMA, Config, load_config
from floatd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "floatd.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, ""), env={})
    assert c.listen == (("0.0.0.0", 7411),) and c.status_listen == ("127.0.0.1", 7412)
    assert c.idle_timeout == 120 and c.max_connections == 10000
    assert c.default_duration == 900 and c.allowed_clock_offset == 60
    assert c.authority_refresh_interval == 3600 and c.log_format == "json"
    assert str(c.state_dir) == "/var/lib/floatd" and str(c.admin_socket) == "/run/floatd/admin.sock"


def test_example_config_holds_every_key_with_its_default() -> None:
    raw = tomllib.loads((REPO / "config" / "floatd.toml").read_text())
    for section, keys in SCHEMA.items():
        assert set(raw[section]) == set(keys), section
    example = load_config(REPO / "config" / "floatd.toml", env={})
    assert example.listen == Config().listen and example.vendor_keys == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nlisten = '0.0.0.0:7411'", "server.listen"),
        ("[server]\nlisten = ['7411']", "server.listen"),
        ("[server]\nlisten = ['0.0.0.0:99999']", "server.listen"),
        ("[server]\nlisten = ['example.com:7411']", "server.listen"),
        ("[server]\nidle_timeout = 0", "server.idle_timeout"),
        ("[server]\nidle_timeout = 'long'", "server.idle_timeout"),
        ("[server]\nmax_connections = 1.5", "server.max_connections"),
        ("[server]\nmax_connections = true", "server.max_connections"),
        ("[server]\nclient_tokens = 'x'", "server.client_tokens"),
        ("[server]\ntls_cert = '/x.pem'", "server.tls_key"),
        ("[server]\nbogus = 1", "server.bogus"),
        ("[nonsense]\nx = 1", "nonsense"),
        ("[status]\nlisten = 'nowhere'", "status.listen"),
        ("[state]\ndir = ''", "state.dir"),
        ("[entitlement]\nvendor_keys = ['ed25519:AAAA']", "entitlement.vendor_keys"),
        ("[authority]\nurl = 'ftp://x'", "authority.url"),
        ("[authority]\nrefresh_interval = 0", "authority.refresh_interval"),
        ("[leases]\ndefault_duration = 0", "leases.default_duration"),
        ("[leases]\nallowed_clock_offset = -1", "leases.allowed_clock_offset"),
        ("[log]\nlevel = 'loud'", "log.level"),
        ("[log]\nformat = 'xml'", "log.format"),
        ("server = 5", "server"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    assert err.value.key == key
    assert err.value.message.startswith(key + ":")


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", env={})


def test_env_overrides_file_and_cli_overrides_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nidle_timeout = 50\n[log]\nlevel = 'info'\n")
    env = {
        "FLOATD_SERVER_IDLE_TIMEOUT": "60",
        "FLOATD_SERVER_LISTEN": "127.0.0.1:1, [::1]:2",
        "FLOATD_LOG_LEVEL": "debug",
        "FLOATD_SERVER_CLIENT_TOKENS": '["a", "b"]',
        "FLOATD_STATE_DIR": "/tmp/x",
        "FLOATD_UNRELATED": "ignored",
    }
    c = load_config(path, env=env)
    assert c.idle_timeout == 60 and c.log_level == "debug" and str(c.state_dir) == "/tmp/x"
    assert c.listen == (("127.0.0.1", 1), ("::1", 2)) and c.client_tokens == ("a", "b")
    c = load_config(path, env=env, overrides={"log.level": "error"})
    assert c.log_level == "error"
    # A mistyped override of a real section is refused, naming the variable.
    with pytest.raises(ConfigError, match="FLOATD_SERVER_IDEL_TIMEOUT"):
        load_config(path, env={**env, "FLOATD_SERVER_IDEL_TIMEOUT": "60"})
    # floatd-authority's own variables are not overrides of [authority].
    assert load_config(path, env={**env, "FLOATD_AUTHORITY_DB": "/x"}).log_level == "debug"
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"FLOATD_SERVER_IDLE_TIMEOUT": "soon"})
    assert err.value.key == "server.idle_timeout"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nidle_timeout = 7\n")
    assert load_config(None, env={"FLOATD_CONFIG": str(path)}).idle_timeout == 7
