"""What this installation of Shard holds. The base install is the client (`shard generate`,
`shard certs`, `shard.client`); the nodes need the `server` extra (torch, transformers, ...).
Read from the installed package's own metadata, so the list lives only in pyproject.toml."""

from __future__ import annotations

import re
from importlib import metadata

SERVER_HINT = 'pip install "shard[server]"'


def version() -> str:
    try:
        return metadata.version("shard")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def missing_server_packages() -> list[str]:
    """The `server` extra's distributions that are not installed; [] where that cannot be
    told (a checkout run without installing), leaving any ImportError to speak."""
    try:
        requirements = metadata.requires("shard") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        if not re.search(r"""extra\s*==\s*["']server["']""", requirement):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing
