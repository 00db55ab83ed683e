"""shard.client.Client against a real swarm (in-process servers, real mTLS, the real
TinyStories weights): sync and asyncio, iterator streaming, certificates from a folder
(shard's names or a Kubernetes TLS Secret's) or PEM bytes, deadlines, one exception per
kind of failure, and a stream left early that cancels its generation."""

import asyncio
import shutil
import threading
import time

import grpc
import pytest

from shard.client import AccessDenied, Client, Credentials, DeadlineExceeded, InvalidRequest

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]


@pytest.fixture(scope="module")
def swarm(tinystories_dir, tmp_path_factory):
    """The swarm's event loop runs in a thread of its own, so that the synchronous client
    can block this one."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine, timeout=120):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    context = inprocess_swarm(tinystories_dir, 2, tmp_path_factory.mktemp("swarm"))
    swarm = run(context.__aenter__())
    swarm.run = run
    yield swarm
    run(context.__aexit__(None, None, None))
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def no_sessions_left(swarm) -> None:
    deadline = time.monotonic() + 10
    while any(stage.node.info().sessions for stage in swarm.stages) or swarm.coordinator.node.admission.running:
        assert time.monotonic() < deadline, "a session was left behind"
        time.sleep(0.05)


def test_sync_stream_from_a_certs_folder_is_the_greedy_output(swarm, tinystories_dir):
    with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
        stream = client.stream(prompt_ids=PROMPT, max_tokens=24, stop_at_eos=False)
        deltas = list(stream)
        assert client.status().ready
    ids = [i for delta in deltas for i in delta.ids]
    assert ids == list(stream.summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 24)
    assert "".join(delta.text for delta in deltas) == stream.summary.text


def test_async_with_pem_bytes_and_kubernetes_secret_names(swarm, tmp_path, tinystories_dir):
    secret = tmp_path / "secret"  # a kubernetes.io/tls Secret with ca.crt, as mounted
    secret.mkdir()
    for source, name in (("ca.pem", "ca.crt"), ("client.pem", "tls.crt"), ("client.key", "tls.key")):
        shutil.copy(swarm.certs / source, secret / name)
    from_bytes = Credentials(*((swarm.certs / name).read_bytes() for name in ("ca.pem", "client.pem", "client.key")))

    async def both():
        async with Client(swarm.coordinator.address, credentials=from_bytes, timeout=60) as a, \
                Client(swarm.coordinator.address, credentials=secret) as b:
            whole = await a.agenerate(prompt_ids=PROMPT, max_tokens=12, stop_at_eos=False, draft="none")
            streamed = [delta async for delta in b.astream(prompt_ids=PROMPT, max_tokens=12, stop_at_eos=False)]
            return whole, streamed, (await b.astatus()).node_id

    whole, streamed, node_id = asyncio.run(both())
    expected = reference_greedy(tinystories_dir, PROMPT, 12)
    assert list(whole.summary.output_ids) == whole.streamed_ids == expected
    assert [i for delta in streamed for i in delta.ids] == expected
    assert node_id == "coordinator"


def test_errors_are_typed_and_clear(swarm):
    with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.generate("", max_tokens=4)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in str(caught.value)
        with pytest.raises(DeadlineExceeded):
            client.generate(prompt_ids=PROMPT, max_tokens=400, stop_at_eos=False, draft="none", timeout=0.2)
    # A stage's certificate is not a client's: the public API refuses it.
    with Client(swarm.coordinator.address, credentials=swarm.certs, node_id="stage-0") as stage:
        with pytest.raises(AccessDenied) as caught:
            stage.generate("Once", max_tokens=2)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(ValueError, match="max_tokens"):
        Client(swarm.coordinator.address, insecure=True).stream("Once", max_tokens=-1)
    no_sessions_left(swarm)


def test_leaving_a_stream_early_cancels_the_generation(swarm):
    before = [stage.node.info().positions_computed for stage in swarm.stages]
    with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
        with client.stream(prompt_ids=PROMPT, max_tokens=400, stop_at_eos=False, draft="none") as stream:
            next(iter(stream))
    no_sessions_left(swarm)
    computed = [stage.node.info().positions_computed - b for stage, b in zip(swarm.stages, before)]
    assert all(n < 400 for n in computed), computed


def test_credentials_are_checked_when_made(swarm, tmp_path):
    pem = {name: (swarm.certs / name).read_bytes() for name in ("ca.pem", "client.pem", "client.key", "stage-0.key")}
    with pytest.raises(ValueError, match="not the certificate's"):
        Credentials(pem["ca.pem"], pem["client.pem"], pem["stage-0.key"])
    with pytest.raises(ValueError, match="PEM"):
        Credentials(b"ca", pem["client.pem"], pem["client.key"])
    with pytest.raises(FileNotFoundError, match="tls.crt"):
        Credentials.from_folder(tmp_path)
    with pytest.raises(ValueError, match="credentials"):
        Client("localhost:1")
