"""Load and run a block of any HF decoder-only model."""

from shard.model.block import Block, CacheGapError
from shard.model.checkpoint import Checkpoint

__all__ = ["Block", "CacheGapError", "Checkpoint"]
