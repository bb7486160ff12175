"""Small network helpers."""

from __future__ import annotations

import socket

__all__ = ["get_host_ip"]

# TEST-NET-1 (RFC 5737): never routed. Connecting a UDP socket sends no packet; it only asks the
# kernel which local address it would use.
_PROBE_ADDRESS = ("192.0.2.1", 9)


def get_host_ip() -> str:
    """Return this machine's LAN IPv4 address, or ``"127.0.0.1"`` when it has none.

    No packet is sent: a UDP socket is connected (which only picks a route) and its local address
    read back.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(_PROBE_ADDRESS)
            address: str = sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    if not address or address.startswith("0."):
        return "127.0.0.1"
    return address
