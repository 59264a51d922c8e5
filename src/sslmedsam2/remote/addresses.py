"""What an address reaches: a server's host and a client's URL are judged by the same rule."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for `localhost` and any loopback IP address (bracketed IPv6 included): traffic that stays on this
    computer. A name other than localhost is not resolved and counts as beyond it."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
