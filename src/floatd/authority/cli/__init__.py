"""``floatd-authority``: the vendor's tool.  Keys, products, licenses, users,
activations, offline signing, and serving the HTTP API; one module per group,
each registering its commands on the group of :mod:`floatd.authority.cli.base`."""

from floatd.authority.cli import (
    activations,
    apikeys,
    history,
    keys,
    licenses,
    managers,
    products,
    serve,
    users,
)
from floatd.authority.cli.base import PASSPHRASE_ENV, main

__all__ = [
    "PASSPHRASE_ENV",
    "activations",
    "apikeys",
    "history",
    "keys",
    "licenses",
    "main",
    "managers",
    "products",
    "serve",
    "users",
]
