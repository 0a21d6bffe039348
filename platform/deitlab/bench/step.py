"""`deitlab bench step` / `python -m deitlab.step_bench`: images per second of the training step. torch + timm only
(runs on a bare GPU box: no ray, mlflow or pydantic).

In one process, on the same device and the same synthetic batch (mixup/cutmix on the device, as DeiT trains):
- `reference`: the official DeiT step (reference.py): fp16 autocast + grad scaler, per-parameter AdamW, teacher
  inside the autocast block, a host sync per step;
- `lean`: the platform's step (step.py), eager; `lean_compiled` with torch.compile (compile time reported apart);
- `packed`: K students of the pack architecture sharing one teacher forward, against `alone`: one such student with
  its own teacher forward. K trials alone cost K steps of `alone` per batch; packed they cost one `packed` step;
- `cached`: the K packed students fed the teacher's logits from the teacher-logit cache (teacher_cache.py: stored
  rows rebuilt on the device), as a second sweep with the same teacher and recipe trains; `teacher` (its forward
  alone) and `student` (one student's step, logits given) give the cost ratio r = teacher / student and the bounds:
  K packed students gain at most K(r+1)/(r+K) trials per hour over K alone, a cached sweep at most r+1;
- `data`: a Parquet pack (shards.py) read, JPEG-decoded and augmented on the device (gpu_augment.py).
Every variant gets warm-up steps first (excluded), then `repeats` timed runs of `steps` steps, variants alternating
so drifting machine load falls on all alike; the figures are the median and the spread over repeats.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from deitlab.core import modes
from deitlab.core.reference import ReferenceStep
from deitlab.core.step import LossConfig, Student, lean_optimizer, prepare_teacher, teacher_logits, train_step
from deitlab.core.teacher_cache import pack_rows, unpack_rows
from deitlab.errors import SpecError, one_line

PRESETS = {
    # DeiT-S (and DeiT-Ti students for packing) with the paper's RegNetY-16GF teacher: what the README's GPU figures use.
    "paper": {"student": "deit_small_distilled_patch16_224", "pack_student": "deit_tiny_distilled_patch16_224",
              "student_kwargs": {}, "teacher": "regnety_160", "img_size": 224, "num_classes": 1000, "batch": 128},
    # CPU-sized: a 4-block DeiT-Ti-shaped student, a ResNet-18 teacher, 32×32 images.
    "small": {"student": "deit_tiny_distilled_patch16_224", "pack_student": "deit_tiny_distilled_patch16_224",
              "student_kwargs": {"patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3},
              "teacher": "resnet18", "img_size": 32, "num_classes": 10, "batch": 32},
    # CPU-sized and teacher-dominated, as distillation at paper scale is (RegNetY-16GF's forward costs ~4× a DeiT-Ti
    # training step there): a 2-block student and a ResNet-50 teacher at 64×64; r is printed with the figures.
    "teacher_cpu": {"student": "deit_tiny_distilled_patch16_224", "pack_student": "deit_tiny_distilled_patch16_224",
                    "student_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
                    "teacher": "resnet50", "img_size": 64, "num_classes": 100, "batch": 32},
    # Seconds on any CPU: what the test suite runs.
    "tiny": {"student": "deit_tiny_distilled_patch16_224", "pack_student": "deit_tiny_distilled_patch16_224",
             "student_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
             "teacher": "test_resnet", "img_size": 16, "num_classes": 10, "batch": 8},
}
VARIANTS = ("reference", "lean", "lean_compiled", "packed", "alone", "cached", "teacher", "student", "data")


class BenchError(ValueError):
    """A bad benchmark option: one line, exit code 2."""


@dataclass
class StepBenchConfig:
    preset: str = "tiny"
    mode: str = "hard"
    batch: int | None = None  # default: the preset's
    pack: int = 4
    steps: int = 5
    warmup: int = 2
    repeats: int = 3
    compile: bool = False
    device: str = "auto"
    data: str | None = None  # a Parquet pack (dir or s3://); default: a small pack made in a temp dir
    only: tuple[str, ...] = ("reference", "lean", "packed", "alone", "cached", "data")

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"--preset '{self.preset}': one of {', '.join(PRESETS)}")
        if self.mode not in modes.names():
            raise BenchError(f"--mode '{self.mode}': one of {', '.join(modes.names())}")
        for name in ("pack", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name} must be at least 1")
        if self.warmup < 0 or (self.batch is not None and self.batch < 2):
            raise BenchError("--warmup must be ≥ 0 and --batch ≥ 2")
        unknown = set(self.only) - set(VARIANTS)
        if unknown:
            raise BenchError(f"--only: unknown variant(s) {', '.join(sorted(unknown))} (known: {', '.join(VARIANTS)})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BenchError(f"--device '{self.device}': auto, cpu or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {self.device}: no CUDA device here")


@dataclass
class Timing:
    img_per_s: float  # median over repeats
    min: float
    max: float
    runs: list[float] = field(default_factory=list)
    warmup_s: float = 0.0  # the warm-up steps (torch.compile compiles here)
    peak_memory_gib: float | None = None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _student_model(cfg: StepBenchConfig, arch: str, device: torch.device):
    import timm

    preset = PRESETS[cfg.preset]
    torch.manual_seed(0)
    student = timm.create_model(arch, num_classes=preset["num_classes"], img_size=preset["img_size"],
                                **preset["student_kwargs"]).to(device)
    student.set_distilled_training(True)
    return student


def _teacher(cfg: StepBenchConfig, device: torch.device):
    import timm

    preset = PRESETS[cfg.preset]
    return timm.create_model(preset["teacher"], num_classes=preset["num_classes"]).to(device).eval()


def _loss(cfg: StepBenchConfig):
    return LossConfig(cfg.mode, modes.get(cfg.mode).paper_lambda, 3.0, "official", 0.1)


def _lean_students(cfg: StepBenchConfig, arch: str, count: int, device: torch.device, compile: bool):
    students = []
    for k in range(count):
        model = _student_model(cfg, arch, device)
        optimizer = lean_optimizer(model, "adamw", lr=5e-4, weight_decay=0.05, device=device)
        students.append(Student(f"s{k}", model, _loss(cfg), optimizer, device=device, amp=True, compile=compile))
    return students


def _step_functions(cfg: StepBenchConfig, device: torch.device, mixup, batch) -> dict[str, Callable[[], None]]:
    """One closure per step variant: each runs one training step on the shared batch."""
    images, labels = batch
    teacher = _teacher(cfg, device) if modes.get(cfg.mode).needs_teacher else None
    loss = _loss(cfg)
    preset = PRESETS[cfg.preset]
    functions: dict[str, Callable[[], None]] = {}
    step_count = [0]

    def lean_variant(arch: str, count: int, compile: bool, cached: bool = False):
        lean_teacher = prepare_teacher(copy.deepcopy(teacher), device, amp=True, compile=compile) if teacher else None
        students = _lean_students(cfg, arch, count, device, compile)
        for student in students:
            student.begin_epoch(0)
        # What the cache holds for this batch, as stored (on the CPU): each step rebuilds it on the device.
        stored = pack_rows(teacher_logits(lean_teacher, mixup(images, labels)[0]), "full") if cached else None

        def step() -> None:
            step_count[0] += 1
            mixed, targets = mixup(images, labels)
            logits = unpack_rows(stored, preset["num_classes"], device) if stored is not None else None
            train_step(students, None if cached else lean_teacher, mixed, targets, step_count[0], logits)
        return step

    if "reference" in cfg.only:
        reference = ReferenceStep(_student_model(cfg, preset["student"], device), copy.deepcopy(teacher), mode=cfg.mode,
                                  alpha=loss.weight, tau=loss.tau, lr=5e-4, weight_decay=0.05, label_smoothing=0.1,
                                  mixup=mixup)
        functions["reference"] = lambda: reference.step(images, labels)
    if "lean" in cfg.only:
        functions["lean"] = lean_variant(preset["student"], 1, False)
    if "lean_compiled" in cfg.only or (cfg.compile and "lean" in cfg.only):
        functions["lean_compiled"] = lean_variant(preset["student"], 1, True)
    if "packed" in cfg.only:
        functions["packed"] = lean_variant(preset["pack_student"], cfg.pack, cfg.compile)
    if "alone" in cfg.only or "packed" in cfg.only or "cached" in cfg.only:
        functions["alone"] = lean_variant(preset["pack_student"], 1, cfg.compile)
    if teacher is not None and "cached" in cfg.only:
        functions["cached"] = lean_variant(preset["pack_student"], cfg.pack, cfg.compile, cached=True)
    if teacher is not None and ({"cached", "teacher", "student"} & set(cfg.only)):
        functions["student"] = lean_variant(preset["pack_student"], 1, cfg.compile, cached=True)
        forward_teacher = prepare_teacher(copy.deepcopy(teacher), device, amp=True, compile=cfg.compile)
        functions["teacher"] = lambda: teacher_logits(forward_teacher, mixup(images, labels)[0])
    return functions


def _time(functions: dict[str, Callable[[], None]], cfg: StepBenchConfig, device: torch.device,
          batch_size: int) -> dict[str, Timing]:
    runs: dict[str, list[float]] = {name: [] for name in functions}
    warmups: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    for name, fn in functions.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            fn()
        _sync(device)
        warmups[name] = time.perf_counter() - start
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for _ in range(cfg.repeats):
        for name, fn in functions.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                fn()
            _sync(device)
            runs[name].append(batch_size * cfg.steps / (time.perf_counter() - start))
    return {name: Timing(statistics.median(r), min(r), max(r), [round(x, 2) for x in r], round(warmups[name], 3),
                         peaks[name]) for name, r in runs.items()}


def _data_timing(cfg: StepBenchConfig, device: torch.device, batch_size: int) -> dict[str, Timing]:
    """Read + decode + augment of a Parquet pack on the device (and decode alone); a small pack of synthetic
    photo-sized JPEGs when none is given."""
    from deitlab.data.gpu_augment import measure_decode_augment

    preset = PRESETS[cfg.preset]
    with tempfile.TemporaryDirectory() as tmp:
        uri = cfg.data or _synthetic_pack(tmp, count=batch_size * 2, size=max(preset["img_size"] * 8 // 7, 16))
        result = measure_decode_augment(uri, device=device, batch_size=batch_size, batches=cfg.steps,
                                        repeats=cfg.repeats, img_size=preset["img_size"])
    return {name: Timing(r["median"], r["min"], r["max"], [round(x, 2) for x in r.get("runs", [])])
            for name, r in (("data", result["pipeline_images_per_s"]), ("decode", result["decode_images_per_s"]))}


def _synthetic_pack(tmp: str, *, count: int, size: int) -> str:
    """An image folder of smooth random JPEGs (photo-like sizes), packed into Parquet shards under `tmp`."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from deitlab.data.shards import pack_imagefolder

    rng = np.random.default_rng(0)
    root = Path(tmp) / "images"
    for split, n in (("train", count), ("val", 4)):
        for i in range(n):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    pack_imagefolder(str(root), str(Path(tmp) / "pack"))
    return str(Path(tmp) / "pack")


