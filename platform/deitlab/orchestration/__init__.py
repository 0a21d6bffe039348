"""Orchestration: the Ray adapters around the core — the cluster, one Ray Train adapter for a run or a pack (train),
Tune trials and sweeps, packs' planning, Ray Jobs, the preflight every command runs, and live progress.
"""
