"""Put this folder on PYTHONPATH to forbid network access: any connect() to a non-loopback
internet address raises (unix sockets and 127.0.0.0/8, ::1 stay allowed)."""

import ipaddress
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _allowed(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _guard(address):
    if not _allowed(address):
        raise OSError(f"network access blocked by the offline test: connect({address!r})")


def connect(self, address):
    _guard(address)
    return _connect(self, address)


def connect_ex(self, address):
    _guard(address)
    return _connect_ex(self, address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket._bilora_offline_guard = True
