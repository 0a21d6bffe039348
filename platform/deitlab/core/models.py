"""Students (timm DeiT, with or without the distillation token) and frozen teachers. torch + timm only (timm is
imported where models are built: checking a model file needs torch alone)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitlab.core.checkpoints import model_file, student_file
from deitlab.core.pretrained import (
    InputConfig,
    adapt_teacher,
    create_pretrained,
    file_sha256,
    per_channel,
    weights_file,
)
from deitlab.data.loaders import input_config
from deitlab.errors import SpecError

CHECKPOINT_FORMAT = "deitlab.model/1"


def build_student(student, distillation, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """A timm DeiT; `VisionTransformerDistilled` when the distillation token is used."""
    import timm

    name = student.timm_name(distillation.uses_token)
    if student.pretrained:
        return _pretrained_student(name, student, num_classes, in_chans, img_size, distillation.uses_token)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              **student.timm_kwargs(img_size))
    if distillation.uses_token:
        model.set_distilled_training(True)  # training forward returns (cls, dist) logits
    return model


def _pretrained_student(name: str, student, num_classes: int, in_chans: int, img_size: int, token: bool):
    """A DeiT student started from timm's pretrained weights: built at the spec's shape, then given every weight
    that fits — the position embedding resampled to its patch grid (init_student), a head for other classes fresh."""
    import timm


    source = create_pretrained(name, in_chans=in_chans)  # at the weights' own size and classes
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              **student.timm_kwargs(img_size))
    init_student(model, source.state_dict())
    if token:
        model.set_distilled_training(True)
    return model


def build_classifier(arch: str, model_kwargs: dict[str, Any], num_classes: int, in_chans: int,
                     pretrained: bool = False) -> nn.Module:
    import timm

    if pretrained:  # fine-tuning: timm gives a new head for num_classes and adapts the stem to in_chans
        from deitlab.core.pretrained import create_pretrained

        return create_pretrained(arch, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    except TypeError as err:
        raise SpecError(f"model '{arch}': bad model_kwargs ({err})") from None


def student_heads(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads' logits in any mode (timm averages them in eval mode); (logits, logits) without a token."""
    model = getattr(model, "module", model)  # unwrap DDP for evaluation
    if not hasattr(model, "head_dist"):
        logits = model(images)
        return logits, logits
    tokens = model.forward_features(images)
    return model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])


def model_family(model: nn.Module) -> str:
    """`transformer` for models that cut images into patch tokens (ViT, DeiT, Swin, ...), `convnet` otherwise."""
    return "transformer" if hasattr(model, "patch_embed") else "convnet"


