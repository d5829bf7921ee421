"""A self-contained demo: a throwaway vendor key and an entitlement for this machine.

Everything lives in one directory; nothing touches /etc or /var, and no vendor
or network is involved.  The entitlement says DEMO in its customer, license and
product names and is marked trial, so it can never pass for a real one (and its
key is trusted only by the demo's own config).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.config import Config, load_config, read_machine_id
from floatd.core.entitlement import (
    format_public_key,
    load_private_key,
    parse_payload,
    private_key_pem,
    product_payload,
    server_fingerprint,
    sign_entitlement,
)
from floatd.store.activation import install_entitlement
from floatd.store.server_key import public_key_text

DEMO_PRODUCTS = [
    product_payload(
        "demo",
        "floatd demo product (DEMO - not a real license)",
        5,
        lease_duration=60,
        trial=True,
        metadata={"edition": "demo"},
        features={"export": True, "max_threads": 4},
        borrow_max=3 * 86400,  # so borrowing can be tried: up to 3 days
    ),
    product_payload(
        "demo-instance",
        "floatd demo product, per process (DEMO)",
        3,
        lease_duration=60,
        strategy="per-instance",
        trial=True,
    ),
]


def prepare(directory: Path, listen: str, now: float, status_listen: str = "") -> Config:
    """Create (or refresh) the demo directory and return its config."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    machine_id = Path("/etc/machine-id")
    if not (machine_id.is_file() and machine_id.read_text().strip()):
        machine_id = directory / "machine-id"
        if not machine_id.exists():
            machine_id.write_text(secrets.token_hex(16) + "\n")
    key_path = directory / "demo-vendor-key.pem"
    if key_path.exists():
        key = load_private_key(key_path.read_bytes())
    else:
        key = Ed25519PrivateKey.generate()
        key_path.write_bytes(private_key_pem(key))
        key_path.chmod(0o600)
    config_path = directory / "floatd.toml"
    config_path.write_text(
        "# DEMO configuration written by `floatd demo`; trusts only the demo's throwaway key.\n"
        "[server]\n"
        f'listen = ["{listen}"]\n'
        f'machine_id_file = "{machine_id}"\n'
        "[status]\n"
        f'listen = "{status_listen}"\n'
        "[admin]\n"
        f'socket = "{directory / "admin.sock"}"\n'
        "[state]\n"
        f'dir = "{directory / "state"}"\n'
        "[entitlement]\n"
        f'vendor_keys = ["{format_public_key(key.public_key())}"]\n'
        "[log]\n"
        'format = "console"\n'
    )
    config = load_config(config_path, env={})
    payload = {
        "v": 1,
        "id": "demo-" + secrets.token_hex(4),
        "license": "DEMO",
        "customer": "DEMO - not a real license",
        "server": server_fingerprint(read_machine_id(config)),
        "issued_at": int(now),
        "not_before": None,
        "not_after": int(now) + 30 * 86400,
        "refresh_by": None,
        "nonce": None,
        "products": DEMO_PRODUCTS,
        # The demo server's own key, so that it can sign borrows.
        "server_key": public_key_text(config.state_dir),
    }
    install_entitlement(config, parse_payload(payload, text=sign_entitlement(key, payload)))
    return config
