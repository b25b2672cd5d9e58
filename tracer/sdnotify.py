"""A minimal sd_notify(3) client: tell systemd (Type=notify) how the service is doing.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE``
assignments sent to the socket named by ``$NOTIFY_SOCKET``.  A name starting
with ``@`` is an abstract socket (the ``@`` stands for the leading NUL byte).
Outside systemd the variable is unset and every call is a cheap no-op that
returns False, so callers never need to check whether they run as a service.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. ``"READY=1"``); True if it was delivered to systemd."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        # systemd went away or the socket is not reachable (e.g. another
        # mount namespace): a status message is never worth failing for.
        return False


def ready() -> bool:
    """Startup is complete (attached, listening): systemd's start job succeeds."""
    return notify("READY=1")


def stopping() -> bool:
    """Shutdown has begun (detaching programs may take a moment)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status shown by `systemctl status` (newlines would end the field)."""
    return notify("STATUS=" + " ".join(text.splitlines()))
