"""Specs: the one typed config that flows from the CLI to every worker (pydantic models), the sweep plan, and YAML /
--set loading with one-line errors. Imports neither torch, ray nor mlflow at import time (timm is asked lazily).
"""
