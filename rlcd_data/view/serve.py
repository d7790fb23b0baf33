"""`rlcd-data view`: open a pair source and serve its page on a local port with uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import sys

from ..errors import RlcdError
from .app import create_app
from .pairs import PairTable

DEFAULT_PORT = 8765
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); RlcdError in one line when the port is taken or the address is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise RlcdError(f"port {port} on {host} is taken: choose another with --port") from None
        raise RlcdError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def serve(table: PairTable, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          open_browser: bool = False, on_ready=None) -> None:
    """Serve ``table``'s page until interrupted.

    Args:
        host: the address to listen on; anything but loopback needs ``token``.
        token: the secret every request must carry (printed once in the URL, never written anywhere).
        on_ready: called with the URL once the server listens (the CLI prints it).

    Raises:
        RlcdError: a non-loopback address without a token, a port that is taken.
    """
    import uvicorn

    loopback = is_loopback(host)
    if not loopback and not token:
        raise RlcdError(f"{host} is not a loopback address: serving it needs a token (the CLI makes one)")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    app = create_app(table, token=token, loopback_hosts=LOOPBACK_NAMES if loopback else None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if on_ready:
        on_ready(url)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        print("rlcd-data view: stopped", file=sys.stderr)
