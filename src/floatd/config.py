"""Config: the TOML file, ``FLOATD_<SECTION>_<KEY>`` overrides, then CLI options.

One schema table drives parsing, validation and the env-var names, so a key
cannot be accepted in one place and forgotten in another.  Every problem is
reported as a :class:`ConfigError` naming ``section.key``; the CLI turns that
into one line and exit status 2.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floatd.core.entitlement import parse_public_key
from floatd.core.policy import Policy
from floatd.core.policy_file import load_policy
from floatd.errors import ConfigError, PolicyError

DEFAULT_PATH = Path("/etc/floatd/floatd.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; the host must be a literal address."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(key, f"{text!r} is not host:port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(key, f"{host!r} is not an IP address") from None
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(key, f"port {number} is out of range")
    return host, number


@dataclass(frozen=True)
class Config:
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 7411),)
    machine_id_file: Path = Path("/etc/machine-id")
    idle_timeout: float = 120.0
    max_connections: int = 10000
    client_tokens: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    status_listen: tuple[str, int] | None = ("127.0.0.1", 7412)
    status_tls_cert: str = ""
    status_tls_key: str = ""
    admin_socket: Path | None = Path("/run/floatd/admin.sock")
    state_dir: Path = Path("/var/lib/floatd")
    #: Where the shared state lives: "sqlite" (the state dir) or "postgresql".
    state_backend: str = "sqlite"
    state_dsn: str = ""
    state_dsn_file: Path | None = None
    #: This node's name in a cluster; "" = the host name.
    cluster_node: str = ""
    vendor_keys: tuple[str, ...] = ()
    authority_url: str = ""
    authority_license_key: str = ""
    authority_refresh_interval: float = 3600.0
    authority_ca_bundle: str = ""
    authority_proxy: str = ""
    authority_timeout: float = 10.0
    default_duration: int = 900
    allowed_clock_offset: float = 60.0
    log_level: str = "info"
    log_format: str = "json"
    audit_retention_days: float = 90.0
    acquires_per_second: float = 20.0
    acquire_burst: float = 200.0
    auth_failures_per_minute: float = 10.0
    connections_per_address: int = 512
    max_waiters: int = 1000
    leases_per_seat: int = 1024
    lease_misses_per_minute: float = 1200.0
    policy_file: Path | None = None
    #: Where the file came from, for messages; not a config key.
    source: str = "<defaults>"

    @property
    def entitlement_path(self) -> Path:
        return self.state_dir / "entitlement.txt"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "floatd.sqlite3"


# --- value checkers: (raw value, key) -> python value -----------------------------

Check = Callable[[Any, str], Any]


def _number(minimum: float, *, integer: bool = False) -> Check:
    def check(value: Any, key: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, not {type(value).__name__}")
        if integer and not isinstance(value, int):
            raise ConfigError(key, "must be a whole number")
        if not math.isfinite(value) or value < minimum:
            raise ConfigError(key, f"must be >= {minimum:g}")
        return value

    return check


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {type(value).__name__}")
    return value


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a list of strings")
    return tuple(value)


def _path(value: Any, key: str) -> Path:
    text = _string(value, key)
    if not text:
        raise ConfigError(key, "must not be empty")
    return Path(text)


def _choice(*choices: str) -> Check:
    def check(value: Any, key: str) -> str:
        text = _string(value, key)
        if text not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}")
        return text

    return check


def _listeners(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    items = _strings(value, key)
    if not items:
        raise ConfigError(key, "needs at least one host:port")
    return tuple(parse_hostport(item, key) for item in items)


def _status_listen(value: Any, key: str) -> tuple[str, int] | None:
    text = _string(value, key)
    return parse_hostport(text, key) if text else None


def _vendor_keys(value: Any, key: str) -> tuple[str, ...]:
    items = _strings(value, key)
    for item in items:
        try:
            parse_public_key(item)
        except ValueError as exc:
            raise ConfigError(key, f"{item[:40]!r}: {exc}") from None
    return items


def _optional_path(value: Any, key: str) -> Path | None:
    text = _string(value, key)
    return Path(text) if text else None


def _url(value: Any, key: str) -> str:
    text = _string(value, key)
    if text and not text.startswith(("http://", "https://")):
        raise ConfigError(key, "must start with http:// or https://")
    return text.rstrip("/")


# section -> key -> (Config attribute, checker)
SCHEMA: dict[str, dict[str, tuple[str, Check]]] = {
    "server": {
        "listen": ("listen", _listeners),
        "machine_id_file": ("machine_id_file", _path),
        "idle_timeout": ("idle_timeout", _number(1)),
        "max_connections": ("max_connections", _number(1, integer=True)),
        "client_tokens": ("client_tokens", _strings),
        "tls_cert": ("tls_cert", _string),
        "tls_key": ("tls_key", _string),
    },
    "status": {
        "listen": ("status_listen", _status_listen),
        "tls_cert": ("status_tls_cert", _string),
        "tls_key": ("status_tls_key", _string),
    },
    "admin": {"socket": ("admin_socket", _optional_path)},
    "state": {
        "dir": ("state_dir", _path),
        "backend": ("state_backend", _choice("sqlite", "postgresql")),
        "dsn": ("state_dsn", _string),
        "dsn_file": ("state_dsn_file", _optional_path),
    },
    "cluster": {"node": ("cluster_node", _string)},
    "entitlement": {"vendor_keys": ("vendor_keys", _vendor_keys)},
    "authority": {
        "url": ("authority_url", _url),
        "license_key": ("authority_license_key", _string),
        "refresh_interval": ("authority_refresh_interval", _number(1)),
        "ca_bundle": ("authority_ca_bundle", _string),
        "proxy": ("authority_proxy", _url),
        "timeout": ("authority_timeout", _number(0.1)),
    },
    "leases": {
        "default_duration": ("default_duration", _number(1, integer=True)),
        "allowed_clock_offset": ("allowed_clock_offset", _number(0)),
    },
    "log": {
        "level": ("log_level", _choice(*LOG_LEVELS)),
        "format": ("log_format", _choice(*LOG_FORMATS)),
    },
    "audit": {"retention_days": ("audit_retention_days", _number(0))},
    "limits": {
        "acquires_per_second": ("acquires_per_second", _number(0)),
        "acquire_burst": ("acquire_burst", _number(1)),
        "auth_failures_per_minute": ("auth_failures_per_minute", _number(0)),
        "connections_per_address": ("connections_per_address", _number(0, integer=True)),
        "max_waiters": ("max_waiters", _number(0, integer=True)),
        "leases_per_seat": ("leases_per_seat", _number(1, integer=True)),
        "lease_misses_per_minute": ("lease_misses_per_minute", _number(0)),
    },
    "policy": {"file": ("policy_file", _optional_path)},
}


def _env_value(text: str, checker: Check) -> Any:
    """Env vars are strings; read them as TOML values when they parse as one,
    so ``FLOATD_SERVER_IDLE_TIMEOUT=30`` is a number and a list can be given as
    ``["a:1", "b:2"]``.  A bare word stays a string; a comma list becomes a list
    for list-typed keys."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if checker in (_strings, _listeners, _vendor_keys):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate.  ``overrides`` maps ``section.key`` to values
    from the command line and wins over both file and environment."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is None:
        path = Path(env["FLOATD_CONFIG"]) if env.get("FLOATD_CONFIG") else None
        if path is None and DEFAULT_PATH.exists():
            path = DEFAULT_PATH
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", f"file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"cannot read {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None

    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in SCHEMA:
            raise ConfigError(section, "unknown section")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}", "unknown key")
            values[f"{section}.{key}"] = value
    _check_env_names(env)
    for section, table in SCHEMA.items():
        for key, (_, checker) in table.items():
            name = f"FLOATD_{section}_{key}".upper()
            if name in env:
                values[f"{section}.{key}"] = _env_value(env[name], checker)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if key not in SCHEMA.get(section, {}):
            raise ConfigError(dotted, "unknown key")
        values[dotted] = value

    fields: dict[str, Any] = {"source": source}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        attr, checker = SCHEMA[section][key]
        fields[attr] = checker(value, dotted)
    config = Config(**fields)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("server.tls_key", "tls_cert and tls_key must be set together")
    if bool(config.status_tls_cert) != bool(config.status_tls_key):
        raise ConfigError("status.tls_key", "tls_cert and tls_key must be set together")
    if config.state_dsn and config.state_dsn_file is not None:
        raise ConfigError("state.dsn_file", "give dsn or dsn_file, not both")
    if config.state_backend == "postgresql" and not (config.state_dsn or config.state_dsn_file):
        raise ConfigError("state.dsn", 'backend "postgresql" needs dsn (or dsn_file)')
    return config


