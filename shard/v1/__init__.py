"""Protobuf and gRPC stubs generated from protos/shard/v1 by `make proto`; never edited by hand."""
