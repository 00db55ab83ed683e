"""Helpers shared by tests and local runs: tiny random models and reference decoding."""
