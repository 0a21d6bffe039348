"""Tracking: every run and tag name, the records deitlab reads back (RunRecord), the MLflow store behind them, and
rank 0's buffered metric logger. The MLflow client is used only here.
"""
