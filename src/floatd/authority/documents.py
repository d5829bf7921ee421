"""The vendor side's JSON documents: a product, a license, an activation,
the same from the CLI's ``--json`` and from the management API."""

from __future__ import annotations

from typing import Any

from floatd.authority.logic import Authority
from floatd.authority.store import Activation, Change, License, Product
from floatd.store.audit import iso


def product_doc(p: Product) -> dict[str, Any]:
    return dict(p.__dict__)


def license_doc(a: Authority, lic: License) -> dict[str, Any]:
    """A license with its terms (never its key)."""
    return {
        "id": lic.id,
        "order": lic.order_id,
        "order_reference": lic.order_reference,
        "customer": lic.customer,
        "state": lic.state,
        "created_at": iso(lic.created_at),
        "expires": iso(a.expiry(lic)),
        "users": lic.users,
        "local_users": a.store.local_users(lic.id),
        "activations": len(a.store.activations(lic.id, active_only=True)),
        **dict(lic.terms.__dict__),
    }


def activation_doc(a: Authority, x: Activation) -> dict[str, Any]:
    """One activation; ``addresses`` are where its recent refreshes came from,
    newest first: more than one at once is two servers (a cloned VM keeps its
    machine id, and so its fingerprint) sharing one activation."""
    addresses: list[str] = []
    for _, address, _ in a.store.refreshes(x.id):
        if address is not None and address not in addresses:
            addresses.append(address)
    return {
        "id": x.id,
        "license": x.license_id,
        "server": x.server,
        "hostname": x.hostname,
        "floatd": x.floatd,
        "mode": x.mode,
        "state": x.state,
        "created_at": iso(x.created_at),
        "refreshed_at": iso(x.refreshed_at),
        "addresses": addresses,
    }


def change_doc(c: Change) -> dict[str, Any]:
    return {
        "at": iso(c.at),
        "actor": c.actor,
        "action": c.action,
        "subject": c.subject,
        "before": c.before,
        "after": c.after,
    }
