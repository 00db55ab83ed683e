"""The coordinator service: a thin gRPC servicer over shard.node and its process entry point."""
