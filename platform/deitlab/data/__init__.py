"""Data: in-memory sets, image folders and Parquet packs (local or S3), batches sharded across ranks, and the GPU
decode-and-augment path. Imports torch, torchvision, pyarrow and the checkpoint storage; never ray or mlflow.
"""
