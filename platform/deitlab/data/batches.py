"""What a batch is and which images go into it, for every data source (in-memory tensors, image folders, Parquet
packs): the sharding rule, encoded JPEG batches, ImageNet's normalisation constants. A leaf: data.py, shards.py and
gpu_augment.py all import it, and it imports none of them.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sharding rule, per epoch: training shuffles the whole set with (seed, epoch), pads it by repeating its first
# (world_size - n % world_size) % world_size shuffled images so every rank gets the same number of steps (DDP needs
# that), and deals images round-robin to ranks. No image is dropped; at most world_size - 1 repeat. A last batch of a
# single image joins the one before it (a batch of one breaks BatchNorm teachers). Validation is dealt without padding
# and its counts are summed across ranks, so every validation image counts exactly once.


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches covering range(n); a trailing batch of one image is merged into the previous batch."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def shard_indices(n: int, rank: int, world_size: int, *, seed: int | None, epoch: int = 0,
                  repeats: int = 1) -> torch.Tensor:
    """This rank's indices for one epoch: shuffled and padded (training, seed given) or in order without padding.

    With `repeats` > 1 (repeated augmentation, the official DeiT RASampler's semantics): each shuffled image is
    repeated `repeats` times in a row before the stream is dealt round-robin, so its copies land on consecutive ranks
    (and get their own augmentation there); every rank then keeps the first ceil(n / world_size) of its share, so an
    epoch has the length it has without repeats and sees about n / repeats distinct images.
    """
    if seed is None:
        return torch.arange(rank, n, world_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = math.ceil(n / world_size)
    if repeats > 1:
        order = order.repeat_interleave(repeats)
    padded = math.ceil(len(order) / world_size) * world_size
    return torch.cat([order, order[: padded - len(order)]])[rank::world_size][:per_rank]


class ShardBatchSampler:
    """This rank's batches of dataset indices for one epoch, by the rule above. A DataLoader's batch_sampler for
    imagefolder data; TensorBatches uses it for in-memory tensors."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 repeats: int = 1):
        self.n, self.batch_size, self.shuffle, self.repeats = n, batch_size, shuffle, repeats
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # called every training step (the schedule): no shuffling here
        shard = math.ceil(self.n / self.world_size) if self.shuffle else len(range(self.rank, self.n, self.world_size))
        return len(batch_slices(shard, self.batch_size))

    def index_batches(self) -> Iterator[torch.Tensor]:
        idx = shard_indices(self.n, self.rank, self.world_size, seed=self.seed if self.shuffle else None,
                            epoch=self.epoch, repeats=self.repeats)
        for part in batch_slices(len(idx), self.batch_size):
            yield idx[part]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.index_batches():
            yield batch.tolist()


class EncodedImages:
    """A batch of JPEG files (1-D uint8 CPU tensors) bound for `device`. The engine calls `.to(device)` on every batch
    it loads: that only records where the batch is going; BatchPipeline decodes it there."""

    def __init__(self, data: list[torch.Tensor], device: torch.device | str = "cpu"):
        self.data, self.device = list(data), torch.device(device)

    def to(self, device, non_blocking: bool = False) -> EncodedImages:
        return EncodedImages(self.data, device)

    def __len__(self) -> int:
        return len(self.data)
