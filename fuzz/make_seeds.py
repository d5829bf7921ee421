"""Write the seed corpora (committed; rerun only to refresh them)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_files import KEY, SERVER

from floatd.core.codec import encode_frame
from floatd.core.entitlement import ActivationRequest, product_payload, sign_entitlement

HERE = Path(__file__).resolve().parent / "corpus"


def main() -> None:
    hello = encode_frame({"op": "hello", "id": 1, "versions": [1], "client": "seed/1"})
    seeds = {
        "hello": hello,
        "acquire": hello
        + encode_frame(
            {
                "op": "acquire",
                "id": 2,
                "product": "app",
                "fingerprint": "machine-0001",
                "instance": "1",
                "meta": {"k": "v"},
                "wait": 1.5,
            }
        ),
        "renew": hello + encode_frame({"op": "renew", "id": 3, "lease": "L", "token": "T"}),
        "info-ping": hello
        + encode_frame({"op": "info", "id": 4, "product": "app"})
        + encode_frame({"op": "ping", "id": 5}),
        "no-hello": encode_frame({"op": "ping", "id": 1}),
        "bad-length": b"\x00\x01\x00\x01garbage",
    }
    for name, data in seeds.items():
        (HERE / "protocol" / name).write_bytes(b"\x03" + data)
    payload = {
        "v": 1,
        "id": "ent-seed",
        "license": "lic",
        "customer": "c",
        "server": SERVER,
        "issued_at": 1_790_000_000,
        "not_before": None,
        "not_after": None,
        "refresh_by": None,
        "nonce": "n" * 22,
        "products": [product_payload("app", "App", 5, allowed_ips=["10.0.0.0/8"])],
    }
    (HERE / "entitlement" / "entitlement").write_text(sign_entitlement(KEY, payload))
    request = ActivationRequest("FLT-key", SERVER, "host", "n" * 22, 1_790_000_000, "0.1.0")
    (HERE / "entitlement" / "request").write_text(request.to_armored())


if __name__ == "__main__":
    main()
