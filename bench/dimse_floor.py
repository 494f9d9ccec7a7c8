"""saf's DICOM node with ingest switched off: acknowledges every C-STORE, stores nothing.

The floor of any receiver built on pynetdicom the way saf's node is (chunked
receive into a spool file, same AE settings, same association handling). The
ingest benchmark runs it as the receiver "floor" so that saf's own cost is the
difference between the two. Usage: python -m bench.dimse_floor DATA_DIR PORT
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicom_node.scp import DicomNode
from saf.hub import Hub
from saf.settings import Settings


class FloorNode(DicomNode):
    """A DicomNode whose C-STORE handler only counts."""

    def _on_store(self, event: evt.Event) -> Dataset | int:
        print("received", flush=True)  # one line per instance: the benchmark counts them
        return 0x0000


def main() -> None:
    data_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    settings = Settings(data_dir=data_dir, dicom_port=port, dicom_accept_unknown=True)
    node = FloorNode(Hub.open(settings, create=True))
    node.start()
    print(f"floor node listening on port {port}", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    node.stop()


if __name__ == "__main__":
    main()
