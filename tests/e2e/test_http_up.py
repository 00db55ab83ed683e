"""The HTTP front through the `shard` command, as an operator starts it: `shard up
--http-listen` keeps a whole swarm of processes serving the OpenAI-compatible API until
Ctrl-C; the coordinator's flags refuse what would expose it unguarded."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from shard.cli import node_config
from shard.config import ConfigError

from support.reference import reference_greedy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_up_serves_the_http_api_until_interrupted(tinystories_dir):
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "shard", "up", "--model", str(tinystories_dir), "--device", "cpu",
                           "--stages", "1", "--max-tokens", "4", "--http-listen", f"127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("OpenAI-compatible API on" in line for line in lines):
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)[-3000:]
            lines.append(up.stderr.readline())
        body = json.dumps({"model": tinystories_dir.name, "prompt": [1, 415, 1022, 264, 727], "max_tokens": 12,
                           "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        expected = reference_greedy(tinystories_dir, [1, 415, 1022, 264, 727], 12)
        assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
        from transformers import AutoTokenizer

        assert answer["choices"][0]["text"] == AutoTokenizer.from_pretrained(tinystories_dir).decode(
            expected, skip_special_tokens=True)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.mark.parametrize("flags, message", [
    (["--http-listen", "0.0.0.0:8000"], "give --api-key-file"),
    (["--api-key-file", "keys"], "--api-key-file needs --http-listen"),
    (["--http-listen", "127.0.0.1:8000", "--api-key-file", "absent"], "absent"),
    (["--http-listen", "127.0.0.1:8000", "--api-key-file", "empty"], "holds no key"),
    (["--http-listen", "127.0.0.1:8000", "--http-tls", "--insecure"], "--http-tls"),
    (["--http-listen", "nowhere"], "not HOST:PORT"),
], ids=["public-without-keys", "keys-without-http", "missing-keys", "empty-keys", "tls-insecure", "bad-address"])
def test_coordinator_http_flags_refuse_unguarded_or_broken_setups(tinystories_dir, tmp_path, flags, message):
    (tmp_path / "empty").write_text("# no keys yet\n\n")
    (tmp_path / "keys").write_text("sk-1\n")
    flags = [str(tmp_path / f) if f in ("keys", "absent", "empty") else f for f in flags]
    argv = ["coordinator", "--model", str(tinystories_dir), "--registry", "127.0.0.1:1", *flags]
    argv += [] if "--insecure" in flags else ["--insecure"]
    with pytest.raises(ConfigError, match=message):
        node_config(argv)


def test_keys_allow_any_address_and_the_model_name_defaults_to_the_folder(tinystories_dir, tmp_path):
    (tmp_path / "keys").write_text("sk-1\n")
    config = node_config(["coordinator", "--model", str(tinystories_dir), "--registry", "127.0.0.1:1", "--insecure",
                          "--http-listen", "0.0.0.0:8000", "--api-key-file", str(tmp_path / "keys")])
    assert config.served_model_name == tinystories_dir.name


def test_certs_api_key_adds_a_fresh_key_to_an_owner_only_file(tmp_path, capsys):
    from shard.cli import main
    from shard.config import api_keys

    path = tmp_path / "api-keys"
    assert main(["certs", "api-key", str(path)]) == 0
    assert main(["certs", "api-key", str(path)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(set(printed)) == 2 and api_keys(path) == frozenset(printed)
    assert path.stat().st_mode & 0o777 == 0o600
