"""Shard's wire layer: everything that crosses the network between nodes.

``certs`` makes the deployment CA and node certificates, ``tls`` turns them into mTLS
gRPC ports and channels and checks each caller's role and node id.
"""
