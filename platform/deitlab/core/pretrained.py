"""Pretrained timm / Hugging Face hub models, through timm's own loader: torch + timm only.

`timm.create_model(name, pretrained=True)` finds the weights in the Hugging Face hub cache (HF_HOME, HF_HUB_OFFLINE
honoured) or downloads them; deitlab has no downloader of its own. What it adds: one-line errors, the SHA-256 of the
file the weights were read from (what the hub lists for the file, and what `sha256sum` prints), and the model's own
input convention (mean, std, image size) from its pretrained config — the batch a teacher sees is converted to it
(`TeacherInput`), as timm's distillation task does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deitlab.errors import SpecError


def create_pretrained(name: str, *, num_classes: int | None = None, in_chans: int | None = None,
                      **kwargs: Any) -> nn.Module:
    """timm's model `name` with its pretrained weights; a new head when `num_classes` differs from the weights', the
    first convolution adapted when `in_chans` does (timm's rules). SpecError in one line when it cannot be had."""
    import timm

    extra = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    try:
        return timm.create_model(name, pretrained=True, **extra, **kwargs)
    except TypeError as err:
        raise SpecError(f"model '{name}': bad model_kwargs ({err})") from None
    except RuntimeError as err:
        text = " ".join(str(err).split())
        if text.startswith(("Unknown model", "Invalid pretrained tag")):
            raise SpecError(f"model '{name}': {text} (see timm.list_pretrained())") from None
        raise SpecError(f"model '{name}': the pretrained weights do not load ({text[:200]})") from None
    except OSError as err:  # huggingface_hub: not in the cache and the hub not reachable (or offline)
        import os

        cache = os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise SpecError(f"model '{name}': its pretrained weights are neither in the Hugging Face cache ({cache}) nor"
                        f" reachable ({type(err).__name__}); run `deitlab teacher import {name}` where the hub is"
                        " reachable and name the registered model, or set HF_HOME to a cache that holds them"
                        ) from None


def weights_file(model: nn.Module) -> Path | None:
    """The local file timm read the model's pretrained weights from: the hub cache's model.safetensors or
    pytorch_model.bin, or torch hub's copy of a URL; None when it cannot be told."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin",
                                                                            "open_clip_pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        found = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"].split("?")[0]).name
        if found.is_file():
            return found
    return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputConfig:
    """The pixels a model expects: per-channel mean and std after scaling to [0, 1], and its image size."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int

    @classmethod
    def of_model(cls, model: nn.Module, in_chans: int) -> InputConfig | None:
        """From a timm model's pretrained config; None when it has none (a model built without weights)."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if not cfg.get("mean") or not cfg.get("std") or not cfg.get("input_size"):
            return None
        return cls(per_channel(cfg["mean"], in_chans), per_channel(cfg["std"], in_chans), int(cfg["input_size"][-1]))


def per_channel(values, in_chans: int) -> tuple[float, ...]:
    """Per-channel statistics for `in_chans` channels: a grey-scale input gets the mean of an RGB model's values."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    return (sum(values) / len(values),) * in_chans


class TeacherInput(nn.Module):
    """A teacher behind the conversion of the student's batch to the teacher's own input convention.

    The batch arrives normalised with the data's mean and std (the student's); the teacher was trained on pixels
    normalised with its own, and maybe at another size. x_teacher = (x · std_data + mean_data − mean_t) / std_t, one
    multiply-add per channel; then resized (bilinear, antialiased) when the sizes differ.
    """

    def __init__(self, teacher: nn.Module, data: InputConfig, own: InputConfig):
        super().__init__()
        self.teacher = teacher
        data_mean, data_std = torch.tensor(data.mean), torch.tensor(data.std)
        own_mean, own_std = torch.tensor(own.mean), torch.tensor(own.std)
        self.register_buffer("scale", (data_std / own_std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((data_mean - own_mean) / own_std).view(1, -1, 1, 1))
        self.size = None if own.img_size == data.img_size else own.img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.size is not None:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.teacher(images)


def adapt_teacher(teacher: nn.Module, data: InputConfig, own: InputConfig | None) -> nn.Module:
    """`teacher` as it should see the student's batches: wrapped in TeacherInput when its convention differs."""
    if own is None or own == data:
        return teacher
    return TeacherInput(teacher, data, own)
