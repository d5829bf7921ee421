"""TLS on the lease port: real sockets on loopback, certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
import trio
from conftest import SERVER_ID, MemoryStore, WireClient, make_config, running
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from floatd.daemon.server import Server
from floatd.errors import ConfigError


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_leasing_over_tls(tmp_path: Path, vendor_key: Ed25519PrivateKey) -> None:
    cert, key = make_cert(tmp_path, "floatd")
    other_ca, _ = make_cert(tmp_path, "someone-else")
    async with running(
        tmp_path, vendor_key, server__tls_cert=str(cert), server__tls_key=str(key)
    ) as server:
        port = server.ports[0][1]
        trusting = ssl.create_default_context(cafile=str(cert))
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=trusting)
        c = WireClient(stream)
        assert (await c.hello())["ok"]
        got = await c.acquire()
        assert got["ok"] and got["lease"]
        await stream.aclose()

        # A client that does not trust our certificate refuses the handshake.
        distrusting = ssl.create_default_context(cafile=str(other_ca))
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=distrusting)
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()

        # Plaintext on the TLS port gets no protocol answer, and the server goes on.
        plain = await trio.open_tcp_stream("127.0.0.1", port)
        pc = WireClient(plain)
        await pc.send("hello", versions=[1], client="plain/1")
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await pc.recv()
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=trusting)
        c = WireClient(stream)
        assert (await c.hello())["ok"]
        await stream.aclose()


def test_unreadable_certificate_is_a_config_error(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cfg = make_config(
        tmp_path,
        vendor_key,
        server__tls_cert=str(tmp_path / "missing.crt"),
        server__tls_key=str(tmp_path / "missing.key"),
    )
    with pytest.raises(ConfigError) as err:
        Server(cfg, MemoryStore(), SERVER_ID)
    assert err.value.key == "server.tls_cert"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cfg = make_config(
        tmp_path, vendor_key, server__tls_cert=str(garbage), server__tls_key=str(garbage)
    )
    with pytest.raises(ConfigError):
        Server(cfg, MemoryStore(), SERVER_ID)


async def test_the_client_library_verifies_the_certificate_and_sends_the_token(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    import floatd.client as fc
    from floatd.errors import Forbidden

    cert, key = make_cert(tmp_path, "floatd")
    other_ca, _ = make_cert(tmp_path, "someone-else")
    async with running(
        tmp_path,
        vendor_key,
        server__tls_cert=str(cert),
        server__tls_key=str(key),
        server__client_tokens=["s3cret-token"],
    ) as server:
        where = f"127.0.0.1:{server.ports[0][1]}"
        async with fc.lease(where, "app", tls=str(cert), token="s3cret-token") as held:
            assert held.id and held.product["code"] == "app"
        # A certificate from a CA we were not told to trust: no connection.
        with pytest.raises(fc.Unreachable):
            async with fc.lease(where, "app", tls=str(other_ca), token="s3cret-token"):
                pass
        # The right certificate but no token: the server's refusal, typed.
        with pytest.raises(Forbidden):
            async with fc.lease(where, "app", tls=str(cert)):
                pass


async def test_the_status_endpoint_over_https(
    tmp_path: Path, vendor_key: Ed25519PrivateKey
) -> None:
    cert, key = make_cert(tmp_path, "floatd")
    async with running(
        tmp_path,
        vendor_key,
        status__listen="127.0.0.1:0",
        status__tls_cert=str(cert),
        status__tls_key=str(key),
    ) as server:
        host, port = server.status_ports[0]
        trusting = ssl.create_default_context(cafile=str(cert))
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=trusting, https_compatible=True
        )
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"ok"}\n')
