"""The product as a user gets it: a wheel and an sdist built from the repository's tracked
files alone (no generated stubs lying around), installed into fresh virtual environments
outside the repository and run from there."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from support.reference import reference_greedy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STUBS = re.compile(r"shard/v1/\w+_pb2(_grpc)?\.py$")
PROTOS = re.compile(r"shard/protos/shard/v1/\w+\.proto$")


def run(*argv, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def tracked_files(into: Path) -> Path:
    """A copy of what git tracks (links kept as links): a clean checkout of this tree."""
    listed = run("git", "ls-files", "-z", cwd=REPO)  # the suite runs from a checkout, as CI does
    for name in listed.stdout.split("\0"):
        source = REPO / name
        if name and os.path.lexists(source):
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name, follow_symlinks=False)
    return into


def build(source: Path, out: Path, *kinds: str) -> list[Path]:
    """PEP 517 builds with this environment's setuptools and grpcio-tools (offline)."""
    calls = "; ".join(f"b.build_{kind}({str(out)!r})" for kind in kinds)
    run(sys.executable, "-c", f"from setuptools import build_meta as b; {calls}", cwd=source)
    return sorted(out.iterdir())


def fresh_venv(path: Path, *requirements: str) -> tuple[Path, float]:
    started = time.monotonic()
    venv.create(path, with_pip=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(path / "bin" / "python", "-m", "pip", "install", "-q", *requirements, cwd=path, timeout=600, env=env)
    return path / "bin", time.monotonic() - started


def assert_wheel_members(wheel: Path, protos: int) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"shard", "shard-0.1.0.dist-info"}  # one top-level package
    assert len([n for n in names if STUBS.match(n)]) >= 8, names
    assert len([n for n in names if PROTOS.match(n)]) == protos
    assert "shard/services/stage/main.py" in names and not any("tests/" in n for n in names)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dists")
    source = tracked_files(root / "checkout")
    assert not list((source / "shard/v1").glob("*_pb2*.py"))  # nothing pre-generated
    wheel, sdist = build(source, root / "dist", "sdist", "wheel")
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (from_sdist,) = build(root / "unpacked" / sdist.name.removesuffix(".tar.gz"), root / "from-sdist", "wheel")
    return {"wheel": wheel, "sdist": sdist, "wheel_from_sdist": from_sdist, "checkout": source}


def test_wheel_and_sdist_hold_the_protos_the_stubs_and_one_package(dists):
    protos = len(list((dists["checkout"] / "protos/shard/v1").glob("*.proto")))
    assert_wheel_members(dists["wheel"], protos)
    assert_wheel_members(dists["wheel_from_sdist"], protos)
    with tarfile.open(dists["sdist"]) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
        assert not any(member.issym() for member in archive.getmembers())
    assert len([n for n in names if PROTOS.match(n)]) == protos and "setup.py" in names
    assert not [n for n in names if STUBS.match(n)]  # generated when a wheel is built from it
    assert not [n for n in names if n.startswith(("services/", "tests/"))]


def test_server_install_runs_a_swarm_from_outside_the_repository(dists, tinystories_dir, tmp_path):
    torch = "torch==" + metadata.version("torch").split("+")[0]  # the build pip already has (CPU here)
    bin_dir, seconds = fresh_venv(tmp_path / "venv", f"{dists['wheel']}[server]", torch)
    print(f"server install into a fresh venv: {seconds:.0f} s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    assert run(bin_dir / "shard", "--version", cwd=elsewhere).stdout.strip() == "shard 0.1.0"
    where = run(bin_dir / "python", "-c", "import shard, shard.client, shard.services.stage.main; "
                "from importlib.resources import files; "
                "print(shard.__file__); print(' '.join(sorted(p.name for p in (files('shard') / 'protos/shard/v1').iterdir())))",
                cwd=elsewhere).stdout.splitlines()
    assert Path(where[0]).is_relative_to(tmp_path / "venv"), where
    assert where[1].split() == sorted(path.name for path in (REPO / "protos/shard/v1").glob("*.proto"))

    done = run(bin_dir / "shard", "up", "--model", tinystories_dir, "--stages", "2", "--max-tokens", "8",
               "--ignore-eos", "--json", cwd=elsewhere, timeout=240)
    result = json.loads(done.stdout)
    assert result["output_ids"] == reference_greedy(tinystories_dir, result["prompt_ids"], 8)
    assert result["text"].strip()


def test_client_install_pulls_no_torch(dists, tmp_path):
    bin_dir, seconds = fresh_venv(tmp_path / "venv", str(dists["wheel"]))
    print(f"client install into a fresh venv: {seconds:.0f} s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = bin_dir / "python"

    assert run(python, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('transformers'))",
               cwd=elsewhere).stdout.split() == ["None", "None"]  # not installed at all
    imported = run(python, "-c", "import sys, shard.client; from shard.v1 import api_pb2; "
                   "print(sorted({'torch', 'transformers', 'opentelemetry'} & set(sys.modules)))",
                   cwd=elsewhere).stdout.strip()
    assert imported == "[]"
    assert "generate" in run(bin_dir / "shard", "--help", cwd=elsewhere).stdout
    assert "--coordinator" in run(bin_dir / "shard", "generate", "--help", cwd=elsewhere).stdout
    run(bin_dir / "shard", "certs", "local", elsewhere / "certs", "--stages", "1", cwd=elsewhere)
    assert (elsewhere / "certs" / "client.pem").is_file()

    refused = subprocess.run([bin_dir / "shard", "stage", "--model", "m", "--registry", "r:1", "--insecure"],
                             cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith("shard stage: needs the server extra (torch, transformers,"), line
    assert line.endswith('not installed): pip install "shard[server]"'), line
