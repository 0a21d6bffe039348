"""Decode JPEG batches and apply DeiT's training augmentations on the device the batch trains on: torch + torchvision.

The batch arrives as encoded JPEG files (`EncodedImages`, from a Parquet pack: see shards.py). On CUDA,
torchvision's nvJPEG decodes the whole list at once; on CPU the same functions run with libjpeg, so a CPU run draws
the same augmentations from the same distribution (with the same seed even the same crops, flips and ops: every
per-sample parameter is drawn from the CPU generator, which also spares host-device synchronisation; only the
erasing noise is drawn on the device).

Training: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) → horizontal flip (augment.hflip) → RandAugment
(augment.auto_augment, timm's `rand-m9-mstd0.5-inc1` syntax; 15 ops, `n` per image, each applied with p=0.5) →
ImageNet normalisation → random erasing (augment.random_erasing, timm's per-pixel mode). Mixup/cutmix stay with timm
in data.BatchPipeline. Validation: shorter side to img_size/0.875, centre crop, normalisation (DeiT's eval).

Crops of images of different sizes are one torchvision `roi_align` over a padded batch: each output pixel averages
ceil(box/size)² bilinear samples of its bin — bilinear when enlarging, close to an area (antialiased) filter when
shrinking. The resampling filter differs a little from timm's PIL resize; the crop geometry is the same.
"""
from __future__ import annotations

import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from deitlab.data.batches import IMAGENET_MEAN, IMAGENET_STD, EncodedImages
from deitlab.errors import SpecError

CROP_PCT = 0.875  # DeiT evaluates on a centre crop of the image resized to img_size / 0.875
PAD_BUDGET = 64 * 2**20  # elements of one padded float chunk for roi_align (256 MiB): bounds memory on huge images

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call; the nvJPEG batch
# decoder is what this module is for, so that one warning is silenced, by its message (move to TorchCodec once it
# decodes batches on the GPU as well).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode(images: EncodedImages, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors on the device (grayscale JPEGs get three channels); nvJPEG batch decode on CUDA."""
    device = torch.device(device) if device is not None else images.device
    return decode_jpeg(images.data, mode=ImageReadMode.RGB, device=device)


