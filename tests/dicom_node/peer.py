"""pynetdicom as a test peer, with the hub's answer to an association request read from
the PDUs the peer received.

pynetdicom's requestor can miss its own rejection: when connecting, sending the
A-ASSOCIATE-RQ, receiving the A-ASSOCIATE-RJ and closing all happen before its thread
wakes from waiting for the connection, it finds the socket closed and aborts, and
``is_rejected`` stays False (seen with three pytest-xdist workers on two cores). The
A-ASSOCIATE-RJ PDU it received is the hub's answer either way.
"""

from __future__ import annotations

import weakref
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ

_rejections: weakref.WeakKeyDictionary[Association, tuple[int, int, int]] = (
    weakref.WeakKeyDictionary()
)


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """`ae.associate(host, port, **kwargs)`, remembering the A-ASSOCIATE-RJ (if any) the
    peer received, for `rejection`."""
    seen: list[tuple[int, int, int]] = []

    def on_pdu(event: evt.Event) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            seen.append((int(pdu.result), int(pdu.source), int(pdu.reason_diagnostic)))

    handlers = [*kwargs.pop("evt_handlers", []), (evt.EVT_PDU_RECV, on_pdu)]
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    if seen:
        _rejections[assoc] = seen[0]
    return assoc


def rejection(assoc: Association) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ the peer of `assoc` (made by
    `associate`) received, or None if it received none."""
    return _rejections.get(assoc)
