"""TCP tuning shared by the node's service and client sides."""

from __future__ import annotations

import socket

from pynetdicom import evt


def set_no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket.

    A DIMSE message goes out as several writes (command PDU, then data PDUs); with
    Nagle on, the peer's delayed ACK stalls every message by up to ~40 ms.
    """
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
