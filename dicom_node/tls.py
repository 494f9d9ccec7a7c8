"""DICOM TLS (PS3.15 Annex B): the node's and the sender's TLS contexts, TLS 1.2 or newer.

The node's context performs each handshake in the association's own thread.
pynetdicom wraps an accepted socket in its accept loop, and Python's default there
finishes the handshake before returning: one client that opens the TLS port and says
nothing would block every later connection. `_DeferredHandshakeContext` wraps without
the handshake (OpenSSL then does it on the first read, in the association's thread)
and bounds the socket with the network timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from pathlib import Path
from typing import Any

from saf.settings import Settings


class TLSConfigError(ValueError):
    """A TLS file that cannot be used; the message names the file and the problem."""


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands on first use, with a timeout."""

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The DICOM TLS port's context, or None when SAF_DICOM_TLS_CERT is not set.

    With SAF_DICOM_TLS_CA, a client certificate chaining to it is required (mutual TLS);
    which peer it belongs to is decided per association (saf.clinics.resolve_peer).
    """
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = settings.dicom_network_timeout
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings.dicom_tls_cert, settings.dicom_tls_key, "SAF_DICOM_TLS_CERT/KEY")
    if settings.dicom_tls_ca is not None:
        _load_ca(context, settings.dicom_tls_ca, "SAF_DICOM_TLS_CA")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A sender's context: verify the node against `ca` (system roots if None), and
    present `cert`/`key` when the node asks for a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(context, ca, "--ca")
    if cert is not None:
        _load_chain(context, cert, key, "--cert/--key")
    return context


def peer_cert_der(sock: object) -> bytes | None:
    """The DER client certificate the peer presented on `sock`; None if not TLS or none."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock.getpeercert(binary_form=True)
    except ValueError:  # handshake not done: the connection never got that far
        return None


def _require_file(path: Path, what: str) -> None:
    # ssl's own FileNotFoundError does not say which of the files is missing.
    if not path.is_file():
        raise TLSConfigError(f"{what}: no such file {path}")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    for path in (cert, key):
        if path is not None:
            _require_file(path, what)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"{what}: cannot load certificate {cert} with key {key or cert}: {exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    _require_file(ca, what)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"{what}: cannot load CA certificates from {ca}: {exc}") from None


class _PinnedSocket(ssl.SSLSocket):
    """Checks the server certificate's SHA-256 right after the handshake, so a pinned
    destination is refused before any DICOM byte (no association, not an abort later)."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        pin = getattr(self.context, "pin_sha256", None)
        if pin:
            der = self.getpeercert(binary_form=True) or b""
            seen = hashlib.sha256(der).hexdigest()
            if not hmac.compare_digest(seen, pin):
                self.close()
                raise ssl.SSLCertVerificationError(
                    f"server certificate SHA-256 {seen} is not the pinned {pin}"
                )


class _PinnedContext(ssl.SSLContext):
    """A client context that may carry a pinned server certificate fingerprint."""

    pin_sha256: str | None = None


def forward_context(settings: Settings | None, pin_sha256: str | None = None) -> ssl.SSLContext:
    """The context for C-STORE to a dicoms:// forwarding destination: TLS 1.2+, the
    destination's certificate verified against SAF_FORWARD_TLS_CA (else SAF_DICOM_TLS_CA,
    else the system roots) and its host name, optionally pinned to `pin_sha256`; the hub's
    SAF_DICOM_TLS_CERT/KEY offered as client certificate (mutual TLS)."""
    context = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca = (settings.forward_tls_ca or settings.dicom_tls_ca) if settings else None
    if settings is not None and ca is not None:
        _load_ca(
            context, ca, "SAF_FORWARD_TLS_CA" if settings.forward_tls_ca else "SAF_DICOM_TLS_CA"
        )
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings is not None and settings.dicom_tls_cert is not None:
        _load_chain(context, settings.dicom_tls_cert, settings.dicom_tls_key,
                    "SAF_DICOM_TLS_CERT/KEY")  # fmt: skip
    context.pin_sha256 = pin_sha256
    context.sslsocket_class = _PinnedSocket
    return context
