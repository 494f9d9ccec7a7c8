"""An in-process pynetdicom Storage SCP for forwarding tests: records what a destination got."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event


@dataclass
class Received:
    """The datasets (File Meta attached) a StoreSCP was sent, and by which calling AE."""

    datasets: list[Dataset] = field(default_factory=list)
    calling_aets: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uids(self, keyword: str = "SOPInstanceUID") -> set[str]:
        """The values of `keyword` over everything received."""
        with self.lock:
            return {str(ds.get(keyword, "")) for ds in self.datasets}


@contextmanager
def store_scp(
    aet: str = "DEST", ssl_context: ssl.SSLContext | None = None
) -> Iterator[tuple[int, Received]]:
    """Run a Storage SCP on 127.0.0.1 (any free port) accepting every storage class and
    transfer syntax; yields (port, what it received)."""
    received = Received()

    def on_store(event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with received.lock:
            received.datasets.append(ds)
            received.calling_aets.append(event.assoc.requestor.ae_title)
        return 0x0000

    ae = AE(ae_title=aet)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        ssl_context=ssl_context,
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def make_reply_sr(evidence: list[Path], out: Path, text: str, series_number: int = 900) -> Path:
    """A consult reply's report as a highdicom Comprehensive SR: a new series of the
    evidence's study, same patient (what the reply workflow stores back)."""
    title = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
    root = hd.sr.ContainerContentItem(name=title, template_id="2000")
    root.ContentSequence = [
        hd.sr.TextContentItem(
            name=CodedConcept("121071", "DCM", "Finding"),
            value=text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    sr = hd.sr.ComprehensiveSR(
        evidence=[dcmread(p) for p in evidence],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="saf tests",
        is_complete=True,
        is_final=True,
    )
    sr.save_as(out, enforce_file_format=True)
    return out
