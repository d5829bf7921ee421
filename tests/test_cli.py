"""The CLI through click's CliRunner: exit codes, one-line errors, offline activation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import SERVER_ID, payload, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.authority.cli import main as authority_main
from floatd.cli import main
from floatd.core.entitlement import parse_activation_request, server_fingerprint, sign_entitlement


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


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        (
            {"server__tls_cert": "/nonexistent/cert.pem", "server__tls_key": "/nonexistent/k"},
            "server.tls_cert",
        ),
        ({"status__tls_cert": "CERT", "status__tls_key": "/nonexistent/key.pem"}, "status.tls_key"),
        ({"server__machine_id_file": "/nonexistent/machine-id"}, "server.machine_id_file"),
        ({"state__dir": "/proc/floatd-state"}, "state.dir"),
    ],
)
def test_check_config_refuses_what_serve_refuses(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, setting: dict[str, str], key: str
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not read: the key is missing")
    fields = {k: (str(cert) if v == "CERT" else v) for k, v in setting.items()}
    cfg = write_config(tmp_path, vendor_key, **fields)
    for command in ("check-config", "serve"):
        code, _, err = run(command, "--config", str(cfg))
        assert code == 2 and err.count("\n") == 1 and key in err, (command, err)
        assert "None" not in err


def test_every_command_has_help() -> None:
    for cmd in (
        "serve",
        "check-config",
        "fingerprint",
        "activate",
        "demo",
        "status",
        "leases",
        "revoke",
        "reload",
        "audit",
        "report",
    ):
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


# --- audit and report read the state database, daemon or not -----------------------------


def _scripted_history(tmp_path: Path, cfg: Path) -> None:
    """A day of leases written the way the daemon writes them."""
    from floatd.config import load_config
    from floatd.core.changes import Audit, DeleteLease, PutLease
    from floatd.core.outcomes import audit_record
    from floatd.core.seats import Lease, hash_token
    from floatd.store.sqlite import SQLiteLeaseStore

    config = load_config(cfg, env={})
    store = SQLiteLeaseStore(config.database_path)
    day = 1_790_000_000.0 - 1_790_000_000.0 % 86400  # a UTC midnight

    def lease(name: str, start: float) -> Lease:
        return Lease(
            id=f"L-{name}",
            token_hash=hash_token(name),
            product="app",
            seat=(f"machine-{name}",),
            fingerprint=f"machine-{name}",
            instance=None,
            user=name,
            hostname=f"ws-{name}",
            meta={},
            peer="10.0.0.1",
            granted_at=start,
            expires_at=start + 3600,
            duration=3600,
        )

    a, b = lease("alice", day + 9 * 3600), lease("bob", day + 10 * 3600)
    store.apply([PutLease(a), audit_record("granted", a, a.granted_at)])
    store.apply([PutLease(b), audit_record("granted", b, b.granted_at)])
    store.apply([Audit(day + 10.5 * 3600, "refused", "app", code="NO_FREE_SEATS")])
    store.apply([DeleteLease(a.id), audit_record("released", a, day + 11 * 3600)])
    store.apply([DeleteLease(b.id), audit_record("expired", b, day + 12 * 3600)])
    store.close()


def test_audit_and_report_formats(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    _scripted_history(tmp_path, cfg)
    since, until = "2026-09-21", "2026-09-22"  # the UTC day of 1_790_000_000
    code, out, _ = run("audit", "--config", str(cfg), "--since", since, "--until", until)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "EVENT", "PRODUCT"] and len(lines) == 6
    assert [line.split()[1] for line in lines[1:]] == [
        "granted",
        "granted",
        "refused",
        "released",
        "expired",
    ]
    code, out, _ = run(
        "audit", "--config", str(cfg), "--since", since, "--json", "--event", "expired"
    )
    (record,) = json.loads(out)
    assert record["user"] == "bob" and record["time"] == "2026-09-21T12:00:00Z"

    args = ("report", "--config", str(cfg), "--since", since, "--until", until)
    code, out, _ = run(*args, "--json")
    assert code == 0
    (row,) = json.loads(out)["rows"]
    assert row == {
        "product": "app",
        "period_start": "2026-09-21T00:00:00Z",
        "period_end": "2026-09-22T00:00:00Z",
        "peak_seats": 2,
        "seat_hours": 4.0,  # alice 9:00-11:00 and bob 10:00-12:00
        "distinct_users": 2,
        "distinct_machines": 2,
        "refusals_no_seat": 1,
    }
    code, out, _ = run(*args, "--by", "hour", "--csv")
    csv_lines = out.splitlines()
    assert csv_lines[0].startswith("product,period_start,period_end,peak_seats")
    assert len(csv_lines) == 1 + 24
    assert csv_lines[1 + 10].split(",")[3:5] == ["2", "2.0"]  # 10:00-11:00: both seats held
    code, out, _ = run(*args)
    assert code == 0 and out.splitlines()[1].split()[:4] == [
        "app",
        "2026-09-21T00:00:00Z",
        "2",
        "-",
    ]

    png = tmp_path / "usage.png"
    code, _, err = run(*args, "--by", "hour", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in err

    # Without matplotlib: the table all the same, then how to get the plot.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        code, out, err = run(*args, "--plot", str(tmp_path / "none.png"))
    assert code == 1 and "PRODUCT" in out and "app" in out
    assert "matplotlib" in err and "floatd[plot]" in err and not (tmp_path / "none.png").exists()


def test_audit_and_report_refuse_bad_input(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    code, _, err = run("audit", "--config", str(cfg))
    assert code == 1 and "no state database" in err and err.count("\n") == 1
    _scripted_history(tmp_path, cfg)
    code, _, err = run("audit", "--config", str(cfg), "--since", "last tuesday")
    assert code == 2 and "--since" in err
    code, _, err = run("report", "--config", str(cfg), "--since", "2d", "--until", "3d")
    assert code == 2 and "--until" in err
    code, _, err = run("report", "--config", str(cfg), "--since", "2d", "--csv", "--json")
    assert code == 2
    code, _, _ = run("report", "--config", str(cfg))
    assert code == 2  # --since is required
    code, _, err = run("report", "--config", str(cfg), "--since", "2099-01-01")
    assert code == 2 and "--since" in err and "in the future" in err


def _commands(
    group: click.Group, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


@pytest.mark.parametrize("root", [main, authority_main], ids=["floatd", "floatd-authority"])
def test_every_command_takes_h_and_every_option_says_what_it_does(root: click.Group) -> None:
    runner = CliRunner()
    for path, cmd in _commands(root, ()):
        result = runner.invoke(root, [*path, "-h"], env={"FLOATD_CONFIG": ""})
        assert result.exit_code == 0 and "Usage:" in result.stdout, path
        if isinstance(cmd, click.Group):
            assert "..." not in result.stdout.split("Commands:")[1], path  # nothing cut
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, (path, param.opts)


def test_a_refusal_with_json_is_json(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cfg = write_config(tmp_path, vendor_key)
    code, out, err = run("leases", "--json", "--config", str(cfg))  # no daemon runs
    assert code == 1 and err == ""
    refusal = json.loads(out)
    assert refusal["ok"] is False and refusal["error"]["code"] == "ADMIN"
    assert "not running" in refusal["error"]["message"]
    code, out, _ = run("users", "list", "--json", "--config", str(cfg))  # a refusal of its own
    assert code == 1 and json.loads(out)["error"]["code"] == "FAILED"
    code, _, err = run("leases", "--config", str(cfg))  # without --json: one line on stderr
    assert code == 1 and err.startswith("floatd: ") and err.count("\n") == 1
