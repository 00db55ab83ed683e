"""mTLS for Shard's gRPC edges: credentials, ports, channels and per-RPC peer checks.

``tls=None`` everywhere means the explicit insecure mode (plaintext, no identities).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from shard.wire.certs import CA_CERT, ROLES, Identity, check_node_id, identity_from_pem

# What gRPC says when a server's certificate does not name the host (here: the identity)
# the channel verifies.
_MISMATCH = "Hostname Verification Check failed"
_MAX_MESSAGE = 256 * 1024 * 1024  # activation frames of long prompts are large

# Keepalive pings so a silently dead WAN peer (no FIN/RST) is noticed in ~30 s.
_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    *_KEEPALIVE,
    # Default is 2: the client would stop pinging an idle connection after two pings.
    ("grpc.http2.max_pings_without_data", 0),
)

# Pass to grpc.aio.server(options=...) for servers that channels above dial into.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    *_KEEPALIVE,
    # Accept the clients' 20 s pings; the default minimum (5 min) answers them with
    # GOAWAY "too_many_pings" and drops the connection.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would bind
    # "successfully" and share its traffic; fail loudly instead.
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class NodeTLS:
    """A node's CA, certificate and key (PEM), and the identity its certificate carries."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # keep private keys out of logs and tracebacks
    identity: Identity

    @classmethod
    def load(cls, directory: str | os.PathLike, node_id: str) -> NodeTLS:
        """Read ``ca.pem``, ``<node_id>.pem`` and ``<node_id>.key`` from ``directory``."""
        check_node_id(node_id)
        d = Path(directory)
        paths = (d / CA_CERT, d / f"{node_id}.pem", d / f"{node_id}.key")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(
                    errno.ENOENT, "TLS file missing (create it with `shard certs`)", str(path)
                )
        ca_pem, cert_pem, key_pem = (p.read_bytes() for p in paths)
        identity = identity_from_pem(cert_pem)
        if identity is None or identity.node_id != node_id:
            raise ValueError(f"{paths[1]} does not carry the identity of node {node_id!r}")
        # Catch mismatched files here rather than as opaque handshake failures later.
        cert = x509.load_pem_x509_certificate(cert_pem)
        # ca.pem may hold several CAs while one is rolled over: trust all, be issued by one.
        if not any(_issued_by(cert, ca) for ca in x509.load_pem_x509_certificates(ca_pem)):
            raise ValueError(f"{paths[1]} was not issued by a CA in {paths[0]}")
        key = serialization.load_pem_private_key(key_pem, password=None)
        if key.public_key() != cert.public_key():
            raise ValueError(f"{paths[2]} is not the key of {paths[1]}")
        return cls(ca_pem, cert_pem, key_pem, identity)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def add_port(server: grpc.aio.Server, address: str, tls: NodeTLS | None) -> int:
    """Listen on ``address`` (mTLS, or plaintext if ``tls`` is None); returns the port."""
    if tls is None:
        return server.add_insecure_port(address)
    creds = grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
    )
    return server.add_secure_port(address, creds)


def open_channel(
    target: str, tls: NodeTLS | None, *, expect: Identity | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to ``target`` presenting this node's certificate; ``options`` override
    CHANNEL_OPTIONS.

    With ``expect``, the handshake fails unless the server's certificate names exactly
    that identity (its DNS SAN ``expect.dns_name``): a node that dials a peer from the
    plan talks to that peer, not to whoever answers at its address. Without it, the
    server's certificate must name the host dialled (what clients of the public API do)."""
    merged = {**dict(CHANNEL_OPTIONS), **dict(options)}
    if tls is not None and expect is not None:
        merged["grpc.ssl_target_name_override"] = expect.dns_name
    merged = list(merged.items())
    if tls is None:
        return grpc.aio.insecure_channel(target, options=merged)
    creds = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
    return grpc.aio.secure_channel(target, creds, options=merged)


def is_identity_mismatch(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call means the server's certificate names another identity than
    the one expected (gRPC reports only a failed handshake, UNAVAILABLE)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and _MISMATCH in (error.details() or "")


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The caller's identity from its verified certificate; None without one."""
    # auth_context() maps str keys to lists of bytes. A TLS peer has
    # "x509_pem_cert" (its leaf); a plaintext peer has none.
    pems = context.auth_context().get("x509_pem_cert")
    return identity_from_pem(pems[0]) if pems else None


async def require_peer(
    context: grpc.aio.ServicerContext,
    *roles: str,
    node_ids: Collection[str] | str | None = None,
) -> Identity | None:
    """Abort the RPC unless the caller has one of ``roles`` (and, if given, one of
    ``node_ids``). Returns the caller's identity, or None on a plaintext (insecure) call.
    """
    if not roles or not set(roles) <= set(ROLES):
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {roles}")
    if isinstance(node_ids, str):
        node_ids = {node_ids}  # a bare string would otherwise match by substring
    auth = context.auth_context()
    if auth.get("transport_security_type", [b"insecure"]) == [b"insecure"]:
        return None  # the operator chose insecure mode for this port
    identity = peer_identity(context)
    if identity is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "peer certificate carries no Shard identity (URI SAN shard://<role>/<node_id>)",
        )
    if identity.role not in roles or (node_ids is not None and identity.node_id not in node_ids):
        allowed = " or ".join(roles)
        if node_ids is not None:
            allowed += f" with node id in {sorted(node_ids)}"
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{identity.role} {identity.node_id!r} may not call this; allowed: {allowed}",
        )
    return identity
