"""License managers at the real authority over HTTP: appointed by the vendor,
enrolled with a one-time token, signed in, and kept to their own orders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_online import Vendor, admin

MIA = "mia@customer.example"
OTTO = "otto@other.example"
PASSWORD = "correct horse battery"


def issue_under(vendor: Vendor, order: str, *terms: str) -> str:
    """A license of the user-authorized product under ``order``: its id."""
    doc = json.loads(
        vendor.run("license", "issue", "--order", order, "--product", "sim", "--json", *terms)
    )
    return str(doc["id"])


def manager_call(
    vendor: Vendor, method: str, path: str, session: str | None, doc: Any = None
) -> tuple[int, Any]:
    return admin(vendor, method, path, session, doc)


def signed_in(vendor: Vendor, token: str, email: str = MIA) -> str:
    assert manager_call(
        vendor, "POST", "/v1/manager/enrol", None, {"token": token, "password": PASSWORD}
    ) == (200, {"email": email})
    status, doc = manager_call(
        vendor, "POST", "/v1/manager/session", None, {"email": email, "password": PASSWORD}
    )
    assert status == 201, doc
    return str(doc["token"])


def test_a_license_manager_enrols_signs_in_and_assigns_within_their_orders(
    books: Vendor,
) -> None:
    mine = issue_under(books, "o-1", "--seats", "5", "--max-users", "2")
    theirs = issue_under(books, "o-2", "--seats", "5", "--max-users", "2")
    key = books.run("api-keys", "create", "ops").strip()

    status, doc = admin(books, "PUT", "/v1/admin/orders/o-1/manager", key, {"email": MIA})
    assert status == 200 and doc["manager"] == MIA
    token = doc["enrolment_token"]
    orders = admin(books, "GET", "/v1/admin/orders", key)[1]
    assert [(o["id"], o["manager"], o["licenses"]) for o in orders] == [
        ("o-1", MIA, 1),
        ("o-2", None, 1),
    ]
    status, order = admin(books, "GET", "/v1/admin/orders/o-1", key)
    assert status == 200 and [lic["id"] for lic in order["licenses"]] == [mine]
    assert admin(books, "GET", "/v1/admin/orders/o-9", key)[0] == 404
    assert token.startswith("FLE-")

    # Enrolment: a made-up token, a short password, then the real one, once.
    bad = {"token": "FLE-made-up", "password": PASSWORD}
    assert manager_call(books, "POST", "/v1/manager/enrol", None, bad)[1]["error"]["code"] == (
        "ENROLMENT_INVALID"
    )
    short = {"token": token, "password": "short"}
    assert manager_call(books, "POST", "/v1/manager/enrol", None, short)[0] == 400
    session = signed_in(books, token)
    again = {"token": token, "password": PASSWORD}
    assert manager_call(books, "POST", "/v1/manager/enrol", None, again)[0] == 403

    # The e-mail in another case is the same manager.
    status, _ = manager_call(
        books, "POST", "/v1/manager/session", None, {"email": MIA.upper(), "password": PASSWORD}
    )
    assert status == 201
    # A wrong password and an unknown e-mail get the same answer.
    for who, password in ((MIA, "wrong password"), ("nobody@x.example", PASSWORD)):
        status, doc = manager_call(
            books, "POST", "/v1/manager/session", None, {"email": who, "password": password}
        )
        assert (status, doc["error"]["code"]) == (401, "UNAUTHORIZED")

    # A bad or missing session is refused.
    assert manager_call(books, "GET", "/v1/manager/licenses", None)[0] == 401
    assert manager_call(books, "GET", "/v1/manager/licenses", "FLS-made-up")[0] == 401

    status, docs = manager_call(books, "GET", "/v1/manager/licenses", session)
    assert status == 200
    assert [d["id"] for d in docs] == [mine]  # never the other order's license
    assert docs[0]["not_assigned"] is True and docs[0]["places_free"] == 2

    user = f"/v1/manager/licenses/{mine}/users/ann@customer.example"
    status, doc = manager_call(books, "POST", user, session)
    assert status == 200, doc
    assert doc["users"] == ["ann@customer.example"]
    assert doc["not_assigned"] is False and doc["places_free"] == 1
    manager_call(books, "POST", f"/v1/manager/licenses/{mine}/users/bo@customer.example", session)
    status, doc = manager_call(
        books, "POST", f"/v1/manager/licenses/{mine}/users/cy@customer.example", session
    )
    assert (status, doc["error"]["code"]) == (409, "MAX_USERS_REACHED")
    assert manager_call(books, "DELETE", user, session)[1]["users"] == ["bo@customer.example"]

    # The other order's license answers as if it did not exist, for reading and writing.
    status, doc = manager_call(
        books, "POST", f"/v1/manager/licenses/{theirs}/users/ann@customer.example", session
    )
    assert (status, doc["error"]["code"]) == (404, "LICENSE_NOT_FOUND")
    assert admin(books, "GET", f"/v1/admin/licenses/{theirs}", key)[1]["users"] == []
    # A manager's session is not an API key.
    assert admin(books, "GET", "/v1/admin/licenses", session)[0] == 401

    # The trail says who did what.
    status, changes = admin(books, "GET", f"/v1/admin/changes?subject=license:{mine}", key)
    actors = {(c["actor"], c["action"]) for c in changes}
    assert (f"manager:{MIA}", "user.assign") in actors
    assert (f"manager:{MIA}", "user.unassign") in actors

    # Signing out ends the session.
    assert manager_call(books, "DELETE", "/v1/manager/session", session)[0] == 204
    assert manager_call(books, "GET", "/v1/manager/licenses", session)[0] == 401


def test_the_vendor_manages_the_managers(books: Vendor) -> None:
    issue_under(books, "o-1", "--seats", "1", "--max-users", "1")
    issue_under(books, "o-2", "--seats", "1", "--max-users", "1")
    token = books.run("managers", "appoint", "o-1", MIA).strip()
    assert token.startswith("FLE-")
    session = signed_in(books, token)
    # An enrolled manager named on a second order needs no new token.
    out = books.run("managers", "appoint", "o-2", MIA)
    assert "already enrolled" in out
    listed = books.run("managers", "list")
    assert MIA in listed and "o-1, o-2" in listed and "yes" in listed
    status, docs = manager_call(books, "GET", "/v1/manager/licenses", session)
    assert status == 200 and {d["order"] for d in docs} == {"o-1", "o-2"}

    books.run("managers", "dismiss", "o-2")
    docs = manager_call(books, "GET", "/v1/manager/licenses", session)[1]
    assert {d["order"] for d in docs} == {"o-1"}

    # A reset ends the password and the sessions, and gives a new token.
    new = books.run("managers", "reset", MIA).strip()
    assert manager_call(books, "GET", "/v1/manager/licenses", session)[0] == 401
    status, _ = manager_call(
        books, "POST", "/v1/manager/session", None, {"email": MIA, "password": PASSWORD}
    )
    assert status == 401
    signed_in(books, new)

    books.run("managers", "appoint", "o-9", OTTO, code=1)  # no such order
    books.run("managers", "appoint", "o-1", "not-an-email", code=1)
    trail = books.run("history", "--subject", "order:o-1")
    assert "order.manager" in trail


def test_a_read_only_key_reads_and_changes_nothing(books: Vendor) -> None:
    lic = issue_under(books, "o-1", "--seats", "1", "--max-users", "1")
    key = books.run("api-keys", "create", "monitor", "--read-only").strip()
    assert admin(books, "GET", f"/v1/admin/licenses/{lic}", key)[0] == 200
    for method, path, doc in (
        ("POST", f"/v1/admin/licenses/{lic}/suspend", {}),
        ("PUT", "/v1/admin/orders/o-1/manager", {"email": MIA}),
        ("PUT", f"/v1/admin/licenses/{lic}/users/ann@customer.example", None),
    ):
        status, body = admin(books, method, path, key, doc)
        assert (status, body["error"]["code"]) == (403, "FORBIDDEN"), path
    assert admin(books, "GET", f"/v1/admin/licenses/{lic}", key)[1]["state"] == "active"
    assert "read" in books.run("api-keys", "list")


def test_the_openapi_document_covers_the_manager_routes(books: Vendor) -> None:
    status, doc = admin(books, "GET", "/v1/openapi.json", None)
    assert status == 200
    paths = doc["paths"]
    assert paths["/v1/manager/session"].keys() == {"post", "delete"}
    assert "get" in paths["/v1/manager/licenses"]
    assert paths["/v1/manager/licenses/{license_id}/users/{email}"].keys() == {"post", "delete"}
    assert paths["/v1/admin/orders/{order_id}/manager"].keys() == {"put", "delete"}
    assert paths["/v1/manager/licenses"]["get"]["security"] == [{"managerSession": []}]
    assert "security" not in paths["/v1/manager/enrol"]["post"]


def test_failed_sign_ins_are_limited_per_e_mail_and_per_address(tmp_path: Path) -> None:
    from floatd.authority.logic import Authority
    from floatd.authority.managers import FAILED_BURST, Managers
    from floatd.authority.store import AuthorityStore, Product, Terms
    from floatd.errors import AuthorityError

    now = [1_000_000.0]
    authority = Authority(AuthorityStore(tmp_path / "a.sqlite3"), clock=lambda: now[0])
    authority.add_product(Product("sim", "Sim", authorization="user"))
    authority.issue_license("o-1", Terms(products=["sim"], seats=1, max_users=1), now[0])
    managers = Managers(authority)
    managers.enrol(str(managers.appoint("o-1", MIA)), PASSWORD)

    def code(email: str, password: str, address: str | None = "10.0.0.1") -> str:
        try:
            managers.sign_in(email, password, address)
        except AuthorityError as exc:
            return exc.error_code
        return "ok"

    for _ in range(FAILED_BURST):
        assert code(MIA, "wrong password") == "UNAUTHORIZED"
    # Now the right password too is refused, from that address and from any other.
    assert code(MIA, PASSWORD) == "RATE_LIMITED"
    assert code(MIA, PASSWORD, "10.0.0.2") == "RATE_LIMITED"
    # The address is held back for other accounts as well.
    assert code("nobody@x.example", PASSWORD) == "RATE_LIMITED"
    now[0] += 61  # one failure's worth refilled
    assert code(MIA, PASSWORD, "10.0.0.2") == "ok"


def test_a_managers_assignments_reach_the_site_and_count_its_own_users(
    tmp_path: Path, books: Vendor
) -> None:
    """End to end with a real floatd: a user the manager assigns can lease on the
    customer's server, the site's own users take places the manager sees, and a
    user the manager unassigns loses their lease at the next refresh."""
    from daemon import Daemon
    from test_integration import floatd_cli
    from test_online import acquire_as, names, site, until

    from floatd.client.simple import SimpleClient

    doc = json.loads(
        books.run(
            "license",
            "issue",
            "--order",
            "o-1",
            "--product",
            "sim",
            "--seats",
            "5",
            "--max-users",
            "2",
            "--json",
        )
    )
    lic, key = doc["id"], doc["license_key"]
    session = signed_in(books, books.run("managers", "appoint", "o-1", MIA).strip())
    ann = f"/v1/manager/licenses/{lic}/users/ann@customer.example"
    assert manager_call(books, "POST", ann, session)[0] == 200

    config = site(tmp_path, books)
    assert floatd_cli("activate", "--license-key", key, "--config", str(config)).returncode == 0
    assert (
        floatd_cli(
            "users", "assign", "bob@customer.example", "--product", "sim", "--config", str(config)
        ).returncode
        == 0
    )
    password = floatd_cli(
        "users", "passwd", "ann@customer.example", "--generate", "--config", str(config)
    )
    assert password.returncode == 0, password.stderr
    with Daemon(config, tmp_path / "floatd.log") as d:
        d.start()

        def mine() -> dict[str, Any]:
            return dict(manager_call(books, "GET", "/v1/manager/licenses", session)[1][0])

        until(lambda: mine()["local_users"] == {"sim": ["bob@customer.example"]}, "bob shown")
        assert mine()["places_free"] == 0
        cy = f"/v1/manager/licenses/{lic}/users/cy@customer.example"
        assert manager_call(books, "POST", cy, session)[1]["error"]["code"] == "MAX_USERS_REACHED"
        with SimpleClient("127.0.0.1", d.port, timeout=10) as c:
            assert c.hello()["ok"]
            got = acquire_as(c, "ann@customer.example", password.stdout.strip())
            assert got["ok"], got
            assert manager_call(books, "DELETE", ann, session)[0] == 200
            until(lambda: "license_user_unassigned" in names(d), "the unassignment at a refresh")
            renewed = c.request("renew", lease=got["lease"], token=got["token"])
            assert renewed["error"]["code"] == "LEASE_NOT_FOUND"


def test_the_managers_admin_routes_over_http(books: Vendor) -> None:
    issue_under(books, "o-1", "--seats", "1", "--max-users", "1")
    key = books.run("api-keys", "create", "ops").strip()
    token = admin(books, "PUT", "/v1/admin/orders/o-1/manager", key, {"email": MIA})[1][
        "enrolment_token"
    ]
    session = signed_in(books, token)
    status, listed = admin(books, "GET", "/v1/admin/managers", key)
    assert (status, listed) == (200, [{"email": MIA, "enrolled": True, "orders": ["o-1"]}])
    assert admin(books, "PUT", "/v1/admin/orders/o-9/manager", key, {"email": MIA})[0] == 404
    assert admin(books, "PUT", "/v1/admin/orders/o-1/manager", key, {"email": "x"})[0] == 400

    status, doc = admin(books, "POST", f"/v1/admin/managers/{MIA}/reset", key, {})
    assert status == 200 and doc["enrolment_token"].startswith("FLE-")
    assert manager_call(books, "GET", "/v1/manager/licenses", session)[0] == 401
    assert admin(books, "POST", "/v1/admin/managers/nobody@x.example/reset", key, {})[0] == 404

    assert admin(books, "DELETE", "/v1/admin/orders/o-1/manager", key) == (
        200,
        {"order": "o-1", "manager": None},
    )
    status, doc = admin(books, "DELETE", "/v1/admin/orders/o-1/manager", key)
    assert (status, doc["error"]["code"]) == (404, "MANAGER_NOT_FOUND")
    assert admin(books, "GET", "/v1/admin/managers", key)[1][0]["orders"] == []
    # Without a key, every one of them is refused.
    for method, path in (
        ("GET", "/v1/admin/managers"),
        ("GET", "/v1/admin/orders"),
        ("PUT", "/v1/admin/orders/o-1/manager"),
        ("DELETE", "/v1/admin/orders/o-1/manager"),
        ("POST", f"/v1/admin/managers/{MIA}/reset"),
    ):
        assert admin(books, method, path, None, {})[0] == 401, path


async def test_a_failure_inside_a_route_costs_one_answer_not_the_server(tmp_path: Path) -> None:
    from floatd.authority.api import AuthorityApi
    from floatd.authority.logic import Authority
    from floatd.authority.store import AuthorityStore

    api = AuthorityApi(Authority(AuthorityStore(tmp_path / "a.sqlite3")))

    async def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    api.portal.respond = broken  # type: ignore[method-assign]
    reply = await api.respond(b"GET", b"/portal/", b"")
    assert reply.status == 500
    assert json.loads(reply.body)["error"]["code"] == "INTERNAL"
    health = await api.respond(b"GET", b"/v1/health", b"")
    assert health.status == 200


def test_hostile_requests_to_the_manager_routes_and_the_portal(books: Vendor) -> None:
    """Malformed input gets a 4xx answer, never a 500, and the authority lives on."""
    import http.client

    issue_under(books, "o-1", "--seats", "1", "--max-users", "1")
    session = signed_in(books, books.run("managers", "appoint", "o-1", MIA).strip())

    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/v1/manager/session", b"[1, 2]", {}),
        ("POST", "/v1/manager/session", b'{"email": 5, "password": null}', {}),
        ("POST", "/v1/manager/enrol", b'{"token": "' + b"x" * 5000 + b'"}', {}),
        ("GET", "/v1/manager/licenses", b"", {"authorization": "Bearer \u00ff"}),
        ("POST", "/v1/manager/licenses/%00/users/%ff", b"", {"authorization": "Bearer x"}),
        ("PUT", "/v1/manager/licenses", b"", {}),
        ("GET", "/v1/manager/nothing", b"", {}),
        ("POST", "/portal/sign-in", b"\xff\xfe", {"cookie": "floatd_portal_csrf=a"}),
        ("POST", "/portal/sign-in", b"&".join([b"a=b"] * 50), {}),
        ("POST", "/portal/licenses//assign", b"csrf=x", {"cookie": 'floatd_portal="\\'}),
        ("POST", "/portal/licenses/x/y/z", b"", {"cookie": "floatd_portal=nonsense"}),
        ("GET", "/portal/enrol?token=%3Cscript%3E", b"", {}),
        ("DELETE", "/portal/", b"", {}),
        ("GET", "/portal/../v1/health", b"", {}),
        ("GET", "/portal/?" + "&".join(f"a{i}=b" for i in range(30)), b"", {}),
        ("POST", "/portal/sign-in", "csrf=é&email=x".encode(), {"cookie": "floatd_portal_csrf=a"}),
        ("POST", "/portal/sign-out", "csrf=é".encode(), {"cookie": f"floatd_portal={session}"}),
    ]
    for method, path, body, extra in cases:
        conn = http.client.HTTPConnection("127.0.0.1", books.process.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=extra)
            response = conn.getresponse()
            page = response.read()
        finally:
            conn.close()
        assert 400 <= response.status < 500 or response.status == 200, (path, response.status)
        assert b"<script>" not in page, path  # reflected input is escaped
    assert admin(books, "GET", "/v1/health", None) == (200, {"status": "ok"})
