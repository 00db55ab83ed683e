"""The wire's contract: protos/ passes `buf lint` under the committed buf.yaml (buf's
STANDARD rules plus COMMENTS), and the public API stays apart from node-to-node services."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shard.v1 import api_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_buf_lint_is_clean():
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.fail("buf is not installed: `pip install -e .[dev]` brings it (buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_public_api_file_holds_only_the_public_service():
    assert list(api_pb2.DESCRIPTOR.services_by_name) == ["InferenceService"]
    assert not api_pb2.DESCRIPTOR.dependencies  # a client needs no node-to-node message
