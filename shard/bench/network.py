"""Put a delaying relay in front of every node of a ring, in a thread of its own so the
relays' timing does not depend on what the benchmark client does."""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import contextmanager

from shard.bench.relay import DelayRelay
from shard.bench.topology import Topology


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def emulated_links(topology: Topology):
    """Yields {node_id: (listen, advertise)} for LocalSwarm: each node listens on a private
    port and is advertised at its relay, which delays its inbound ring edge."""
    nodes = ["coordinator", *(f"stage-{i}" for i in range(topology.stages))]
    if not topology.edge_rtts_ms:
        yield {}
        return
    ports = {node: (free_port(), free_port()) for node in nodes}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="wan-relays", daemon=True)
    thread.start()
    relays = [DelayRelay(relay, backend, topology.inbound_one_way_seconds(node))
              for node, (backend, relay) in ports.items()]
    for relay in relays:
        asyncio.run_coroutine_threadsafe(relay.start(), loop).result()
    try:
        yield {node: (f"127.0.0.1:{backend}", f"127.0.0.1:{relay}") for node, (backend, relay) in ports.items()}
    finally:
        for relay in relays:
            asyncio.run_coroutine_threadsafe(relay.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
