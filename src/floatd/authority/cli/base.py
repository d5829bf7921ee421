"""``floatd-authority``: the group and what its commands share.

Every command takes ``--db`` (default ``$FLOATD_AUTHORITY_DB``, else
``./floatd-authority.sqlite3``); listings take ``--json``.  Exit status as
floatd's: 0 success, 1 refused or failed (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd import __version__
from floatd.authority.logic import Authority
from floatd.authority.store import AuthorityStore
from floatd.cli import CONTEXT, HelpGroup, fail, make_guard
from floatd.core.entitlement import load_private_key

F = TypeVar("F", bound=Callable[..., Any])
PASSPHRASE_ENV = "FLOATD_AUTHORITY_KEY_PASSPHRASE"


def die(message: str, status: int = 1) -> NoReturn:
    fail("floatd-authority", message, status)


guarded = make_guard("floatd-authority", remote_authority=False)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


def key_option(fn: F) -> F:
    """``--key PATH`` (as ``key_path``): the vendor's signing key, required."""
    return click.option(
        "--key",
        "key_path",
        type=click.Path(path_type=Path),
        required=True,
        help="The signing key (PEM).",
    )(fn)


class Ctx:
    def __init__(self, db: Path) -> None:
        self.db = db
        self._store: AuthorityStore | None = None

    def authority(self, key: Ed25519PrivateKey | None = None, *, create: bool = False) -> Authority:
        """The authority on ``--db``.  Only ``create`` (the first product added)
        makes a new database, and says so: a command run in the wrong directory,
        or with ``--db`` mistyped, must not start empty books unnoticed."""
        if self._store is None:
            fresh = not self.db.exists()
            if fresh and not create:
                die(
                    f"no authority database at {self.db}: give --db or set "
                    "$FLOATD_AUTHORITY_DB (`product add` creates a new one)"
                )
            if fresh and not self.db.parent.is_dir():
                die(f"no directory {self.db.parent} for the authority database")
            self._store = AuthorityStore(self.db)
            if fresh:
                click.echo(f"created a new authority database at {self.db}", err=True)
        return Authority(self._store, key, actor=f"cli:{_who()}")


pass_ctx = click.make_pass_decorator(Ctx)


class _DbAnywhere(HelpGroup):
    """Takes ``--db`` after the command as well (``floatd-authority license
    list --db books.sqlite3``): an option given there used to be refused, and
    the command fell back to the default database."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        front: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest += args[i:]
                break
            if arg == "--db" and i + 1 < len(args):
                front += args[i : i + 2]
                i += 2
                continue
            if arg.startswith("--db="):
                front.append(arg)
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, front + rest)


@click.group(cls=_DbAnywhere, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="floatd-authority")
@click.option(
    "--db",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="FLOATD_AUTHORITY_DB",
    default=Path("floatd-authority.sqlite3"),
    show_default=True,
    help="The authority's database ($FLOATD_AUTHORITY_DB).",
)
@click.pass_context
def main(ctx: click.Context, db: Path) -> None:
    """floatd-authority: the reference central authority (the vendor's side)."""
    os.umask(0o077)  # the vendor's books and keys are nobody else's business
    ctx.obj = Ctx(db)


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        die(f"cannot read key {path}: {exc.strerror}")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        return load_private_key(pem, passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        die(f"cannot load key {path}: {exc} (encrypted keys read ${PASSPHRASE_ENV})")


def _who() -> str:
    """The OS user running the vendor's CLI (the trail's actor)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
