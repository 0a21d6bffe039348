"""deitlab: DeiT-style knowledge distillation experiments on Ray, tracked in MLflow."""

__version__ = "0.1.0"
