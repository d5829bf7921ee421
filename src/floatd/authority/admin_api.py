"""The vendor's management API, ``/v1/admin/...``: products, licenses and their
terms, license users, activations and the change trail, over JSON.

Every request carries ``Authorization: Bearer <api key>``; keys are made with
``floatd-authority api-keys create NAME`` and stored as hashes, and each change
is recorded in the trail as ``api:NAME``.  The routes are one table
(:data:`ROUTES`), from which ``GET /v1/openapi.json`` is built, so the document
covers every route by construction.  The work is the same :class:`Authority`
the CLI drives; this module only maps HTTP onto it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from floatd.authority.documents import activation_doc, change_doc, license_doc, product_doc
from floatd.authority.logic import Authority
from floatd.authority.manager_api import DOCUMENTED
from floatd.authority.managers import Managers
from floatd.authority.store import Product, Terms
from floatd.errors import AuthorityError
from floatd.http11 import Reply, headers, json_reply

Run = Callable[..., Awaitable[Any]]
Handler = Callable[["Call"], Any]


@dataclass
class Call:
    """One API request, as its handler sees it (run in the database thread)."""

    authority: Authority
    params: tuple[str, ...]
    query: dict[str, str]
    body: dict[str, Any]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI form: /v1/admin/licenses/{license_id}
    summary: str
    handler: Handler
    status: int = 200

    @property
    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\{[a-z_]+\}", r"([^/]{1,254})", self.path)
        return re.compile(f"^{regex}$")


def _products(call: Call) -> Any:
    return [product_doc(p) for p in call.authority.store.products()]


def _add_product(call: Call) -> Any:
    b = call.body
    product = Product(
        code=_text(b, "code"),
        name=_text(b, "name"),
        authorization=b.get("authorization", "key"),
        lease_duration=_int(b, "lease_duration", 0),
        strategy=b.get("strategy", "per-machine"),
        trial_days=_int(b, "trial_days", 0),
    )
    return product_doc(call.authority.add_product(product))


def _licenses(call: Call) -> Any:
    a = call.authority
    return [license_doc(a, lic) for lic in a.store.licenses(call.query.get("order"))]


def _license(call: Call) -> Any:
    a = call.authority
    return license_doc(a, a.get_license(call.params[0]))


def _issue(call: Call) -> Any:
    b = dict(call.body)
    order = _text(b, "order")
    reference, customer = b.pop("order_reference", None), b.pop("customer", None)
    b.pop("order", None)
    terms = Terms(**_terms(b, required=True))
    lic, key = call.authority.issue_license(
        order, terms, time.time(), order_reference=reference, customer=customer
    )
    return {**license_doc(call.authority, lic), "license_key": key}


def _update(call: Call) -> Any:
    b = dict(call.body)
    extend = bool(b.pop("extend", False))
    clear = [name for name, value in b.items() if value is None]
    changes = {k: v for k, v in _terms(b, required=False).items() if v is not None}
    lic = call.authority.update_license(
        call.params[0], time.time(), extend=extend, clear=clear, **changes
    )
    return license_doc(call.authority, lic)


def _state(state: str) -> Handler:
    def handler(call: Call) -> Any:
        return license_doc(call.authority, call.authority.set_state(call.params[0], state))

    return handler


def _assign(call: Call) -> Any:
    lic = call.authority.assign_user(call.params[0], unquote(call.params[1]))
    return license_doc(call.authority, lic)


def _unassign(call: Call) -> Any:
    lic = call.authority.unassign_user(call.params[0], unquote(call.params[1]))
    return license_doc(call.authority, lic)


def _activations(call: Call) -> Any:
    a = call.authority
    return [activation_doc(a, x) for x in a.store.activations(call.query.get("license"))]


def _revoke_activation(call: Call) -> Any:
    a = call.authority
    a.revoke_activation(call.params[0])
    activation = a.store.activation(call.params[0])
    assert activation is not None
    return activation_doc(a, activation)


def _sign_offline(call: Call) -> Any:
    activation_id, entitlement = call.authority.sign_offline(
        _text(call.body, "request"), time.time()
    )
    return {"activation_id": activation_id, "entitlement": entitlement}


def _changes(call: Call) -> Any:
    limit = int(call.query.get("limit", "100")) if call.query.get("limit", "").isdigit() else 100
    changes = call.authority.store.changes(call.query.get("subject"), min(limit, 1000))
    return [change_doc(c) for c in changes]


def _order_rows(call: Call, order: str | None = None) -> list[dict[str, Any]]:
    """Orders (all, or the one named) with their manager and license count."""
    where, args = ("WHERE o.id = ?", (order,)) if order is not None else ("", ())
    rows = call.authority.store.db.execute(
        "SELECT o.id, o.reference, o.customer, o.manager, count(l.id) FROM orders o"
        f" LEFT JOIN licenses l ON l.order_id = o.id {where} GROUP BY o.id ORDER BY o.id",
        args,
    ).fetchall()
    keys = ("id", "reference", "customer", "manager", "licenses")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _orders(call: Call) -> Any:
    return _order_rows(call)


def _order(call: Call) -> Any:
    order = unquote(call.params[0])
    found = _order_rows(call, order)
    if not found:
        raise AuthorityError(404, "ORDER_NOT_FOUND", f"no order {order!r}")
    a = call.authority
    return {**found[0], "licenses": [license_doc(a, lic) for lic in a.store.licenses(order)]}


def _managers(call: Call) -> Any:
    return [m.__dict__ for m in Managers(call.authority).all()]


def _appoint(call: Call) -> Any:
    order, email = unquote(call.params[0]), _text(call.body, "email")
    token = Managers(call.authority).appoint(order, email)
    return {"order": order, "manager": email, "enrolment_token": token}


def _dismiss(call: Call) -> Any:
    order = unquote(call.params[0])
    Managers(call.authority).dismiss(order)
    return {"order": order, "manager": None}


def _reset_manager(call: Call) -> Any:
    email = unquote(call.params[0])
    return {"email": email, "enrolment_token": Managers(call.authority).reset(email)}


LICENSE = "/v1/admin/licenses/{license_id}"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/admin/products", "List products", _products),
    Route("POST", "/v1/admin/products", "Add a product", _add_product, 201),
    Route("GET", "/v1/admin/licenses", "List licenses (?order=ID)", _licenses),
    Route("POST", "/v1/admin/licenses", "Issue a license (its key is answered once)", _issue, 201),
    Route("GET", LICENSE, "One license", _license),
    Route("PATCH", LICENSE, "Change terms (null drops one)", _update),
    Route("POST", f"{LICENSE}/suspend", "Suspend", _state("suspended")),
    Route("POST", f"{LICENSE}/reinstate", "Reinstate", _state("active")),
    Route("POST", f"{LICENSE}/revoke", "Revoke for good", _state("revoked")),
    Route("PUT", f"{LICENSE}/users/{{email}}", "Assign a license user", _assign),
    Route("DELETE", f"{LICENSE}/users/{{email}}", "Unassign a license user", _unassign),
    Route("GET", "/v1/admin/activations", "List activations (?license=ID)", _activations),
    Route(
        "POST",
        "/v1/admin/activations/{activation_id}/revoke",
        "Revoke an activation",
        _revoke_activation,
    ),
    Route(
        "POST",
        "/v1/admin/offline-activations",
        "Sign an air-gapped site's activation request (the file's text)",
        _sign_offline,
        201,
    ),
    Route("GET", "/v1/admin/changes", "The change trail (?subject=, ?limit=)", _changes),
    Route("GET", "/v1/admin/orders", "Orders: customer, reference, manager", _orders),
    Route("GET", "/v1/admin/orders/{order_id}", "One order with its licenses", _order),
    Route("GET", "/v1/admin/managers", "License managers and their orders", _managers),
    Route(
        "PUT",
        "/v1/admin/orders/{order_id}/manager",
        "Name an order's license manager (an enrolment token if they have no password)",
        _appoint,
    ),
    Route("DELETE", "/v1/admin/orders/{order_id}/manager", "The order has no manager", _dismiss),
    Route(
        "POST",
        "/v1/admin/managers/{email}/reset",
        "A new enrolment token (the password and sessions end)",
        _reset_manager,
    ),
)
_COMPILED = [(route, route.pattern) for route in ROUTES]

#: Terms a body may set, with their JSON types (what issue and PATCH take).
TERM_TYPES: dict[str, tuple[type, ...]] = {
    "products": (list,),
    "seats": (int,),
    "lease_duration": (int,),
    "strategy": (str,),
    "user_locked": (bool,),
    "allowed_ips": (list,),
    "allowed_activations": (int,),
    "interval": (str,),
    "expires_at": (int,),
    "effective_at": (int,),
    "trial": (bool,),
    "grace_seconds": (int,),
    "borrow_max": (int,),
    "max_users": (int,),
    "metadata": (dict,),
    "features": (dict,),
}


async def admin_reply(
    authority: Authority, run: Run, method: str, target: str, body: dict[str, Any]
) -> Reply:
    """The answer to one ``/v1/admin/`` request."""
    path, _, query = target.partition("?")
    allowed = []
    for route, pattern in _COMPILED:
        match = pattern.match(path)
        if match is None:
            continue
        if route.method != method:
            allowed.append(route.method)
            continue
        found = await run(authority.api_actor, _bearer())
        if found is None:
            raise AuthorityError(401, "UNAUTHORIZED", "a valid API key is required (Bearer)")
        actor, rights = found
        if rights != "all" and method != "GET":
            raise AuthorityError(403, "FORBIDDEN", "this API key may only read")
        call = Call(authority.as_actor(actor), match.groups(), _query(query), body)
        return json_reply(route.status, await run(route.handler, call))
    if allowed:
        raise AuthorityError(405, "METHOD_NOT_ALLOWED", f"use {', '.join(allowed)}")
    raise AuthorityError(404, "NOT_FOUND", f"no route {path[:100]!r}")


def _bearer() -> str:
    value = headers.get({}).get("authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _query(text: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(text, max_num_fields=20).items()}


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise AuthorityError(400, "BAD_REQUEST", f"{name!r} must be a non-empty string")
    return value


def _int(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AuthorityError(400, "BAD_REQUEST", f"{name!r} must be an integer")
    return value


def _terms(body: dict[str, Any], required: bool) -> dict[str, Any]:
    """The license terms of a body, type-checked; unknown keys are refused
    (a misspelt term must not pass unnoticed)."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        types = TERM_TYPES.get(name)
        if types is None:
            raise AuthorityError(400, "BAD_REQUEST", f"no license term {name!r}")
        if value is None:
            out[name] = None
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise AuthorityError(400, "BAD_REQUEST", f"{name!r} has the wrong type")
        out[name] = value
    if required:
        for name in ("products", "seats"):
            if name not in out:
                raise AuthorityError(400, "BAD_REQUEST", f"{name!r} is required")
    return out


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the whole API, built from the route tables."""
    error = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, dict[str, Any]] = {}
    server_routes = [
        ("POST", "/v1/activations", "Activate a server", 201),
        ("POST", "/v1/activations/{activation_id}/refresh", "Refresh an activation", 200),
        ("DELETE", "/v1/activations/{activation_id}", "Give an activation back", 204),
        ("GET", "/v1/health", "Health", 200),
        ("GET", "/v1/openapi.json", "This document", 200),
    ]
    entries: list[tuple[str, str, str, int, str | None]]
    entries = [(m, p, s, st, None) for m, p, s, st in server_routes]
    entries += [(m, p, s, st, "managerSession" if on else None) for m, p, s, st, on in DOCUMENTED]
    entries += [(r.method, r.path, r.summary, r.status, "apiKey") for r in ROUTES]
    for method, path, summary, status, scheme in entries:
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"\{([a-z_]+)\}", path)
            ],
            "responses": {
                str(status): {"description": "done"},
                "default": {
                    "description": "an error",
                    "content": {"application/json": {"schema": error}},
                },
            },
        }
        if method in ("POST", "PATCH", "PUT"):
            op["requestBody"] = {
                "required": method != "PUT",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        if scheme is not None:
            op["security"] = [{scheme: []}]
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "floatd reference authority", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "managerSession": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                            "required": ["code", "message"],
                        }
                    },
                    "required": ["error"],
                }
            },
        },
    }