def model_size(model: nn.Module, in_chans: int, img_size: int) -> dict[str, float]:
    """Parameters (millions) and forward GFLOPs per image (one multiply-add = 2 FLOPs), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    model.train(was_training)
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 1e9}


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- model checkpoints
def save_model(path: str | Path, model: nn.Module, *, arch: str, model_kwargs: dict[str, Any], num_classes: int,
               in_chans: int, metadata: dict[str, Any] | None = None) -> Path:
    """Write a self-describing model file atomically (tmp file + rename): weights, architecture and metadata."""
    return write_model_file(path, getattr(model, "module", model).state_dict(), arch=arch, model_kwargs=model_kwargs,
                            num_classes=num_classes, in_chans=in_chans, metadata=metadata)


def write_model_file(path: str | Path, state_dict: dict[str, torch.Tensor], *, arch: str, model_kwargs: dict[str, Any],
                     num_classes: int, in_chans: int, metadata: dict[str, Any] | None = None) -> Path:
    """save_model for weights already out of their module (e.g. read from a checkpoint's state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "arch": arch, "model_kwargs": dict(model_kwargs), "num_classes": num_classes,
        "in_chans": in_chans, "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_model_file(path: str | Path) -> dict[str, Any]:
    path = model_file(path)  # a folder's one .pt file; missing, truncated and foreign files fail here
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise SpecError(f"{path}: not a readable model checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise SpecError(f"{path}: not a deitlab model file (no '{CHECKPOINT_FORMAT}' header)")
    return payload


def load_teacher(path: str | Path, *, num_classes: int, in_chans: int, arch: str | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen, eval-mode teacher from a deitlab model file; checks it fits the data set."""
    payload = read_model_file(path)
    if arch and arch != payload["arch"]:
        raise SpecError(f"{path}: checkpoint holds '{payload['arch']}', the spec asks for '{arch}'")
    if (payload["num_classes"], payload["in_chans"]) != (num_classes, in_chans):
        raise SpecError(f"{path}: teacher has {payload['num_classes']} classes and {payload['in_chans']} input channels,"
                        f" the data set has {num_classes} and {in_chans}")
    kwargs = {**payload["model_kwargs"], **(model_kwargs or {})}
    model = build_classifier(payload["arch"], kwargs, num_classes, in_chans)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise SpecError(f"{path}: weights do not fit '{payload['arch']}' ({str(err).splitlines()[0]})") from None
    return freeze(model), payload


def _class_count_mismatch(what: str, teacher_classes: int, data_classes: int, arch: str) -> str:
    return (f"{what} predicts {teacher_classes} classes, the data set has {data_classes}: fine-tune it on this data"
            f" first (`deitlab teacher train` with arch: {arch}, pretrained: true) and distil from that")


def load_pretrained_teacher(arch: str, *, num_classes: int, in_chans: int,
                            model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen teacher with timm's pretrained weights (hub cache), as it is: its classes must be the data's.
    The payload is what a deitlab model file would say of it (arch, classes, channels, metadata)."""
    model = create_pretrained(arch, in_chans=in_chans, **(model_kwargs or {}))
    if model.num_classes != num_classes:
        raise SpecError(_class_count_mismatch(f"'{arch}'", model.num_classes, num_classes, arch))
    source = weights_file(model)
    own = InputConfig.of_model(model, in_chans)
    metadata = {"source": arch, "weights_sha256": file_sha256(source) if source else None,
                **({"mean": list(own.mean), "std": list(own.std), "img_size": own.img_size} if own else {})}
    return freeze(model), {"format": CHECKPOINT_FORMAT, "arch": arch, "model_kwargs": dict(model_kwargs or {}),
                           "num_classes": num_classes, "in_chans": in_chans, "metadata": metadata}


def teacher_input(payload: dict[str, Any], in_chans: int):
    """The input convention a teacher was trained with, from its model file's metadata (mean, std, image size);
    None when the file does not say (made before deitlab recorded it)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


    meta = payload.get("metadata") or {}
    if not meta.get("img_size"):
        return None
    # An image-folder teacher's batches were normalised by timm's transforms, with ImageNet's statistics.
    mean, std = meta.get("mean") or IMAGENET_DEFAULT_MEAN, meta.get("std") or IMAGENET_DEFAULT_STD
    return InputConfig(per_channel(mean, in_chans), per_channel(std, in_chans), int(meta["img_size"]))


def build_teacher(spec, teacher_file: str | Path | None, bundle) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher a spec names — from a deitlab model file, or timm's pretrained weights — behind the
    conversion of the student's batches to its own mean, std and image size (pretrained.TeacherInput)."""
    if spec.pretrained:
        model, payload = load_pretrained_teacher(spec.arch, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                                                 model_kwargs=spec.model_kwargs)
    else:
        if teacher_file is None:
            raise ValueError("the spec has a teacher but no teacher file was resolved")
        model, payload = load_teacher(teacher_file, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                                      arch=spec.arch, model_kwargs=spec.model_kwargs)
    return adapt_teacher(model, input_config(bundle), teacher_input(payload, bundle.in_chans)), payload


def student_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A student's weights from a deitlab checkpoint (its directory or state.pt) or a deitlab model file."""
    path = student_file(path)  # missing, truncated and foreign files fail here
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SpecError(f"init_from {path}: not a readable checkpoint ({type(err).__name__})") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        return _deit_weights(payload["model"], path, "a checkpoint")
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return _deit_weights(payload["state_dict"], path, f"a '{payload.get('arch')}' model file")
    raise SpecError(f"init_from {path}: neither a deitlab checkpoint nor a deitlab model file")


def _deit_weights(weights: dict[str, torch.Tensor], path: Path, what: str) -> dict[str, torch.Tensor]:
    """Weights a DeiT student can start from. init_student keeps every weight that does not fit fresh, so another
    architecture's file (a teacher's, say) would silently train from scratch: refuse it instead."""
    if not {"pos_embed", "patch_embed.proj.weight"} <= weights.keys():
        raise SpecError(f"init_from {path}: {what} without a ViT's patch and position embeddings, not a DeiT"
                        " student's weights")
    return weights


def init_student(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Start a new student from trained weights, for fine-tuning at another resolution or on other classes.

    The position embedding is resampled (bicubic, timm's helper) to the new patch grid, and its prefix tokens
    follow the model (a distillation token's slot is dropped, or started from the class token's). Weights whose
    shape still differs (a head for another class count) keep their fresh initialisation. Returns those names.
    """
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    fitted, kept_fresh = {}, []
    for key, value in weights.items():
        if key == "pos_embed" and key in own and value.shape != own[key].shape:
            source_prefix = 2 if "dist_token" in weights else 1
            prefix = getattr(model, "num_prefix_tokens", 1)
            old = int(round((value.shape[1] - source_prefix) ** 0.5))
            grid = tuple(model.patch_embed.grid_size)
            value = resample_abs_pos_embed(value, new_size=list(grid), old_size=[old, old],
                                           num_prefix_tokens=source_prefix)
            tokens, patches = value[:, :source_prefix], value[:, source_prefix:]
            tokens = tokens[:, :prefix] if prefix <= source_prefix else torch.cat([tokens, tokens[:, :1]], dim=1)
            value = torch.cat([tokens, patches], dim=1)
        if key in own and own[key].shape == value.shape:
            fitted[key] = value
        else:
            kept_fresh.append(key)
    kept_fresh += [k for k in own if k not in fitted and k not in kept_fresh]
    model.load_state_dict(fitted, strict=False)
    return sorted(kept_fresh)
