"""`shard bench`: the decoding modes side by side over emulated WAN links."""
