"""Shared fixtures: tiny random models built once per session, the real TinyStories model,
and a spy on safetensors reads. Reusable non-fixture helpers live in tests/support/."""

import asyncio
from pathlib import Path

import pytest
import torch

from shard.model import checkpoint
from shard.local import shared_model_dir
from shard.model.synthetic import ARCHS, build_tiny_model

from support.swarm import inprocess_swarm


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch -> model dir for every tiny arch, plus "llama-sharded" (several files + index)."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}
    dirs["llama-sharded"] = build_tiny_model("llama", root / "llama-sharded", sharded=True)
    return dirs


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    path = shared_model_dir()
    if path is None:
        pytest.skip("the shared real model ../shared/models/tinystories-656k is absent")
    return path


@pytest.fixture(scope="module")
def tinystories_swarm(tinystories_dir, tmp_path_factory):
    """A 2-stage swarm of the real model kept up for a whole test module, in an event loop
    of its own: `swarm.run(coroutine)` runs a client call in it."""
    loop = asyncio.new_event_loop()
    context = inprocess_swarm(tinystories_dir, 2, tmp_path_factory.mktemp("swarm"))
    swarm = loop.run_until_complete(context.__aenter__())
    swarm.run = loop.run_until_complete
    yield swarm
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


class SafetensorsSpy:
    """Wraps safetensors.safe_open as the checkpoint module uses it; records files and tensors read."""

    def __init__(self, real):
        self.real = real
        self.opened: list[Path] = []
        self.reads: list[tuple[Path, str]] = []  # (file, tensor) for every tensor read

    def __call__(self, file, *args, **kwargs):
        self.opened.append(Path(file))
        return _SpiedFile(self, Path(file), self.real(file, *args, **kwargs))

    @property
    def tensors_read(self) -> list[str]:
        return [name for _, name in self.reads]


class _SpiedFile:
    def __init__(self, spy, path, handle):
        self.spy, self.path, self.handle = spy, path, handle

    def __enter__(self):
        self.file = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, name):
        return self.file.get_slice(name)

    def get_tensor(self, name):
        self.spy.reads.append((self.path, name))
        return self.file.get_tensor(name)


@pytest.fixture
def safetensors_spy(monkeypatch) -> SafetensorsSpy:
    spy = SafetensorsSpy(checkpoint.safe_open)
    monkeypatch.setattr(checkpoint, "safe_open", spy)
    return spy


# Tiny models' ops are far too small to split across threads: one thread is several times
# faster, and leaves the other core to the servers the tests start.
torch.set_num_threads(1)
