"""mTLS between real in-process grpc.aio servers and channels on loopback.

A generic bytes-in/bytes-out service keeps these tests independent of Shard's protos.
"""

import asyncio
import contextlib
import dataclasses

import grpc
import pytest

from shard.wire.certs import Identity, create_deployment
from shard.wire.tls import (
    SERVER_OPTIONS,
    NodeTLS,
    add_port,
    open_channel,
    peer_identity,
    require_peer,
)

pytestmark = pytest.mark.timeout(15)


async def _whoami(request, context):
    identity = peer_identity(context)
    return str(identity).encode() if identity else b"anonymous"


async def _coordinator_only(request, context):
    await require_peer(context, "coordinator")
    return b"ok"


async def _upstream_only(request, context):
    await require_peer(context, "stage", "coordinator", node_ids={"stage-0"})
    return b"ok"


_HANDLER = grpc.method_handlers_generic_handler(
    "test.Tls",
    {
        "Whoami": grpc.unary_unary_rpc_method_handler(_whoami),
        "CoordinatorOnly": grpc.unary_unary_rpc_method_handler(_coordinator_only),
        "UpstreamOnly": grpc.unary_unary_rpc_method_handler(_upstream_only),
    },
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One deployment, plus a stranger whose certificate comes from another CA."""
    d = tmp_path_factory.mktemp("pki")
    nodes = [("coordinator", "coordinator"), ("stage", "stage-0"), ("stage", "stage-1")]
    create_deployment(d, nodes)
    other = tmp_path_factory.mktemp("other-ca")
    create_deployment(other, [("coordinator", "coordinator")])
    return {
        "server": NodeTLS.load(d, "stage-1"),
        "coordinator": NodeTLS.load(d, "coordinator"),
        "stage-0": NodeTLS.load(d, "stage-0"),
        "stranger": NodeTLS.load(other, "coordinator"),
        "dir": d,
    }


@contextlib.asynccontextmanager
async def _serving(tls):
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_HANDLER,))
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _call(channel, method, timeout=5):
    async with channel:
        return await channel.unary_unary(f"/test.Tls/{method}")(b"", timeout=timeout)


async def _code(channel, method="Whoami"):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(channel, method)
    return err.value.code()


def test_mtls_call_sees_client_identity(pki):
    async def scenario():
        async with _serving(pki["server"]) as target:
            return await _call(open_channel(target, pki["coordinator"]), "Whoami")

    assert asyncio.run(scenario()) == b"coordinator/coordinator"


def test_client_without_certificate_is_refused_and_server_keeps_serving(pki):
    async def scenario():
        async with _serving(pki["server"]) as target:
            bare = grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=pki["server"].ca_pem)
            )
            code = await _code(bare)
            return code, await _call(open_channel(target, pki["stage-0"]), "Whoami")

    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAVAILABLE, b"stage/stage-0")


def test_client_certificate_from_another_ca_is_refused(pki):
    # The stranger trusts our CA (so it accepts the server) but its own cert is foreign.
    stranger = dataclasses.replace(pki["stranger"], ca_pem=pki["server"].ca_pem)

    async def scenario():
        async with _serving(pki["server"]) as target:
            return await _code(open_channel(target, stranger))

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE


def test_server_from_another_ca_is_refused(pki):
    async def scenario():
        async with _serving(pki["server"]) as target:
            return await _code(open_channel(target, pki["stranger"]))

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_against_tls_server_fails(pki):
    async def scenario():
        async with _serving(pki["server"]) as target:
            return await _code(open_channel(target, None))

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "client, method, expected",
    [
        ("stage-0", "CoordinatorOnly", grpc.StatusCode.PERMISSION_DENIED),  # wrong role
        ("coordinator", "CoordinatorOnly", grpc.StatusCode.OK),
        ("stage-0", "UpstreamOnly", grpc.StatusCode.OK),
        ("coordinator", "UpstreamOnly", grpc.StatusCode.PERMISSION_DENIED),  # wrong node id
    ],
)
def test_require_peer(pki, client, method, expected):
    async def scenario():
        async with _serving(pki["server"]) as target:
            try:
                await _call(open_channel(target, pki[client]), method)
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

    code, details = asyncio.run(scenario())
    assert code == expected
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert repr(pki[client].identity.node_id) in details and "allowed" in details


def test_insecure_mode_allows_calls_without_identity():
    async def scenario():
        async with _serving(None) as target:
            return (
                await _call(open_channel(target, None), "Whoami"),
                await _call(open_channel(target, None), "CoordinatorOnly"),
            )

    assert asyncio.run(scenario()) == (b"anonymous", b"ok")


def test_load_names_the_missing_file(pki):
    with pytest.raises(FileNotFoundError, match="stage-7.pem"):
        NodeTLS.load(pki["dir"], "stage-7")
    assert pki["server"].identity == Identity("stage", "stage-1")
    assert "key_pem" not in repr(pki["server"])


class _FakeContext:
    """Just enough of grpc.aio.ServicerContext for require_peer."""

    def __init__(self, auth):
        self._auth = auth

    def auth_context(self):
        return self._auth

    async def abort(self, code, details=""):
        raise grpc.aio.AbortError(code, details)


def test_require_peer_unauthenticated_without_shard_identity(pki):
    # The CA certificate is valid TLS material but carries no shard:// URI SAN.
    ctx = _FakeContext(
        {"transport_security_type": [b"ssl"], "x509_pem_cert": [pki["server"].ca_pem]}
    )
    with pytest.raises(grpc.aio.AbortError) as err:
        asyncio.run(require_peer(ctx, "stage"))
    assert err.value.args[0] == grpc.StatusCode.UNAUTHENTICATED


def test_require_peer_bare_string_node_id_is_not_a_substring_match(pki):
    ctx = _FakeContext(
        {"transport_security_type": [b"ssl"], "x509_pem_cert": [pki["stage-0"].cert_pem]}
    )
    identity = asyncio.run(require_peer(ctx, "stage", node_ids="stage-0"))
    assert identity == Identity("stage", "stage-0")
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(require_peer(ctx, "stage", node_ids="stage-0-and-more"))


def test_a_ca_rolls_over_through_a_bundle(tmp_path, pki):
    """Rolling the CA without downtime: every node trusts old + new (ca.pem holds both),
    nodes move to certificates of the new CA one by one, old and new talk meanwhile, and a
    third CA is still refused."""
    new = tmp_path / "new"
    create_deployment(new, [("coordinator", "coordinator"), ("stage", "stage-1")])
    bundle = (pki["dir"] / "ca.pem").read_bytes() + (new / "ca.pem").read_bytes()
    (new / "ca.pem").write_bytes(bundle)
    moved = NodeTLS.load(new, "coordinator")  # a certificate of the second CA in the bundle
    old_server = dataclasses.replace(pki["server"], ca_pem=bundle)
    old_client = dataclasses.replace(pki["stage-0"], ca_pem=bundle)
    stranger = dataclasses.replace(pki["stranger"], ca_pem=bundle)

    async def scenario():
        async with _serving(old_server) as target:
            moved_to_old = await _call(open_channel(target, moved), "Whoami")
            refused = await _code(open_channel(target, stranger))
        async with _serving(NodeTLS.load(new, "stage-1")) as target:
            old_to_moved = await _call(open_channel(target, old_client), "Whoami")
        return moved_to_old, refused, old_to_moved

    assert asyncio.run(scenario()) == (b"coordinator/coordinator", grpc.StatusCode.UNAVAILABLE, b"stage/stage-0")


def test_a_certificate_no_trusted_ca_issued_does_not_load(tmp_path, pki):
    for name in ("stage-0.pem", "stage-0.key"):
        (tmp_path / name).write_bytes((pki["dir"] / name).read_bytes())
    (tmp_path / "ca.pem").write_bytes(pki["stranger"].ca_pem)
    with pytest.raises(ValueError, match="was not issued by a CA in"):
        NodeTLS.load(tmp_path, "stage-0")