def measure_steps(cfg: StepBenchConfig) -> dict:
    """Every requested variant's timing, and the ratios that are the headline: lean (and compiled) against the
    reference, trials per GPU-hour packed against alone, data path against the lean step."""
    import timm
    from timm.data import Mixup

    cfg.check()
    device = _device(cfg.device)
    preset = PRESETS[cfg.preset]
    batch_size = cfg.batch or preset["batch"]
    g = torch.Generator().manual_seed(0)
    size, classes = preset["img_size"], preset["num_classes"]
    batch = (torch.randn(batch_size, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch_size,), generator=g).to(device))
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
    results = _time(_step_functions(cfg, device, mixup, batch), cfg, device, batch_size)
    if "data" in cfg.only:
        results.update(_data_timing(cfg, device, batch_size))
    ratios = {}
    if "reference" in results:
        for name in ("lean", "lean_compiled"):
            if name in results:
                ratios[f"{name}_vs_reference"] = results[name].img_per_s / results["reference"].img_per_s
    if "packed" in results and "alone" in results:
        # K trials alone: K steps of `alone` per batch; packed: one `packed` step.
        ratios["packed_trials_per_hour_vs_alone"] = cfg.pack * results["packed"].img_per_s / results["alone"].img_per_s
    if "cached" in results and "alone" in results:
        ratios["cached_trials_per_hour_vs_alone"] = cfg.pack * results["cached"].img_per_s / results["alone"].img_per_s
    if "teacher" in results and "student" in results:
        r = results["student"].img_per_s / results["teacher"].img_per_s  # time per image: teacher / student step
        ratios["teacher_vs_student_step_r"] = r
        ratios["packed_bound"] = cfg.pack * (r + 1) / (r + cfg.pack)
        ratios["cached_bound"] = r + 1
    step = results.get("lean_compiled") or results.get("lean")
    if "data" in results and step is not None:
        ratios["data_vs_lean_step"] = results["data"].img_per_s / step.img_per_s
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "timm": timm.__version__,
            "config": {**asdict(cfg), "batch": batch_size, "student": preset["student"],
                       "pack_student": preset["pack_student"], "teacher": preset["teacher"], "img_size": size},
            "results": {name: asdict(t) for name, t in results.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()}}


