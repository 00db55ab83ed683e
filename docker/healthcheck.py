#!/opt/shard/bin/python
"""Docker HEALTHCHECK: asks the node's plaintext health listener (SHARD_HEALTH_LISTEN) for
the service named on the command line ("" by default: readiness; "liveness": the process
answers). Exit 0 when SERVING, 1 otherwise, as Docker expects."""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

service = sys.argv[1] if len(sys.argv) > 1 else ""
port = os.environ.get("SHARD_HEALTH_LISTEN", "0.0.0.0:8081").rpartition(":")[2]
try:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=3).status
except grpc.RpcError as error:
    sys.exit(f"health check failed: {error.code().name}")
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else f"not serving: {service or 'readiness'}")