def read_dsn(config: Config) -> str:
    """The cluster database's connection string, from the config or its file."""
    if config.state_dsn_file is None:
        return config.state_dsn
    return _read_value(config.state_dsn_file, "state.dsn_file")


#: Variables of floatd-authority (the vendor's CLI), not overrides of [authority].
_NOT_OVERRIDES = frozenset({"FLOATD_AUTHORITY_DB", "FLOATD_AUTHORITY_KEY_PASSPHRASE"})


def _check_env_names(env: Mapping[str, str]) -> None:
    """``FLOATD_<SECTION>_<KEY>`` with a section of the config and a key it does
    not have is a mistyped override: refused like an unknown key in the file,
    not silently ignored.  Other FLOATD_ variables are not overrides."""
    known = {f"FLOATD_{s}_{k}".upper() for s, table in SCHEMA.items() for k in table}
    sections = [f"FLOATD_{s}_".upper() for s in SCHEMA]
    for name in env:
        if (
            name not in known
            and name not in _NOT_OVERRIDES
            and any(name.startswith(prefix) for prefix in sections)
        ):
            raise ConfigError(name, "unknown key in the environment (no such config key)")


def read_policy(path: Path | None) -> Policy | None:
    """The site policy in ``path`` (``[policy] file``), checked; None for no
    file.  PolicyError (a ConfigError: exit 2) naming the file, line and key."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(path), "", "the policy file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), "", f"cannot read the policy file: {exc}") from None
    return load_policy(text, str(path))


def read_machine_id(config: Config) -> str:
    return _read_value(config.machine_id_file, "server.machine_id_file")


def _read_value(path: Path, key: str) -> str:
    """A one-value file a config key names (the machine id, a DSN), stripped;
    ConfigError naming the key if it cannot be read or is empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read: {exc.strerror}") from None
    if not text:
        raise ConfigError(key, "file is empty")
    return text
