"""The vendor side's JSON documents: a product, a license (and a license as its
manager sees it), an activation, a change; the same from the CLI's ``--json``,
the management API, the managers' API and their portal."""

from __future__ import annotations

from typing import Any

from floatd.authority.logic import Authority
from floatd.authority.store import Activation, Change, License, Product
from floatd.store.audit import iso


def product_doc(p: Product) -> dict[str, Any]:
    return dict(p.__dict__)


def _heading(lic: License) -> dict[str, Any]:
    """What every view of a license starts with: which it is, whose, its state."""
    return {
        "id": lic.id,
        "order": lic.order_id,
        "order_reference": lic.order_reference,
        "customer": lic.customer,
        "state": lic.state,
    }


def license_doc(a: Authority, lic: License) -> dict[str, Any]:
    """A license with its terms (never its key)."""
    return {
        **_heading(lic),
        "created_at": iso(lic.created_at),
        "expires": iso(a.expiry(lic)),
        "users": lic.users,
        "local_users": a.store.local_users(lic.id),
        "activations": len(a.store.activations(lic.id, active_only=True)),
        **dict(lic.terms.__dict__),
    }


def managed_license_doc(authority: Authority, lic: License) -> dict[str, Any]:
    """A license as its manager sees it: who holds its user places, and how many
    are left.  ``not_assigned``: nobody holds one yet (the seed's "Not Assigned")."""
    local = authority.store.local_users(lic.id)
    everyone = set(lic.users).union(*local.values())
    cap = lic.terms.max_users
    products = []
    for code in lic.terms.products:
        product = authority.store.product(code)
        products.append(
            {
                "code": code,
                "name": product.name if product else code,
                "authorization": product.authorization if product else "key",
            }
        )
    return {
        **_heading(lic),
        "expires": iso(authority.expiry(lic)),
        "seats": lic.terms.seats,
        "products": products,
        "max_users": cap,
        "users": lic.users,
        "local_users": local,
        "places_free": None if cap <= 0 else max(0, cap - len(everyone)),
        "not_assigned": not everyone,
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
