"""From a node's command-line arguments to its security material."""

from __future__ import annotations

from pathlib import Path

from shard.wire.certs import SECRET_FILE
from shard.wire.seal import load_secret
from shard.wire.tls import NodeTLS


def node_tls(args) -> NodeTLS | None:
    """The node's mTLS identity; None only under the explicit --insecure."""
    return None if args.insecure else NodeTLS.load(args.certs, args.node_id)


def node_secrets(args) -> list[bytes] | None:
    """Deployment secrets for the AEAD layer: the node seals with the first and opens
    frames sealed with any (several while a new secret is rolled out).
    From --secret files, else <certs>/deployment.secret. Without one the payloads travel
    unsealed, which only --insecure allows."""
    paths = list(args.secret or [])
    if not paths and args.certs and (Path(args.certs) / SECRET_FILE).is_file():
        paths = [Path(args.certs) / SECRET_FILE]
    if not paths:
        if args.insecure:
            return None
        raise SystemExit(f"shard {args.command}: no deployment secret: give --secret FILE "
                         f"or put {SECRET_FILE} in the certs folder (shard certs local writes one)")
    return [load_secret(path) for path in paths]


def advertised_address(args, port: int) -> str:
    """Where other nodes dial this one: --advertise, else --advertise-host and the bound port."""
    return args.advertise or f"{args.advertise_host}:{port}"
