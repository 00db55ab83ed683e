"""Test helpers: the reference decoding, blocks chained in one process, an in-process
swarm and derived drafts. Tests import them as `support.*` (pytest puts tests/, the
folder of the root conftest.py, on sys.path); production code never does."""
