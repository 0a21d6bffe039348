"""Data sets and batch pipelines: torch, torchvision and timm only.

- digits: scikit-learn's bundled 8×8 handwritten digits (1,797 real images, no download), split with a fixed seed,
  resized once to `img_size` and kept in memory.
- synthetic: class prototypes plus noise, for smoke tests and benchmarks of any size.
- imagefolder: any folder with train/ and val/ class sub-folders, decoded by torchvision with timm's transforms.
- parquet: a pack of JPEG bytes in Parquet shards (`deitlab data pack`, shards.py), local or on S3, streamed; decoded
  and augmented on the training device (gpu_augment.py, nvJPEG on CUDA).

In-memory sets are augmented per batch on the training device (random affine, flips, erasing) with no per-sample Python
loops; mixup/cutmix (timm) applies to every data set. The teacher is fed the batch this pipeline returns, so it sees
exactly the augmented images the student sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from deitlab.core.pretrained import InputConfig
from deitlab.data.batches import IMAGENET_MEAN, IMAGENET_STD, ShardBatchSampler
from deitlab.errors import SpecError


@dataclass
class DataBundle:
    train: Dataset | tuple[torch.Tensor, torch.Tensor]
    val: Dataset | tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...] | None  # normalisation applied on the device (None: the transforms already did it)
    std: tuple[float, ...] | None

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, tuple)

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.train[1] if self.in_memory else self.train), len(self.val[1] if self.in_memory else self.val)


def data_fingerprint(bundle: DataBundle) -> str:
    """A short SHA-256 of the data as loaded: images and labels of both splits (in-memory sets), or every file's
    relative path, size and class (image folders), or the shards' checksums in meta.json (packs). Two runs with equal
    fingerprints saw the same data."""
    import hashlib

    digest = hashlib.sha256()
    for split in (bundle.train, bundle.val):
        _hash_split(digest, split)
        digest.update(b"--split--")
    return digest.hexdigest()[:16]


def split_fingerprints(bundle: DataBundle) -> tuple[str, str]:
    """data_fingerprint of each split on its own (train, val): what a run's MLflow datasets are recorded by."""
    import hashlib

    out = []
    for split in (bundle.train, bundle.val):
        digest = hashlib.sha256()
        _hash_split(digest, split)
        out.append(digest.hexdigest()[:16])
    return out[0], out[1]


def _hash_split(digest, split) -> None:
    import os

    if isinstance(split, tuple):
        for tensor in split:
            digest.update(tensor.contiguous().numpy().tobytes())
    elif hasattr(split, "fingerprint"):  # a pack's split (shards.ParquetImages)
        digest.update(split.fingerprint().encode())
    else:
        root = split.root
        for path, label in split.samples:
            digest.update(f"{os.path.relpath(path, root)}|{os.path.getsize(path)}|{label}\n".encode())


def input_config(bundle: DataBundle):
    """How the batches a model sees are normalised: the bundle's statistics, or (image folders, whose timm
    transforms normalise) ImageNet's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


    mean = bundle.mean if bundle.mean is not None else IMAGENET_DEFAULT_MEAN
    std = bundle.std if bundle.std is not None else IMAGENET_DEFAULT_STD
    return InputConfig(tuple(float(v) for v in mean), tuple(float(v) for v in std), bundle.img_size)


def load_data(data) -> DataBundle:
    if data.dataset == "digits":
        return _digits(data)
    if data.dataset == "synthetic":
        return _synthetic(data)
    if data.dataset == "parquet":
        return _parquet(data)
    return _imagefolder(data)


def _split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int):
    """A stratified split: the same fraction of every class goes to validation, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val_parts.append(members[: round(len(members) * val_fraction)])
    val_idx = torch.cat(val_parts).sort().values
    train_mask = torch.ones(len(labels), dtype=torch.bool)
    train_mask[val_idx] = False
    train_idx = train_mask.nonzero().flatten()
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _in_memory(images: torch.Tensor, labels: torch.Tensor, data, num_classes: int) -> DataBundle:
    images = F.interpolate(images, size=(data.img_size, data.img_size), mode="bilinear", align_corners=False)
    train, val = _split(images.clamp(0, 1), labels, data.val_fraction, data.split_seed)
    channels = train[0].shape[1]
    mean = tuple(train[0].mean(dim=(0, 2, 3)).tolist())
    std = tuple(train[0].std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    return DataBundle(train, val, num_classes, channels, data.img_size, mean, std)


def _digits(data) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _in_memory(images, torch.tensor(digits.target, dtype=torch.long), data, num_classes=10)


def _synthetic(data) -> DataBundle:
    """Smooth random class prototypes plus noise: learnable, deterministic from split_seed."""
    g = torch.Generator().manual_seed(data.split_seed)
    k, n = data.synthetic_classes, data.synthetic_size
    prototypes = F.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=(8, 8), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % k
    images = prototypes[labels] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)
    return _in_memory(images, labels, data, num_classes=k)


