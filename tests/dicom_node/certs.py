"""Test PKI for DICOM TLS: a CA, a server certificate for 127.0.0.1 and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key on disk."""

    cert: Path
    key: Path

    @property
    def sha256(self) -> str:
        """The certificate's SHA-256 fingerprint (hex), as saf pins peers by."""
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs."""

    ca: Path
    server: KeyPair
    client: KeyPair
    """A client certificate issued by `ca` (register it with `saf clinic add --cert`)."""
    other_client: KeyPair
    """Another client certificate by the same CA: valid, but not the registered one."""
    stranger_ca: Path
    stranger: KeyPair
    """A client certificate from a CA the node does not trust."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _make_ca(directory: Path, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, Path]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    *,
    server: bool,
) -> KeyPair:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = KeyPair(directory / f"{name}.crt.pem", directory / f"{name}.key.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_pki(directory: Path) -> Pki:
    """A fresh CA with server and client certificates, and an untrusted CA's client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _make_ca(directory, "saf-test-ca")
    other_cert, other_key, other_path = _make_ca(directory, "stranger-ca")
    return Pki(
        ca=ca_path,
        server=_issue(directory, "saf-node", (ca_cert, ca_key), server=True),
        client=_issue(directory, "modality-a", (ca_cert, ca_key), server=False),
        other_client=_issue(directory, "modality-b", (ca_cert, ca_key), server=False),
        stranger_ca=other_path,
        stranger=_issue(directory, "stranger", (other_cert, other_key), server=False),
    )
