"""Who may call what: one table from each RPC to the certificate roles allowed to call
it, enforced by one server interceptor on every node's server.

A caller's role comes from its verified certificate (URI SAN shard://<role>/<id>).
Checks that depend on the plan (only a stage's assigned upstream may push frames, only
the tail may return results, a node may heartbeat only as itself) stay with the servicer
that knows the plan; this table is the first gate, and an RPC missing from it is refused.
"""

from __future__ import annotations

import grpc

from shard.wire.handlers import checked
from shard.wire.tls import peer_identity

_NODES = frozenset({"registry", "coordinator", "stage"})
_MEMBERS = frozenset({"coordinator", "stage"})
_EVERYONE = frozenset({"registry", "coordinator", "stage", "client"})

ALLOWED_ROLES: dict[str, frozenset[str]] = {
    # The public API: what clients see, and nothing else.
    "/shard.v1.InferenceService/Generate": frozenset({"client", "coordinator"}),
    "/shard.v1.InferenceService/GetStatus": frozenset({"client", "coordinator"}),
    "/grpc.health.v1.Health/Check": _EVERYONE,
    "/grpc.health.v1.Health/Watch": _EVERYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _EVERYONE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _EVERYONE,
    # Node to node.
    "/shard.v1.NodeService/Ping": _NODES,
    "/shard.v1.ReturnService/Return": frozenset({"stage"}),
    "/shard.v1.StageService/Traverse": _MEMBERS,
    "/shard.v1.StageService/CancelEpoch": frozenset({"coordinator"}),
    "/shard.v1.StageService/EndSession": frozenset({"coordinator"}),
    "/shard.v1.StageService/Attest": frozenset({"coordinator"}),
    "/shard.v1.StageService/Info": _NODES,
    "/shard.v1.RegistryService/Join": _MEMBERS,
    "/shard.v1.RegistryService/Heartbeat": _MEMBERS,
    "/shard.v1.RegistryService/Leave": _MEMBERS,
    "/shard.v1.RegistryService/WatchPlan": _MEMBERS,
    "/shard.v1.RegistryService/ReportUnreachable": _MEMBERS,
}


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose certificate role the table does not allow for its RPC:
    UNAUTHENTICATED without a Shard identity, PERMISSION_DENIED with the wrong role.
    Plaintext (--insecure) servers have no identities and let every call through."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        roles = ALLOWED_ROLES.get(method, frozenset())

        async def check(request, context):
            await _check(context, method, roles)
            return request

        return checked(handler, check, check)


async def _check(context: grpc.aio.ServicerContext, method: str, roles: frozenset[str]) -> None:
    if context.auth_context().get("transport_security_type", [b"insecure"]) == [b"insecure"]:
        return
    identity = peer_identity(context)
    if identity is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "peer certificate carries no Shard identity (URI SAN shard://<role>/<node_id>)")
    if identity.role not in roles:
        allowed = " or ".join(sorted(roles)) or "no role"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{identity.role} {identity.node_id!r} may not call {method}; allowed: {allowed}")
