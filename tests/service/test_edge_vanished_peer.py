"""An edge whose receiver vanished without a reset (a killed container's address, a dropped
link): the TCP connection opens but the TLS handshake never answers. The edge must not
hang on it: closing it (a new plan moved the receiver away) returns at once and fails a
send in progress, and a stream that does not open within CONNECT_SECONDS is reported
unreachable so the registry can re-plan. Before this, `close()` waited on a dial that no
gRPC timeout ended, and a spare's take-over stalled for good (seen in the compose stack)."""

import asyncio
import socket
import time

import pytest

from shard.v1 import frame_pb2
from shard.wire.certs import create_local_deployment
from shard.wire.edge import CONNECT_SECONDS, Edge, EdgeBroken
from shard.wire.tls import NodeTLS


@pytest.fixture
def silent_peer():
    """A listener whose kernel completes the TCP handshake and which never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def tls(tmp_path) -> NodeTLS:
    create_local_deployment(tmp_path, stages=2)
    return NodeTLS.load(tmp_path, "stage-0")


def frame() -> frame_pb2.Frame:
    return frame_pb2.Frame(header=frame_pb2.FrameHeader(session_id="s", kind=frame_pb2.FRAME_KIND_FORWARD))


def test_close_returns_at_once_and_fails_a_send_stuck_on_a_silent_peer(silent_peer, tls):
    async def scenario():
        edge = Edge(sender="stage-0", receiver="stage-1", address=silent_peer, tls=tls, secret=None)
        sending = asyncio.create_task(edge.send(frame()))
        await asyncio.sleep(0.5)  # the send is dialling now
        assert not sending.done()
        started = time.monotonic()
        await asyncio.wait_for(edge.close(), timeout=2)
        with pytest.raises(EdgeBroken, match="lost 1 frames"):
            await asyncio.wait_for(sending, timeout=2)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2


def test_a_stream_that_does_not_open_is_reported_unreachable_and_the_send_gives_up(silent_peer, tls):
    reports: list[tuple[str, str]] = []

    async def scenario():
        edge = Edge(sender="stage-0", receiver="stage-1", address=silent_peer, tls=tls, secret=None,
                    retry_seconds=1.0, on_unreachable=lambda *report: reports.append(report))
        try:
            with pytest.raises(EdgeBroken, match="the stream did not open"):
                await asyncio.wait_for(edge.send(frame()), timeout=CONNECT_SECONDS * 3)
        finally:
            await edge.close()

    asyncio.run(scenario())
    assert reports and reports[0] == ("stage-1", f"edge from stage-0: no connection within {CONNECT_SECONDS:g} s")
