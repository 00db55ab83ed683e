"""A stage whose block changes under load: no frame may run on the new block and still
go the old way (a tail turned middle stage once sent hidden states to the coordinator)."""

import asyncio

import grpc
import pytest

from shard.errors import ShardError
from shard.node.stage import StageNode
from shard.v1 import frame_pb2, registry_pb2
from shard.wire.codec import encode_ids
from shard.wire.edge import Edge


def ring(*blocks: tuple[str, int, int]) -> registry_pb2.Plan:
    plan = registry_pb2.Plan(version=len(blocks), num_layers=2, coordinator_id="coordinator",
                             coordinator_address="127.0.0.1:9", ready=True)
    for node_id, start, end in blocks:
        plan.stages.add(node_id=node_id, address=f"127.0.0.1:{10 + start}", layer_start=start, layer_end=end)
    return plan


def chunk(session_id: str) -> frame_pb2.Frame:
    header = frame_pb2.FrameHeader(session_id=session_id, chunk_id=1, start_pos=0, num_tokens=3,
                                   kind=frame_pb2.FRAME_KIND_FORWARD, sender="coordinator", receiver="stage-0")
    return frame_pb2.Frame(header=header, payload=encode_ids([5, 6, 7]))


def test_frames_computed_on_a_new_block_go_out_on_its_new_edge(tinystories_dir):
    async def scenario():
        node = StageNode(node_id="stage-0", model_dir=str(tinystories_dir), tls=None, secrets=None,
                         memory_budget_bytes=1 << 30, progress=False)
        try:
            await node.apply_plan(ring(("stage-0", 0, 2)))  # the whole model: the tail
            done = asyncio.Event()
            node.accept(chunk("before"), None, lambda header: done.set())
            await done.wait()
            replan = asyncio.create_task(node.apply_plan(ring(("stage-0", 0, 1), ("stage-1", 1, 2))))
            await asyncio.sleep(0)  # the re-plan starts
            refused = 0
            while not replan.done():  # every frame offered while the block changes is turned away
                with pytest.raises(ShardError) as error:
                    node.accept(chunk(f"during-{refused}"), None)
                assert error.value.code == grpc.StatusCode.UNAVAILABLE
                refused += 1
                await asyncio.sleep(0.001)
            await replan
            done.clear()
            node.accept(chunk("after"), None, lambda header: done.set())
            await done.wait()
            outbox = []
            while not node._outbox.empty():
                outbox.append(node._outbox.get_nowait())
            return refused, outbox
        finally:
            await node.close()

    refused, outbox = asyncio.run(scenario())
    assert refused > 0
    edges = [item for item in outbox if isinstance(item, Edge)]
    frames = [(item.header.session_id, item.header.kind) for item in outbox if not isinstance(item, Edge)]
    # The tail's result, then the edge to stage-1, then hidden states for stage-1 only.
    assert [edge.receiver for edge in edges] == ["coordinator", "stage-1"]
    assert outbox.index(edges[1]) == len(outbox) - 2
    assert frames == [("before", frame_pb2.FRAME_KIND_RESULT), ("after", frame_pb2.FRAME_KIND_FORWARD)]
