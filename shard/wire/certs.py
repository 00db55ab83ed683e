"""Deployment certificates: a private CA and one certificate per node.

A node's identity is the URI SAN ``shard://<role>/<node_id>`` of its certificate, so
a peer's role and id come from the verified TLS handshake, never from a request field.

The certificate also names the identity as a DNS SAN, ``Identity.dns_name``, so that a
node dialling another can make the TLS handshake itself check who answered (the dialler
verifies that name instead of the host it dialled):

    <label>.<role>.shard.internal

where <label> is the node id itself when it is a lowercase DNS label ([a-z0-9-], no
leading or trailing hyphen, not starting with "x--"), and otherwise the unpadded,
lowercase base32 of the id's UTF-8 bytes in pieces of 60 characters, each piece a label
prefixed with "x--". DNS names compare case-insensitively, so ids that differ only in case (or
use "_" or ".") get the encoded, exact form; readable ids stay readable.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("registry", "coordinator", "stage", "client")
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
SECRET_FILE = "deployment.secret"  # the AEAD layer's secret, beside the certificates
CA_CERT = "ca.pem"
CA_KEY = "ca.key"

_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DNS_LABEL = re.compile(r"(?!x--)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
IDENTITY_DOMAIN = "shard.internal"
_IDENTITY_URI = re.compile(r"shard://([a-z]+)/([A-Za-z0-9._-]{1,64})")
# Tolerate small clock differences between machines of one deployment.
_CLOCK_SKEW = dt.timedelta(minutes=5)


def check_node_id(node_id: str) -> None:
    """Raise ValueError unless ``node_id`` is 1-64 of [A-Za-z0-9._-] (it names files)."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"invalid node id {node_id!r}: need 1-64 of [A-Za-z0-9._-]")


@dataclass(frozen=True)
class Identity:
    role: str
    node_id: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        check_node_id(self.node_id)

    @property
    def uri(self) -> str:
        return f"shard://{self.role}/{self.node_id}"

    @property
    def dns_name(self) -> str:
        """The DNS SAN naming this identity (the form is in the module's docstring)."""
        if _DNS_LABEL.fullmatch(self.node_id):
            label = self.node_id
        else:
            encoded = base64.b32encode(self.node_id.encode()).decode().rstrip("=").lower()
            label = ".".join("x--" + encoded[i:i + 60] for i in range(0, len(encoded), 60))
        return f"{label}.{self.role}.{IDENTITY_DOMAIN}"

    def __str__(self) -> str:
        return f"{self.role}/{self.node_id}"


def identity_from_pem(cert_pem: bytes) -> Identity | None:
    """The Shard identity in a certificate; None if it carries none (or several)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        m = _IDENTITY_URI.fullmatch(uri)
        if m and m[1] in ROLES:
            found.append(Identity(m[1], m[2]))
    # Two identities in one certificate would be ambiguous: trust neither.
    return found[0] if len(found) == 1 else None


def create_ca(
    directory: str | os.PathLike,
    *,
    common_name: str = "Shard deployment CA",
    days: int = 3650,
    overwrite: bool = False,
) -> None:
    """Write a new CA (``ca.pem``, ``ca.key``) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (d / CA_CERT, d / CA_KEY) if p.exists()]
    if existing and not overwrite:
        # Replacing a CA silently would orphan every certificate issued by it.
        raise FileExistsError(f"CA already exists: {existing[0]} (use overwrite=True)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(d / CA_KEY, _key_pem(key), 0o600)
    _write_atomic(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def issue(
    directory: str | os.PathLike,
    *,
    role: str,
    node_id: str,
    hosts: Iterable[str] | None = None,
    days: int = 825,
) -> tuple[Path, Path]:
    """Sign a node certificate with the CA in ``directory``; returns (cert, key) paths."""
    d = Path(directory)
    identity = Identity(role, node_id)
    hosts = list(DEFAULT_HOSTS if hosts is None else hosts)
    for host in hosts:
        # A host name in the identity domain would let this certificate pass as another node.
        if host.lower().rstrip(".").endswith("." + IDENTITY_DOMAIN) or host.lower() == IDENTITY_DOMAIN:
            raise ValueError(f"host {host!r} lies in {IDENTITY_DOMAIN}, which names node identities")
    ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    # A leaf outliving its CA would fail verification anyway; say so in the cert.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(_san(identity, hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # Every node both serves and dials (stages push to the next stage).
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = d / f"{node_id}.pem", d / f"{node_id}.key"
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def create_deployment(
    directory: str | os.PathLike,
    nodes: Iterable[tuple[str, str]],
    hosts: Iterable[str] | None = None,
) -> None:
    """A CA (kept if one exists) and a certificate for each (role, node_id)."""
    d = Path(directory)
    nodes = [Identity(role, node_id) for role, node_id in nodes]  # validate before writing
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node ids in {ids}")
    hosts = None if hosts is None else list(hosts)
    if not (d / CA_CERT).exists() and not (d / CA_KEY).exists():
        create_ca(d)
    for n in nodes:
        issue(d, role=n.role, node_id=n.node_id, hosts=hosts)


def create_local_deployment(directory, stages: int, hosts=None) -> list[Path]:
    """Certificates for a one-machine swarm plus its deployment secret, if absent; returns
    what was written."""
    from shard.wire.seal import write_secret

    d = Path(directory)
    written = [] if (d / CA_CERT).exists() else [d / CA_CERT, d / CA_KEY]
    nodes = local_nodes(stages)
    create_deployment(d, nodes, hosts=hosts)
    written += [d / f"{node_id}{suffix}" for _, node_id in nodes for suffix in (".pem", ".key")]
    if not (d / SECRET_FILE).exists():
        write_secret(d / SECRET_FILE)
        written.append(d / SECRET_FILE)
    return written


def local_nodes(stages: int) -> list[tuple[str, str]]:
    """The nodes of a single-machine deployment with ``stages`` stages."""
    return [
        ("registry", "registry"),
        ("coordinator", "coordinator"),
        *(("stage", f"stage-{i}") for i in range(stages)),
        ("client", "client"),
    ]


def _san(identity: Identity, hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri),
                                     x509.DNSName(identity.dns_name)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def public_key_der(cert_pem: bytes) -> bytes:
    """The certificate's public key (SubjectPublicKeyInfo, DER): what a node tells the
    registry it will sign with."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
