#!/bin/sh
# The public API with grpcurl (https://github.com/fullstorydev/grpcurl): server reflection
# lists and describes it, so no .proto file is needed. COORDINATOR is host:port; CERTS
# holds ca.pem and client.pem/client.key (`shard certs local CERTS --stages N` writes them).
set -eu
COORDINATOR=${COORDINATOR:-localhost:50051}
CERTS=${CERTS:-certs}
TLS="-cacert $CERTS/ca.pem -cert $CERTS/client.pem -key $CERTS/client.key"

# What the coordinator serves, and the request's fields.
grpcurl $TLS "$COORDINATOR" list
grpcurl $TLS "$COORDINATOR" describe shard.v1.GenerateRequest

# Ready? (the standard health service; "" or "shard.v1.InferenceService")
grpcurl $TLS -d '{"service": "shard.v1.InferenceService"}' "$COORDINATOR" grpc.health.v1.Health/Check
grpcurl $TLS "$COORDINATOR" shard.v1.InferenceService/GetStatus

# A generation: one JSON object per event (deltas, then the summary).
grpcurl $TLS -d '{"prompt": "Once upon a time", "max_tokens": 32}' \
    "$COORDINATOR" shard.v1.InferenceService/Generate
