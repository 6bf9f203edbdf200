"""systemd's readiness protocol (sd_notify(3)), in a few lines and no library.

Under `Type=notify` the service manager passes a datagram socket in $NOTIFY_SOCKET and
waits for `READY=1` before it counts the service as started; `STOPPING=1` says a stop began.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("sambaproxy")


def notify(state: str, environ: dict[str, str]) -> bool:
    """Send `state` to the service manager, if one listens; True once sent. Never raises."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False  # not under systemd (or a socket kind this does not speak, such as vsock)
    if address[0] == "@":
        address = "\0" + address[1:]  # Linux abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s through NOTIFY_SOCKET: %s", state, exc.strerror or exc)
        return False
    return True
