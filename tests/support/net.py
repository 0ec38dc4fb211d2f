"""This machine's addresses, for tests that need a peer that is not on the loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import socket


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine outside 127.0.0.0/8 that a local socket can bind to
    and connect to (the source of the default route, else one the host name resolves to);
    None when there is none (a container with the loopback only)."""
    candidates = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.254", 9))  # no packet is sent: this only picks the route's source
        candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    with contextlib.suppress(OSError):
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    for address in candidates:
        if not ipaddress.ip_address(address).is_loopback and _bindable(address):
            return address
    return None


def _bindable(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def free_port_on(address: str) -> int:
    """A TCP port nobody uses on ``address`` now (to bind a client's side to a known port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]
