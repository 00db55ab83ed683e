"""Shard: pipeline-parallel LLM inference over a ring of stages."""
