"""Signed statements for receipts: canonical JSON signed with a node's certificate key.

The key is the node's mTLS key (shard.wire.certs makes ECDSA P-256 keys: signatures are
ECDSA with SHA-256, DER-encoded; an Ed25519 key signs as Ed25519). What is signed is the
canonical JSON of the statement: UTF-8, keys sorted, no insignificant whitespace, numbers
as Python's json module writes them (floats in shortest round-trip form)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shard.wire.certs import Identity, identity_from_pem


class SignatureError(ValueError):
    """A statement whose signature, certificate or signer does not hold."""


def canonical(statement: dict) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def digest(statement: dict) -> str:
    """sha256 (hex) of the statement's canonical bytes: how an envelope names it."""
    return hashlib.sha256(canonical(statement)).hexdigest()


def fingerprint(cert_pem: str | bytes) -> str:
    """sha256 (hex) of the certificate's DER encoding."""
    cert_pem = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


class Signer:
    """Signs with a node's certificate key (its PEM key and certificate, as NodeTLS holds them)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes):
        self._key = serialization.load_pem_private_key(key_pem, password=None)
        self.cert_pem = cert_pem.decode()
        self.identity = identity_from_pem(cert_pem)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        raise TypeError(f"cannot sign receipts with a {type(self._key).__name__}")

    def signed(self, statement: dict) -> dict:
        """The statement with its signature and the signer's certificate, as a receipt holds it."""
        return {"statement": statement, "signature": base64.b64encode(self.sign(canonical(statement))).decode(),
                "certificate": self.cert_pem}


def verify_signed(signed: dict, *, claimed: Identity, ca_pem: bytes | None = None,
                  at: float | None = None) -> None:
    """Check that `signed` (statement, signature, certificate) was signed by the certificate's
    key, that the certificate names `claimed`, and with a CA, that the CA issued it and it
    was valid at time `at` (seconds since the epoch). Raises SignatureError saying why not."""
    try:
        cert = x509.load_pem_x509_certificate(signed["certificate"].encode())
        signature = base64.b64decode(signed["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as error:
        raise SignatureError(f"{claimed}: unreadable certificate or signature ({error})") from None
    identity = identity_from_pem(signed["certificate"].encode())
    if identity != claimed:
        raise SignatureError(f"{claimed} signed with the certificate of {identity or 'no Shard identity'}")
    key = cert.public_key()
    data = canonical(signed["statement"])
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            raise SignatureError(f"{claimed}: unsupported key type {type(key).__name__}")
    except InvalidSignature:
        raise SignatureError(f"{claimed}: the signature does not match the statement") from None
    if ca_pem is not None:
        _check_issued(cert, claimed, ca_pem, at)


def _check_issued(cert: x509.Certificate, claimed: Identity, ca_pem: bytes, at: float | None) -> None:
    issuers = x509.load_pem_x509_certificates(ca_pem)
    for ca in issuers:
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise SignatureError(f"{claimed}: its certificate was not issued by the given CA")
    if at is not None:
        when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise SignatureError(f"{claimed}: its certificate was not valid when the receipt was made")
