"""The pure core: distillation modes and losses, models, the training step and the engine, checkpoints.

Imports torch, timm and the data layer; never ray, mlflow or the layers above (tests/unit/test_layers.py checks it).
"""