# ------------------------------------------------------------------------------------------------- crop and resize
def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box i = (x1, y1, x2, y2) in pixels out of image i and resize it to size × size: (B, 3, size, size) floats
    in [0, 1]. Images are padded to a common size in chunks of at most PAD_BUDGET elements (smallest first)."""
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, device=device)
    boxes = boxes.to(device=device, dtype=torch.float32)
    order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
    start = 0
    while start < len(order):
        h, w, end = images[order[start]].shape[1], images[order[start]].shape[2], start + 1
        while end < len(order):
            nh, nw = max(h, images[order[end]].shape[1]), max(w, images[order[end]].shape[2])
            if (end - start + 1) * 3 * (nh + 1) * (nw + 1) > PAD_BUDGET:
                break
            h, w, end = nh, nw, end + 1
        chunk = order[start:end]
        # One extra row and column, copied from the image's last ones: roi_align's samples near a box's right/bottom
        # edge interpolate towards the next pixel, which must repeat the edge (as it does unpadded), not be black.
        padded = torch.zeros(len(chunk), 3, h + 1, w + 1, dtype=torch.uint8, device=device)
        for j, i in enumerate(chunk):
            img = images[i]
            ih, iw = img.shape[1], img.shape[2]
            padded[j, :, :ih, :iw] = img
            padded[j, :, ih, :iw] = img[:, -1]
            padded[j, :, : ih + 1, iw] = padded[j, :, : ih + 1, iw - 1]
        index = torch.tensor(chunk, device=device)
        rois = torch.cat([torch.arange(len(chunk), device=device, dtype=torch.float32)[:, None], boxes[index]], 1)
        out[index] = roi_align(padded.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True)
        start = end
    return out.div_(255.0)


def _sizes(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([im.shape[1] for im in images], dtype=torch.float64),
            torch.tensor([im.shape[2] for im in images], dtype=torch.float64))


def random_resized_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters for a whole batch at once (CPU): up to `attempts` random
    (area, aspect) draws per image, the first that fits wins; otherwise the centred crop of clamped aspect."""
    b = len(heights)
    area = (heights * widths)[:, None]
    target = area * torch.empty(b, attempts, dtype=torch.float64).uniform_(*scale)
    aspect = torch.exp(torch.empty(b, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (ch > 0) & (cw <= widths[:, None]) & (ch <= heights[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    # fallback (no draw fitted): the whole image, its aspect clamped into `ratio`
    image_ratio = widths / heights
    fw = torch.where(image_ratio < ratio[0], widths,
                     torch.where(image_ratio > ratio[1], (heights * ratio[1]).round(), widths))
    fh = torch.where(image_ratio < ratio[0], (widths / ratio[0]).round(), heights)
    found = fits.any(1)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    x = torch.floor(torch.rand(b, dtype=torch.float64) * (widths - cw + 1))
    y = torch.floor(torch.rand(b, dtype=torch.float64) * (heights - ch + 1))
    x, y = torch.where(found, x, torch.floor((widths - cw) / 2)), torch.where(found, y, torch.floor((heights - ch) / 2))
    return torch.stack([x, y, x + cw, y + ch], 1).float()


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, size: int, crop_pct: float = CROP_PCT):
    """The box that `resize shorter side to floor(size / crop_pct), centre-crop size × size` takes from each image."""
    side = size * torch.minimum(heights, widths) / math.floor(size / crop_pct)
    x, y = (widths - side) / 2, (heights - side) / 2
    return torch.stack([x, y, x + side, y + side], 1).float()


# ------------------------------------------------------------------------------------------------------ RandAugment
@dataclass(frozen=True)
class RandAugmentPolicy:
    magnitude: float = 9.0  # of 10
    ops: int = 2  # per image
    std: float = 0.5  # magnitude noise (gaussian) per op application
    max: float = 10.0
    prob: float = 0.5  # each chosen op is applied with this probability (timm's default)


def parse_rand_augment(policy: str) -> RandAugmentPolicy:
    """timm's `rand-m9-n2-mstd0.5-mmax10-inc1` syntax: ValueError with one line for anything else."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto_augment '{policy}': GPU augmentation implements RandAugment only"
                         " (rand-m9-mstd0.5-inc1)")
    values = {"m": 9.0, "n": 2, "mstd": 0.5, "mmax": 10.0, "p": 0.5}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d+)?)", part)
        if not match:
            raise ValueError(f"auto_augment '{policy}': unknown part '{part}' (GPU RandAugment takes m, n, mstd, mmax,"
                             " p, inc1)")
        key, number = match.groups()
        if key == "inc":
            if float(number) != 1:
                raise ValueError(f"auto_augment '{policy}': GPU RandAugment has increasing magnitudes only (inc1)")
            continue
        values[key] = int(float(number)) if key == "n" else float(number)
    if values["n"] < 1 or not 0 <= values["p"] <= 1:
        raise ValueError(f"auto_augment '{policy}': n must be at least 1 and p within [0, 1]")
    return RandAugmentPolicy(values["m"], values["n"], values["mstd"], values["mmax"], values["p"])


# Colour ops first, then the geometric ones: each slot's geometric samples are then one contiguous run when samples are
# sorted by op, and get a single grid_sample.
OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
FIRST_GEOMETRIC = OPS.index("Rotate")
_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # PIL's L conversion


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor · (x - degenerate), clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _GRAY.to(x.device)).sum(1, keepdim=True)


def _sharpen_base(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1, /13) inside, the image's own border pixels kept."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = F.conv2d(x, kernel / 13, groups=3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per image and channel, batched: histogram → cumulative lookup table."""
    n, c, h, w = x.shape
    values = (x * 255).round_().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float))
    last = 255 - (hist > 0).flip(1).to(torch.uint8).argmax(1, keepdim=True)  # the brightest value present
    step = torch.div(h * w - hist.gather(1, last), 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, values), values.float())
    return (out / 255).view(n, c, h, w)


