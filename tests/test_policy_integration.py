"""The site policy on the real ``floatd serve``: refusals on the wire, the CLI's
check and explain, status and metrics, the audit, and a live reload (a bad file
changing nothing) while clients keep leasing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from conftest import payload, product, write_config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from daemon import Daemon
from test_integration import client, entitlement, floatd_cli

from floatd.core.entitlement import sign_entitlement
from floatd.store.activation import atomic_write

SEATS = 6
POLICY = """\
[groups]
cad_team = ["user:alice", "user:bob"]
kiosks = ["host:kiosk-*"]

[[rule]]
product = "app"
exclude = ["group:kiosks"]

[[rule]]
product = "app"
reserve = 2
for = ["group:cad_team"]

[[rule]]
product = "app"
max = 1
for = ["user:*"]
per = "user"
"""
BAD = POLICY + '\n[[rule]]\nproduct = "app"\nexclude = ["group:nobody"]\n'
OPEN = '[[rule]]\nproduct = "app"\nmax = 1\nfor = ["user:*"]\nper = "user"\n'


def _load(d: Daemon, stop: threading.Event, problems: list[str], done: list[int]) -> None:
    """Acquire and release in a loop, on a product of its own (so the counts
    the test checks on "app" are exact), through every reload."""
    with client(d) as c:
        n = 0
        while not stop.is_set() and n < 5000:
            n += 1
            got = c.request(
                "acquire", product="load", fingerprint=f"machine-load-{n % 2}", user="load"
            )
            if not got["ok"]:
                problems.append(str(got))
                continue
            done.append(1)
            released = c.request("release", lease=got["lease"], token=got["token"])
            if not released["ok"]:
                problems.append(str(released))


def test_policy_on_the_real_daemon_with_a_live_reload_under_load(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    cfg = write_config(tmp_path, vendor_key, status__listen="127.0.0.1:0", policy__file=str(policy))
    products = [product("app", seats=SEATS), product("load", seats=1)]
    ent = sign_entitlement(vendor_key, payload(products, issued_at=int(time.time()) - 60))
    atomic_write(tmp_path / "state" / "entitlement.txt", ent)

    def cli(*args: str) -> Any:
        return floatd_cli(*args, "--config", str(cfg))

    checked = cli("policy", "check")
    assert checked.returncode == 0 and "2 groups, 3 rules" in checked.stdout, checked.stderr
    with Daemon(cfg, tmp_path / "floatd.log") as d:
        d.start()
        stop, problems, done = threading.Event(), [], []
        load = threading.Thread(target=_load, args=(d, stop, problems, done), daemon=True)
        load.start()
        try:
            with client(d) as c:
                refused = c.request(
                    "acquire", product="app", fingerprint="machine-k1", hostname="kiosk-3"
                )
                assert refused["error"]["code"] == "POLICY_DENIED"
                assert refused["error"]["rule"] == "exclude"
                assert refused["error"]["product"] == "app"
                assert "kiosk" not in refused["error"]["message"]
                # The connection stays open, and a user holds one seat at most.
                carol = c.request(
                    "acquire", product="app", fingerprint="machine-ws-carol", user="carol"
                )
                assert carol["ok"]
                again = c.request(
                    "acquire", product="app", fingerprint="machine-ws-carol2", user="carol"
                )
                assert again["error"]["code"] == "POLICY_DENIED"
                assert again["error"]["rule"] == "max"
                for n in range(3):
                    assert c.request(
                        "acquire", product="app", fingerprint=f"machine-o{n}", user=f"o{n}"
                    )["ok"]
                # 4 of 6 seats held: the 2 left are kept for the team.
                full = c.request(
                    "acquire", product="app", fingerprint="machine-ws-dave", user="dave"
                )
                assert full["error"]["code"] == "NO_FREE_SEATS"
                assert full["error"]["reserved"] == 2
                assert c.request(
                    "acquire", product="app", fingerprint="machine-ws-bob", user="bob"
                )["ok"]

                said = json.loads(
                    cli(
                        "policy", "explain", "--product", "app", "--host", "kiosk-9", "--json"
                    ).stdout
                )
                assert said["result"] == "POLICY_DENIED" and said["rule"] == "exclude"
                text = cli("policy", "explain", "--product", "app", "--user", "alice")
                assert text.returncode == 0 and text.stdout.startswith("app: granted")
                assert "reserve rule 2" in text.stdout
                text = cli("policy", "explain", "--product", "app", "--user", "dave")
                assert "refused, NO_FREE_SEATS" in text.stdout
                assert "seats kept for others: 1 (reserve rules 2)" in text.stdout
                junk = cli("policy", "explain", "--product", "app", "--ip", "not-an-ip")
                assert junk.returncode == 1 and "not an IP address" in junk.stderr

                status = json.loads(cli("status", "--json").stdout)
                app = status["products"][0]
                assert app["reserved"][0]["for"] == ["group:cad_team"]
                assert app["reserved"][0]["seats"] == 2
                assert status["policy"]["file"] == str(policy)
                assert "reserved for group:cad_team" in cli("status").stdout

                # A bad file changes nothing: exit 2, one line with its line.
                policy.write_text(BAD)
                bad = cli("reload")
                assert bad.returncode == 2 and bad.stderr.count("\n") == 1
                line = BAD.splitlines().index('exclude = ["group:nobody"]') + 1
                assert f"{policy}:{line}: rule 4.exclude" in bad.stderr
                assert "unknown group" in bad.stderr
                still = c.request(
                    "acquire", product="app", fingerprint="machine-k2", hostname="kiosk-4"
                )
                assert still["error"]["rule"] == "exclude"

                # A good one applies at once; no held lease ends.
                policy.write_text(OPEN)
                reloaded = cli("reload")
                assert reloaded.returncode == 0 and f"policy: {policy} (1 rule)" in reloaded.stdout
                kiosk = c.request(
                    "acquire", product="app", fingerprint="machine-k3", hostname="kiosk-5"
                )
                assert kiosk["ok"], kiosk
                assert c.request("renew", lease=carol["lease"], token=carol["token"])["ok"]
                after = json.loads(cli("status", "--json").stdout)["products"][0]
                assert after["reserved"] == [] and after["used"] <= SEATS
        finally:
            stop.set()
            load.join(30)
        assert not load.is_alive() and not problems, problems
        assert len(done) > 10  # the load kept being served through both reloads

        status, body = d.http("/metrics")
        assert status == 200
        assert b'floatd_policy_refusals_total{product="app",rule="exclude"} 2.0' in body
        assert b'floatd_policy_refusals_total{product="app",rule="max"}' in body
        records = json.loads(cli("audit", "--json", "--since", "1h").stdout)
        denied = [r for r in records if r["code"] == "POLICY_DENIED"]
        assert {r["rule"] for r in denied} == {"exclude", "max"}
        assert "POLICY_DENIED (exclude)" in cli("audit", "--since", "1h").stdout


def test_a_daemon_does_not_start_on_a_bad_policy(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nproduct = "app"\nexclude = ["ip:10.0.0.1/8"]\n')
    cfg = write_config(tmp_path, vendor_key, policy__file=str(policy))
    for args in (["check-config"], ["policy", "check"], ["serve"]):
        result = floatd_cli(*args, "--config", str(cfg))
        assert result.returncode == 2, (args, result.stderr)
        assert f"{policy}:3: rule 1.exclude" in result.stderr
        assert result.stderr.count("\n") == 1
    named = floatd_cli("policy", "check", str(tmp_path / "missing.toml"))
    assert named.returncode == 2 and "does not exist" in named.stderr
    ok = tmp_path / "ok.toml"
    ok.write_text('[[rule]]\nproduct = "cadd"\nexclude = ["host:kiosk-*"]\n')
    atomic_write(tmp_path / "state" / "entitlement.txt", entitlement(vendor_key))
    warned = floatd_cli("policy", "check", str(ok), "--config", str(cfg))
    assert warned.returncode == 0 and "no product 'cadd'" in warned.stderr
    full = tmp_path / "full.toml"
    full.write_text('[[rule]]\nproduct = "*"\nreserve = 1000\nfor = ["user:vip"]\n')
    warned = floatd_cli("policy", "check", str(full), "--config", str(cfg))
    assert warned.returncode == 0 and "reserves of 'app' keep all its" in warned.stderr
    explain = floatd_cli("policy", "explain", "--product", "app", "--config", str(cfg))
    assert explain.returncode == 1 and "daemon" in explain.stderr.lower()
