"""floatd-authority: The vendor's signing key: generate, show the public half."""

from __future__ import annotations

import os
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.authority.cli.base import PASSPHRASE_ENV, die, guarded, key_option, load_key, main
from floatd.core.entitlement import format_public_key, private_key_pem

# --- keys ---------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """The vendor's Ed25519 signing key."""


@keys.command("generate")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the new private key (PEM).",
)
@click.option(
    "--passphrase", is_flag=True, help=f"Encrypt the key (prompted, or ${PASSPHRASE_ENV})."
)
@guarded
def keys_generate(out: Path, passphrase: bool) -> None:
    """Create a signing key (PKCS#8 PEM) and print its public key for floatd's config."""
    if out.exists():
        die(f"{out} exists; not overwriting a signing key")
    secret = None
    if passphrase:
        secret = os.environ.get(PASSPHRASE_ENV) or click.prompt(
            "passphrase", hide_input=True, confirmation_prompt=True
        )
    key = Ed25519PrivateKey.generate()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key, secret.encode() if secret else None))
    click.echo(format_public_key(key.public_key()))
    click.echo(f"wrote {out}; put the line above in floatd's [entitlement] vendor_keys", err=True)


@keys.command("public")
@key_option
@guarded
def keys_public(key_path: Path) -> None:
    """Print the public key of a signing key."""
    click.echo(format_public_key(load_key(key_path).public_key()))
