"""Benchmarks (figures for the README, never timed tests): the lean step against the official one, packs, the GPU
data path (`step`, runs with torch + timm only), and what Ray Train and MLflow logging cost (`overhead`).
"""
