"""The examples in examples/, run as a newcomer would: the Node.js one loads the .proto
files with @grpc/proto-loader, streams a generation over mutual TLS and gets exactly the
Python client's tokens (a bad request comes back as its gRPC status); the Python one
streams the same text."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shard.client import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node_example() -> Path:
    # Required, not skipped: the test suite's claim that any language can call Shard rests on it.
    assert shutil.which("node") and shutil.which("npm"), "the Node.js example needs node and npm (Node.js 18+)"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():  # `make setup` installs them
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund", "--prefix", str(EXAMPLE)],
                       check=True, timeout=300)
    return EXAMPLE / "generate.js"


def run_node(swarm, script: Path, *args: str) -> tuple[int, str, str]:
    # By name: the coordinator's certificate names localhost, and TLS does not send an IP as
    # the server name (Node warns).
    address = "localhost:" + swarm.coordinator.address.rpartition(":")[2]

    async def run():
        process = await asyncio.create_subprocess_exec(
            "node", str(script), "--coordinator", address, "--certs", str(swarm.certs), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 120)
        return process.returncode, out.decode(), err.decode()

    return swarm.run(run())


def test_node_streams_the_python_clients_tokens_over_mtls(tinystories_swarm, node_example):
    swarm = tinystories_swarm
    code, out, streamed = run_node(swarm, node_example, "--prompt", "Once upon a time", "--max-tokens", "24")
    assert code == 0, streamed

    async def python():
        async with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
            return await client.agenerate("Once upon a time", max_tokens=24)

    expected = swarm.run(python()).summary
    summary = json.loads(out)
    assert summary["output_ids"] == list(expected.output_ids) and len(expected.output_ids) > 0
    assert streamed == summary["text"] == expected.text
    assert summary["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")


def test_node_sees_a_bad_requests_status(tinystories_swarm, node_example):
    code, out, err = run_node(tinystories_swarm, node_example, "--prompt-ids", "1,99999", "--max-tokens", "4")
    assert code == 1 and out == ""
    assert err.startswith("INVALID_ARGUMENT: ") and "prompt_ids" in err


def test_python_example_streams_the_same_text(tinystories_swarm):
    swarm = tinystories_swarm

    async def both():
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "python" / "generate.py"), "--coordinator",
            swarm.coordinator.address, "--certs", str(swarm.certs), "--max-tokens", "16",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, err = await asyncio.wait_for(process.communicate(), 120)
        async with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
            expected = await client.agenerate("Once upon a time", max_tokens=16)
        return process.returncode, out.decode(), err.decode(), expected.summary

    code, out, err, expected = swarm.run(both())
    assert code == 0, err
    assert out == expected.text and f"[{expected.tokens} tokens" in err