def _imagefolder(data) -> DataBundle:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    aug = data.augment
    train_tf = create_transform(data.img_size, is_training=True, auto_augment=aug.auto_augment,
                                hflip=0.5 if aug.hflip else 0.0, re_prob=0.0, scale=(0.08, 1.0))
    val_tf = create_transform(data.img_size, is_training=False)
    try:
        train = ImageFolder(f"{data.path}/train", transform=train_tf)
        val = ImageFolder(f"{data.path}/val", transform=val_tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise SpecError(f"imagefolder '{data.path}': {str(err).splitlines()[0]}") from None
    if train.classes != val.classes:
        raise SpecError(f"imagefolder '{data.path}': train/ and val/ have different class folders")
    return DataBundle(train, val, len(train.classes), 3, data.img_size, None, None)


def _parquet(data) -> DataBundle:
    """A pack's splits, read lazily; its batches are JPEG bytes, normalised on the device with ImageNet statistics."""
    from deitlab.data.shards import ParquetPack

    pack = ParquetPack(data.path)
    return DataBundle(pack.split("train"), pack.split("val"), pack.num_classes, 3, data.img_size, IMAGENET_MEAN,
                      IMAGENET_STD)


# ------------------------------------------------------------------------------------------------------- loaders
class TensorBatches:
    """Batches of an in-memory (images, labels) pair: this rank's shard, reshuffled each epoch (see the rule above)."""

    def __init__(self, tensors: tuple[torch.Tensor, torch.Tensor], batch_size: int, *, shuffle: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, repeats: int = 1):
        self.images, self.labels = tensors
        self.sampler = ShardBatchSampler(len(self.labels), batch_size, shuffle=shuffle, rank=rank,
                                         world_size=world_size, seed=seed, repeats=repeats)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.sampler.index_batches():
            yield self.images[idx], self.labels[idx]


class _EpochLoader:
    """A DataLoader whose batch sampler follows set_epoch, so both loader kinds share one interface."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def make_loaders(bundle: DataBundle, data, *, rank: int = 0, world_size: int = 1, seed: int = 0):
    """(train, val) loaders for this rank; `data.batch_size` is per rank (global batch = batch_size × world_size)."""
    n_train, n_val = bundle.sizes
    if data.batch_size > math.ceil(n_train / world_size):
        raise SpecError(f"data.batch_size {data.batch_size} is larger than each rank's share of the"
                        f" {n_train} training images ({math.ceil(n_train / world_size)} on {world_size} rank(s))")
    repeats = data.repeated_aug
    if bundle.in_memory:
        return (TensorBatches(bundle.train, data.batch_size, shuffle=True, rank=rank, world_size=world_size, seed=seed,
                              repeats=repeats),
                TensorBatches(bundle.val, data.batch_size * 2, shuffle=False, rank=rank, world_size=world_size))
    if getattr(bundle.train, "encoded", False):  # a pack: streamed by threads, not DataLoader workers
        from deitlab.data.shards import ParquetBatches

        return (ParquetBatches(bundle.train, data.batch_size, shuffle=True, rank=rank, world_size=world_size,
                               seed=seed, repeats=repeats),
                ParquetBatches(bundle.val, data.batch_size * 2, shuffle=False, rank=rank, world_size=world_size))
    common = dict(num_workers=data.num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=data.num_workers > 0)
    train = ShardBatchSampler(n_train, data.batch_size, shuffle=True, rank=rank, world_size=world_size, seed=seed,
                              repeats=repeats)
    val = ShardBatchSampler(n_val, data.batch_size * 2, shuffle=False, rank=rank, world_size=world_size)
    return (_EpochLoader(DataLoader(bundle.train, batch_sampler=train, **common)),
            _EpochLoader(DataLoader(bundle.val, batch_sampler=val, **common)))


# ------------------------------------------------------------------------------------------------ batch pipeline
class BatchPipeline:
    """Device-side augmentation + normalisation + timm mixup/cutmix, applied to whole batches."""

    def __init__(self, bundle: DataBundle, augment, device: torch.device):
        self.augment = augment
        self.geometric = bundle.in_memory  # imagefolder batches were augmented by timm transforms per image
        self.gpu = None  # packs: batches arrive as JPEG bytes, decoded + augmented + normalised + erased on the device
        if getattr(bundle.train, "encoded", False):
            from deitlab.data.gpu_augment import GpuAugment

            self.gpu = GpuAugment(bundle.img_size, augment, device, bundle.mean, bundle.std)
        self.mean = None if bundle.mean is None else torch.tensor(bundle.mean, device=device).view(1, -1, 1, 1)
        self.std = None if bundle.std is None else torch.tensor(bundle.std, device=device).view(1, -1, 1, 1)
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                               label_smoothing=augment.label_smoothing, num_classes=bundle.num_classes)
        self.erasing = None
        if augment.random_erasing > 0 and self.gpu is None:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(augment.random_erasing, mode="pixel", device=str(device))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.gpu is not None:  # a validation batch of JPEG bytes: decode, centre crop, normalise
            return self.gpu.validation(images)
        return images if self.mean is None else (images - self.mean) / self.std

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (augmented images, targets): integer labels, or soft targets when mixup/cutmix is on."""
        a = self.augment
        if self.gpu is not None:  # JPEG bytes: decoded, cropped, flipped, RandAugment, normalised, erased
            images = self.gpu.train(images)
        else:
            if self.geometric and (a.rotate or a.translate or tuple(a.scale) != (1, 1) or a.hflip):
                images = random_affine(images, self.augment.rotate, self.augment.translate, self.augment.scale,
                                       self.augment.hflip)
            images = self.normalize(images)
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, labels = self.mixup(images, labels)
        return images, labels


def random_affine(images: torch.Tensor, rotate_deg: float, translate: float, scale: tuple[float, float],
                  hflip: bool) -> torch.Tensor:
    """One random rotation/scale/shift (and optional mirror) per image, in one grid_sample call."""
    b = images.shape[0]
    rand = lambda: torch.rand(b, device=images.device)  # noqa: E731
    angle = (rand() * 2 - 1) * math.radians(rotate_deg)
    zoom = scale[0] + rand() * (scale[1] - scale[0])
    flip = torch.where(rand() < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=images.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid works in [-1, 1] coordinates: a shift by fraction f of the image is 2f.
    tx, ty = (rand() * 2 - 1) * 2 * translate, (rand() * 2 - 1) * 2 * translate
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], -1), torch.stack([sin * flip, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
