"""The CLI through click's CliRunner: exit codes, one-line errors, offline activation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SERVER_ID, payload, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.cli import main
from floatd.entitlement import parse_activation_request, server_fingerprint, sign_entitlement


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"FLOATD_CONFIG": ""})
    return result.exit_code, result.stdout, result.stderr


def test_fingerprint(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    code, out, _ = run("fingerprint", "--config", str(cfg))
    assert code == 0 and out.strip() == SERVER_ID


def test_fingerprint_without_machine_id(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key, server__machine_id_file=str(tmp_path / "nope"))
    code, _, err = run("fingerprint", "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "server.machine_id_file" in err


def test_check_config(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    assert run("check-config", "--config", str(cfg))[0] == 0
    cfg.write_text(cfg.read_text() + "\n[leases]\ndefault_duration = -5\n")
    code, _, err = run("check-config", "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "leases.default_duration" in err
    code, _, err = run("check-config", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "does not exist" in err


def test_every_command_has_help() -> None:
    for cmd in ("serve", "check-config", "fingerprint", "activate", "demo"):
        code, out, _ = run(cmd, "--help")
        assert code == 0 and "Usage:" in out


def _offline_request(tmp_path: Path, cfg: Path) -> str:
    req_file = tmp_path / "request.txt"
    code, _, err = run(
        "activate",
        "--config",
        str(cfg),
        "--offline-request",
        str(req_file),
        "--license-key",
        "KEY-123",
    )
    assert code == 0, err
    request = parse_activation_request(req_file.read_text())
    assert request.license_key == "KEY-123" and request.server == SERVER_ID
    assert len(request.nonce) >= 22
    return request.nonce


def _respond(tmp_path: Path, key: Ed25519PrivateKey, name: str, **overrides: object) -> Path:
    path = tmp_path / name
    fields: dict[str, object] = {"issued_at": int(time.time()) - 60, **overrides}
    path.write_text(sign_entitlement(key, payload(**fields)))
    return path


def test_offline_activation_round_trip_and_replay(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    nonce = _offline_request(tmp_path, cfg)
    response = _respond(tmp_path, vendor_key, "resp.txt", nonce=nonce)
    code, out, err = run("activate", "--config", str(cfg), "--offline-response", str(response))
    assert code == 0, err
    assert "installed entitlement" in out
    installed = (tmp_path / "state" / "entitlement.txt").read_text()
    assert installed == response.read_text()
    # The same response again: its nonce is used up.
    code, _, err = run("activate", "--config", str(cfg), "--offline-response", str(response))
    assert code == 1 and "no pending request" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nonce": None}, "no nonce"),
        ({"nonce": "made-up-nonce"}, "no pending request"),
        ({"server": server_fingerprint("other-machine")}, "bound to server"),
        ({"issued_at": int(time.time()) + 3600}, "future"),
    ],
)
def test_offline_response_refusals(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, overrides: dict[str, object], message: str
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    nonce = _offline_request(tmp_path, cfg)
    response = _respond(tmp_path, vendor_key, "resp.txt", **{"nonce": nonce, **overrides})
    code, _, err = run("activate", "--config", str(cfg), "--offline-response", str(response))
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "state" / "entitlement.txt").exists()


def test_offline_response_from_foreign_key_or_garbage(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = write_config(tmp_path, vendor_key)
    nonce = _offline_request(tmp_path, cfg)
    foreign = _respond(tmp_path, Ed25519PrivateKey.generate(), "f.txt", nonce=nonce)
    assert run("activate", "--config", str(cfg), "--offline-response", str(foreign))[0] == 1
    garbage = tmp_path / "g.txt"
    garbage.write_bytes(b"\xff\xfe garbage \x00")
    code, _, err = run("activate", "--config", str(cfg), "--offline-response", str(garbage))
    assert code == 1 and err.count("\n") == 1
    code, _, err = run(
        "activate", "--config", str(cfg), "--offline-response", str(tmp_path / "absent.txt")
    )
    assert code == 1 and "cannot read" in err
    # The pending request is still usable after those refusals.
    good = _respond(tmp_path, vendor_key, "ok.txt", nonce=nonce)
    assert run("activate", "--config", str(cfg), "--offline-response", str(good))[0] == 0


def test_activate_usage_errors(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    code, _, _ = run(
        "activate", "--config", str(cfg), "--offline-request", "a", "--offline-response", "b"
    )
    assert code == 2
    code, _, err = run(
        "activate", "--config", str(cfg), "--offline-request", str(tmp_path / "r.txt")
    )
    assert code == 2 and "license-key" in err