def _color_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One colour op on a sub-batch; level in [0, mmax/10] per image (timm's increasing variants)."""
    lv = level.view(-1, 1, 1, 1)
    factor = 1 + sign * level * 0.9  # ImageEnhance factors 0.1 … 1.9
    if name == "AutoContrast":
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 1 - x
    if name == "Posterize":  # keep 4 … 0 bits as the level rises
        bits = (4 - (level.clamp(0, 1) * 4).floor()).view(-1, 1, 1, 1)
        step = torch.pow(2.0, 8 - bits)
        return torch.floor((x * 255).round() / step) * step / 255
    if name == "Solarize":  # invert at and above a threshold falling from 256 (nothing) to 0 (everything)
        return torch.where(x * 255 >= 256 * (1 - lv), 1 - x, x)
    if name == "SolarizeAdd":
        return torch.where(x < 128 / 255, (x + lv * 110 / 255).clamp(max=1), x)
    if name == "Color":
        return _blend(_grayscale(x), x, factor)
    if name == "Contrast":
        return _blend(_grayscale(x).mean((2, 3), keepdim=True), x, factor)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if name == "Sharpness":
        return _blend(_sharpen_base(x), x, factor)
    raise AssertionError(name)


def _affine(op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices (output → input, coordinates in [-1, 1]) of the geometric ops; else identity."""
    theta = torch.zeros(len(op), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    angle = torch.deg2rad(sign * level * 30)
    rotate, shear, amount = op == OPS.index("Rotate"), sign * level * 0.3, sign * level * 0.45 * 2
    theta[rotate, 0, 0], theta[rotate, 0, 1] = torch.cos(angle[rotate]), -torch.sin(angle[rotate])
    theta[rotate, 1, 0], theta[rotate, 1, 1] = torch.sin(angle[rotate]), torch.cos(angle[rotate])
    theta[op == OPS.index("ShearX"), 0, 1] = shear[op == OPS.index("ShearX")]
    theta[op == OPS.index("ShearY"), 1, 0] = shear[op == OPS.index("ShearY")]
    theta[op == OPS.index("TranslateX"), 0, 2] = amount[op == OPS.index("TranslateX")]
    theta[op == OPS.index("TranslateY"), 1, 2] = amount[op == OPS.index("TranslateY")]
    return theta


def rand_augment(x: torch.Tensor, policy: RandAugmentPolicy, fill=IMAGENET_MEAN) -> torch.Tensor:
    """`policy.ops` random ops per image, each applied with `policy.prob` at a noisy magnitude. Parameters are drawn
    on the CPU; each slot sorts the batch by op so every op runs once on its own sub-batch (no per-image loop).
    Geometric ops fill uncovered pixels with `fill` (timm: the data set's mean colour) and shear about the centre."""
    b = x.shape[0]
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    for _ in range(policy.ops):
        op = torch.randint(len(OPS), (b,))
        applied = torch.rand(b) < policy.prob
        level = (policy.magnitude + policy.std * torch.randn(b)).clamp(0, policy.max) / 10
        sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
        op = torch.where(applied, op, len(OPS))  # len(OPS): not applied
        order = torch.argsort(op, stable=True)
        counts = torch.bincount(op, minlength=len(OPS) + 1).tolist()
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        order_dev, level_dev, sign_dev = (t.to(x.device) for t in (order, level, sign))
        for k, name in enumerate(OPS[:FIRST_GEOMETRIC]):
            if counts[k]:
                idx = order_dev[starts[k]: starts[k + 1]]
                x[idx] = _color_op(name, x[idx], level_dev[idx], sign_dev[idx])
        a, e = starts[FIRST_GEOMETRIC], starts[len(OPS)]
        if e > a:
            idx = order_dev[a:e]
            theta = _affine(op[order[a:e]], level[order[a:e]], sign[order[a:e]]).to(x.device)
            sub = x[idx]
            grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
            x[idx] = F.grid_sample(sub - fill, grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False) + fill
    return x


# ------------------------------------------------------------------------------------------------------- erasing
def random_erasing(x: torch.Tensor, prob: float, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3),
                   attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing (mode 'pixel', one box) for a normalised batch: with probability `prob` per image, a box of
    random area and aspect is filled with standard-normal noise. Boxes are drawn on the CPU, masks built on device."""
    b, _, h, w = x.shape
    chosen = (torch.rand(b) < prob).nonzero().flatten()
    if prob <= 0 or not len(chosen):
        return x
    n = len(chosen)
    target = h * w * torch.empty(n, attempts).uniform_(*area)
    ratio = torch.exp(torch.empty(n, attempts).uniform_(math.log(aspect[0]), math.log(aspect[1])))
    eh, ew = torch.sqrt(target * ratio).round(), torch.sqrt(target / ratio).round()
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    keep = fits.any(1)
    chosen, eh, ew = chosen[keep], eh.gather(1, first)[keep, 0], ew.gather(1, first)[keep, 0]
    if not len(chosen):
        return x
    top = torch.floor(torch.rand(len(chosen)) * (h - eh + 1))
    left = torch.floor(torch.rand(len(chosen)) * (w - ew + 1))
    box = torch.stack([top, top + eh, left, left + ew], 1).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    mask = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None])
            & (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None])).unsqueeze(1)
    idx = chosen.to(x.device)
    noise = torch.randn(len(chosen), x.shape[1], h, w, device=x.device, dtype=x.dtype)
    x[idx] = torch.where(mask, noise, x[idx])
    return x


# ------------------------------------------------------------------------------------------------------ pipeline
class GpuAugment:
    """Decode + DeiT augmentation (training) or decode + centre crop (validation), normalised, on `device`."""

    def __init__(self, img_size: int, augment, device: torch.device | str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.device = img_size, torch.device(device)
        self.hflip = bool(augment.hflip)
        self.erasing = float(augment.random_erasing)
        try:
            self.policy = parse_rand_augment(augment.auto_augment) if augment.auto_augment else None
        except ValueError as err:
            raise SpecError(f"data.augment.{err}") from None
        self.fill = mean
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def train(self, images: EncodedImages) -> torch.Tensor:
        decoded = decode(images, self.device)
        x = crop_resize(decoded, random_resized_crop_boxes(*_sizes(decoded)), self.size)
        if self.hflip:
            flip = (torch.rand(len(decoded)) < 0.5).to(self.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if self.policy is not None:
            x = rand_augment(x, self.policy, self.fill)
        x = (x - self.mean) / self.std
        return random_erasing(x, self.erasing) if self.erasing > 0 else x

    def validation(self, images: EncodedImages) -> torch.Tensor:
        decoded = decode(images, self.device)
        x = crop_resize(decoded, center_crop_boxes(*_sizes(decoded), self.size), self.size)
        return (x - self.mean) / self.std


# -------------------------------------------------------------------------------------------------------- measure
DEIT_AUGMENT = {"hflip": True, "auto_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(counts: list[float]) -> dict[str, float]:
    return {"median": statistics.median(counts), "min": min(counts), "max": max(counts), "runs": list(counts)}


def measure_decode_augment(pack_uri: str, *, device: torch.device | str, batch_size: int = 128, batches: int = 20,
                           repeats: int = 3, img_size: int = 224) -> dict:
    """Images per second of the GPU data path on a pack's training split, with DeiT's augmentation (flip,
    rand-m9-mstd0.5-inc1, erasing 0.25): `pipeline` = read from the pack + decode + augment (a fresh reader each
    repeat, so reads are not served from a warm cache), `decode` = decode only, of batches already in memory.
    Median, min and max over `repeats`; the first batch of each repeat (warm-up) is not timed."""
    from types import SimpleNamespace

    from deitlab.data.shards import ParquetBatches, ParquetPack

    device = torch.device(device)
    pack = ParquetPack(pack_uri)
    if pack.sizes[0] < batch_size:
        raise SpecError(f"pack '{pack_uri}': {pack.sizes[0]} training images, fewer than batch_size {batch_size}")
    augment = GpuAugment(img_size, SimpleNamespace(**DEIT_AUGMENT), device)
    pipeline, decode_only = [], []
    for repeat in range(repeats):
        loader = ParquetBatches(pack.split("train"), batch_size, shuffle=True, seed=repeat)
        kept, seen, start, epoch = [], 0, 0.0, 0
        while seen <= batches:  # epochs again when the split has fewer batches
            loader.set_epoch(epoch)
            for images, _ in loader:
                out = augment.train(images.to(device))
                if seen == 0:  # warm-up: cuDNN/nvJPEG set-up, first reads
                    _sync(device)
                    start = time.perf_counter()
                else:
                    kept.append(images)
                seen += 1
                if seen > batches:
                    break
            epoch += 1
        del out
        _sync(device)
        timed = sum(len(images) for images in kept)
        pipeline.append(timed / (time.perf_counter() - start))
        decode(kept[0], device)
        _sync(device)
        start = time.perf_counter()
        for images in kept:
            decode(images, device)
        _sync(device)
        decode_only.append(timed / (time.perf_counter() - start))
    return {"device": str(device), "img_size": img_size, "batch_size": batch_size, "batches": batches,
            "repeats": repeats, "augment": DEIT_AUGMENT, "pipeline_images_per_s": _rate(pipeline),
            "decode_images_per_s": _rate(decode_only)}
