"""The admin socket: how ``floatd status|leases|revoke|reload`` reach the daemon.

A unix socket (mode 0660, so the service's group can administer it and nobody
else can) carrying the lease protocol's framing: a 4-byte length and a msgpack
map, one request and then its answer, as often as the client likes.  Reusing
the codec means the same size bounds and the same hostile-input handling; file
permissions are the authentication.

Requests are ``{"cmd": ..., ...}``; answers are ``{"ok": true, ...}`` or
``{"ok": false, "error": {"code", "message"}}``.  A listing (leases, the
products of a status, the leases a command ended) can outgrow one frame, so it
comes as several frames, each with ``"more": true`` but the last; the client
joins their lists.  No answer ever carries a lease token (the server keeps only
digests).  No command can end the daemon: whatever a handler raises becomes
an ``INTERNAL`` answer and one error line in the log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from floatd.client.frames import receive_frame, receive_frame_blocking
from floatd.core.codec import MAX_FRAME, FrameDecoder, encode_frame
from floatd.core.limits import peer_ip
from floatd.errors import AdminError, ConfigError, FloatdError, InternalError
from floatd.logs import get_logger
from floatd.store.audit import iso

if TYPE_CHECKING:
    from floatd.daemon.views import AdminOps

SOCKET_MODE = 0o660
IDLE_TIMEOUT = 30.0
CLIENT_TIMEOUT = 15.0
_CHUNK_BYTES = MAX_FRAME // 2
_MAX_UNIX_PATH = 107

log = get_logger()


# --- daemon side ----------------------------------------------------------------


def bind_admin_socket(path: Path) -> trio.SocketListener:
    """Listen on ``path``.  A stale socket left by a crash is replaced; a live
    one means another daemon runs with this config, which is an error."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigError("admin.socket", f"path is longer than {_MAX_UNIX_PATH} bytes")
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise ConfigError("admin.socket", f"{path} exists and is not a socket")
        if _is_live(path):
            raise AdminError(f"another floatd is already serving the admin socket {path}")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o117)  # never world-accessible, not even for a moment
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class AdminServer:
    def __init__(self, server: AdminOps, path: Path) -> None:
        self.server = server
        self.path = path

    async def serve(self, listener: trio.SocketListener) -> None:
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                request = None
                with trio.move_on_after(IDLE_TIMEOUT):
                    request = await receive_frame(stream, decoder)
                if request is None:
                    return  # the end of the stream, or idle too long
                for frame in await self.answer(request):
                    try:
                        data = encode_frame(frame)
                    except ValueError:  # one row too big for a frame: say so, not die
                        data = encode_frame(_failure(InternalError("answer too large")))
                    await stream.send_all(data)
        except FloatdError as exc:  # bad framing: say so once and hang up
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_frame(_failure(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def answer(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The frames that answer one admin request."""
        server = self.server
        cmd = request.get("cmd")
        try:
            if cmd == "status":
                return _split({"ok": True, **server.status_document()}, "products")
            if cmd == "leases":
                product = request.get("product")
                if product is not None and not isinstance(product, str):
                    raise AdminError("'product' must be a string")
                return _split({"ok": True, "leases": await server.lease_rows(product)}, "leases")
            if cmd == "revoke":
                lease_id = request.get("lease")
                if not isinstance(lease_id, str) or not 1 <= len(lease_id) <= 256:
                    raise AdminError("'lease' must be a lease id")
                row = await server.revoke(lease_id)
                return [{"ok": True, "lease": row}]
            if cmd == "reload":
                return [{"ok": True, **await server.reload()}]
            if cmd == "explain":
                return [{"ok": True, **await server.explain(**_who(request))}]
            if cmd == "clock_reset":
                return [{"ok": True, **await server.reset_clock()}]
            if cmd == "end_user":
                email, product = request.get("email"), request.get("product")
                if not isinstance(email, str) or not isinstance(product, str):
                    raise AdminError("'email' and 'product' must be strings")
                return _split({"ok": True, "ended": await server.end_user(email, product)}, "ended")
            raise AdminError(f"unknown admin command {str(cmd)[:40]!r}")
        except FloatdError as exc:
            return [_failure(exc)]
        except Exception as exc:  # a bug in one command must not end the daemon
            log.error("admin_command_failed", cmd=str(cmd)[:40], reason=repr(exc)[:500])
            return [_failure(InternalError(f"the daemon failed to answer {str(cmd)[:40]!r}"))]


#: The identities ``floatd policy explain`` may give, as the service names them.
_WHO = ("product", "fingerprint", "user", "host", "ip", "instance")


def _who(request: dict[str, Any]) -> dict[str, Any]:
    """The explain command's identities, checked like an acquire's fields."""
    who = {key: request[key] for key in _WHO if request.get(key) is not None}
    for key, value in who.items():
        if not isinstance(value, str) or not 1 <= len(value) <= 256:
            raise AdminError(f"{key!r} must be a string of 1 to 256 characters")
    if "product" not in who:
        raise AdminError("'product' is required")
    if "ip" in who and peer_ip(who["ip"]) is None:
        raise AdminError(f"{who['ip']!r} is not an IP address")
    who.setdefault("fingerprint", "")
    return who


def _failure(exc: FloatdError) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, ConfigError):
        error.update(key=exc.key, problem=exc.problem)
    return {"ok": False, "error": error}


def _split(answer: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``answer`` as frames that each fit: the first carries every other field,
    and the list under ``key`` is spread over as many frames as it needs."""
    rows = answer[key]
    head = {k: v for k, v in answer.items() if k != key}
    frames: list[dict[str, Any]] = []
    chunk: list[Any] = []
    size = len(msgpack.packb(head))
    for row in rows:
        n = len(msgpack.packb(row))
        if chunk and size + n > _CHUNK_BYTES:
            frames.append({**head, key: chunk, "more": True})
            head, chunk, size = {"ok": True}, [], 0
        chunk.append(row)
        size += n
    frames.append({**head, key: chunk, "more": False})
    return frames


def lease_row(lease: Any) -> dict[str, Any]:
    """What the admin sees of a lease: everything but its token digest and meta."""
    return {
        "id": lease.id,
        "product": lease.product,
        "fingerprint": lease.fingerprint,
        "instance": lease.instance,
        "user": lease.user,
        "hostname": lease.hostname,
        "address": lease.peer,
        "granted": iso(lease.granted_at),
        "expires": iso(lease.expires_at),
        "granted_at": lease.granted_at,
        "expires_at": lease.expires_at,
        # Borrowed for offline use: held until then, whatever happens.
        "borrowed_until": iso(lease.expires_at) if lease.borrowed else None,
    }


# --- CLI side ----------------------------------------------------------------------


class AdminClient:
    """A blocking client; the CLI has nothing else to do while it waits."""

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(os.fspath(path))
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise AdminError(f"floatd is not running (no daemon at {path})") from None
            if exc.errno == errno.EACCES:
                raise AdminError(
                    f"permission denied on {path} (run as root or a member of its group)"
                ) from None
            raise AdminError(f"cannot reach the daemon at {path}: {exc.strerror}") from None
        self._decoder = FrameDecoder()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> dict[str, Any]:
        try:
            frame = receive_frame_blocking(self._sock.recv, self._decoder)
        except TimeoutError:
            raise AdminError("the daemon did not answer in time") from None
        except OSError as exc:
            raise AdminError(f"lost the daemon: {exc.strerror}") from None
        if frame is None:
            raise AdminError("the daemon closed the admin connection")
        if not frame.get("ok"):
            error = frame.get("error") or {}
            if error.get("code") == ConfigError.code:  # exit status 2, like check-config
                raise ConfigError(str(error.get("key")), str(error.get("problem")))
            raise AdminError(str(error.get("message", "refused")))
        return frame

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        try:
            self._sock.sendall(encode_frame({"cmd": cmd, **args}))
        except OSError as exc:
            raise AdminError(f"lost the daemon: {exc.strerror}") from None
        answer = self._recv()
        # A listing spread over frames (see _split): join its lists.
        while answer.pop("more", False):
            more = self._recv()
            for key, value in more.items():
                if isinstance(value, list):
                    answer[key] = [*answer.get(key, ()), *value]
            answer["more"] = more.get("more", False)
        return answer

    def leases(self, product: str | None = None) -> list[dict[str, Any]]:
        args = {"product": product} if product is not None else {}
        rows: list[dict[str, Any]] = self.call("leases", **args)["leases"]
        return rows
