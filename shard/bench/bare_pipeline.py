"""The floor for a 2-process split on this machine: the same two blocks in two bare
processes that pass the hidden state through a pipe, with no gRPC, TLS, sealing or event
loop. Whatever this loses against one process (waking an idle process, a core that idled
between chunks, the copy) no pipeline of separate processes avoids; the compute check
reports the swarm against it as well as against one process."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection

import torch

from shard.model.block import Block

_RESET, _STATS, _STOP = "reset", "stats", "stop"


def _serve(model_dir: str, start: int, end: int, first: bool, last: bool, threads: int,
           connection: Connection) -> None:
    torch.set_num_threads(threads)
    block = Block.load(model_dir, start, end, first=first, last=last, device="cpu", progress=False)
    cache, compute = block.new_cache(), 0.0
    connection.send("ready")
    while (message := connection.recv()) != _STOP:
        if message == _RESET:
            cache, compute = block.new_cache(), 0.0
        elif message == _STATS:
            connection.send(compute)
        else:
            position, array = message
            tensor = torch.from_numpy(array)
            began = time.perf_counter()
            if first:
                out = block.forward(cache, position, input_ids=tensor)
            else:
                out = block.forward(cache, position, hidden=tensor, num_outputs=1)
            compute += time.perf_counter() - began
            connection.send(out.numpy())  # numpy pickles as plain bytes; a tensor would go through shared memory


class BarePipeline:
    """Two processes holding layers [0, L/2) and [L/2, L) of a model; greedy decode."""

    def __init__(self, model_dir, num_layers: int, threads: int):
        context = multiprocessing.get_context("spawn")
        half = num_layers // 2
        self._ends, self._processes = [], []
        for start, end in ((0, half), (half, num_layers)):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, daemon=True, args=(
                str(model_dir), start, end, start == 0, end == num_layers, threads, theirs))
            process.start()
            self._ends.append(ours)
            self._processes.append(process)
        for end in self._ends:
            end.recv()

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        """(seconds per token, the blocks' compute seconds per token, the tokens)."""
        head, tail = self._ends
        for end in self._ends:
            end.send(_RESET)
        ids, position, out = torch.tensor(prompt).numpy(), 0, []
        began = time.perf_counter()
        for _ in range(max_tokens):
            head.send((position, ids))
            tail.send((position, head.recv()))
            token = tail.recv()
            position, ids = position + len(ids), token
            out.append(int(token[-1]))
        seconds = (time.perf_counter() - began) / max_tokens
        for end in self._ends:
            end.send(_STATS)
        return seconds, sum(end.recv() for end in self._ends) / max_tokens, out

    def close(self) -> None:
        for end in self._ends:
            end.send(_STOP)
        for process in self._processes:
            process.join(timeout=10)