def _cpu_name() -> str:
    import os
    import platform as stdlib_platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = stdlib_platform.processor() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}   torch {report['torch']}   timm {report['timm']}   {report['date']}",
             f"{'variant':<15}{'img/s':>12}{'min':>12}{'max':>12}{'warm-up s':>11}{'peak GiB':>10}"]
    for name, t in report["results"].items():
        peak = "" if t["peak_memory_gib"] is None else f"{t['peak_memory_gib']:.1f}"
        lines.append(f"{name:<15}{t['img_per_s']:>12.1f}{t['min']:>12.1f}{t['max']:>12.1f}{t['warmup_s']:>11.2f}"
                     f"{peak:>10}")
    ratios = dict(report["ratios"])
    r, k = ratios.pop("teacher_vs_student_step_r", None), report["config"]["pack"]
    packed_bound, cached_bound = ratios.pop("packed_bound", None), ratios.pop("cached_bound", None)
    if r is not None:
        lines.append(f"teacher forward / student step: r = {r:.2f}")
    for name, value in ratios.items():
        bound = {"packed_trials_per_hour_vs_alone": packed_bound, "cached_trials_per_hour_vs_alone": cached_bound}.get(
            name)
        lines.append(f"{name}: {value:.2f}×" + (f"  (bound for K={k}, r={r:.2f}: {bound:.2f}×)" if bound else ""))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse prints usage first)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deitlab bench step", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StepBenchConfig()
    p.add_argument("--preset", default=d.preset, help=f"model sizes: {', '.join(PRESETS)} (default {d.preset})")
    p.add_argument("--mode", default=d.mode, help="distillation: none, soft or hard (default hard)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--pack", type=int, default=d.pack, help=f"students per pack (default {d.pack})")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--compile", action="store_true", help="also time the compiled lean step; compile packs too")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data", default=None, help="Parquet pack to read for the data path (dir or s3://)")
    p.add_argument("--only", default=",".join(d.only), help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = StepBenchConfig(preset=args.preset, mode=args.mode, batch=args.batch, pack=args.pack, steps=args.steps,
                          warmup=args.warmup, repeats=args.repeats, compile=args.compile, device=args.device,
                          data=args.data, only=tuple(v.strip() for v in args.only.split(",") if v.strip()))
    try:
        report = measure_steps(cfg)
    except (BenchError, SpecError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
