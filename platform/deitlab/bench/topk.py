"""`deitlab bench topk`: what keeping only the top-k teacher logits (teacher_cache.py's top-k layout) costs, against
full logits, on a many-class synthetic task. torch + timm only.

A teacher is trained briefly (so that its distributions are not one-hot), then:
- the KL divergence KL(p_full ‖ p_topk) of the rebuilt distribution at τ = 1 and at the soft τ, per image, on the
  validation images, and the probability mass the top k hold;
- soft-distilled students (DeiT's soft loss at τ, λ) trained with full and with top-k logits, over seeds: the final
  accuracy of each, as mean ± standard deviation.
Students of the top-k rows are taught by the rebuilt distribution on every batch, whether the cache was read or
written, so the comparison holds for any run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile

import torch

from deitlab.bench.step import _cpu_name
from deitlab.core.engine import experiment_engine, teacher_engine
from deitlab.core.models import save_model
from deitlab.core.step import teacher_logits
from deitlab.core.teacher_cache import pack_rows, unpack_rows
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec, TeacherTrainingSpec

CPU = torch.device("cpu")


def _data(classes: int, size: int) -> dict:
    return {"dataset": "synthetic", "synthetic_classes": classes, "synthetic_size": size, "img_size": 8,
            "batch_size": 64, "augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}}


def _kl(teacher, engine, ks: list[int], tau: float, classes: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    logits = torch.cat([teacher_logits(teacher, engine.pipeline.normalize(images)) for images, _ in engine.val_loader])
    for k in ks:
        rebuilt = unpack_rows(pack_rows(logits, f"top{k}"), classes, CPU)
        row = {"mass_kept": logits.softmax(-1).topk(k, -1).values.sum(-1).mean().item()}
        for t in (1.0, tau):
            p, q = (logits / t).log_softmax(-1), (rebuilt / t).log_softmax(-1)
            row[f"kl_tau{t:g}"] = (p.exp() * (p - q)).sum(-1).mean().item()
        out[f"top{k}"] = row
    return out


def measure(classes: int = 100, size: int = 4000, teacher_epochs: int = 3, epochs: int = 6, seeds: int = 3,
            ks: tuple[int, ...] = (5, 10), tau: float = 3.0, weight: float = 0.5) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = _data(classes, size)
    teacher_spec = validate(TeacherTrainingSpec, {"name": "t", "arch": "test_resnet", "data": data,
                                                  "optim": {"epochs": teacher_epochs, "lr": 2e-3}})
    trainer = teacher_engine(teacher_spec, device=CPU)
    teacher_acc = list(trainer.run(teacher_epochs))[-1]["acc"]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(f"{tmp}/teacher.pt", trainer.model, arch="test_resnet", model_kwargs={},
                          num_classes=classes, in_chans=3)
        base = {"student": {"patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 2},
                "teacher": {"checkpoint": str(path)}, "data": data,
                "distillation": {"mode": "soft", "tau": tau, "lambda": weight, "token": False},
                "optim": {"epochs": epochs, "lr": 2e-3, "warmup_epochs": 0}}
        layouts = {"full": {"run.teacher_cache.logits": "full"}}
        layouts.update({f"top{k}": {"run.teacher_cache.logits": "topk", "run.teacher_cache.topk": k} for k in ks})
        accuracies: dict[str, list[float]] = {name: [] for name in layouts}
        kl = None
        for seed in range(seeds):
            for name, settings in layouts.items():
                spec = validate(ExperimentSpec, base).with_overrides({**settings, "run.seed": seed})
                engine = experiment_engine(spec, str(path), device=CPU, cache_storage=f"{tmp}/cache")
                accuracies[name].append(list(engine.run(epochs))[-1]["acc"])
                if kl is None:
                    kl = _kl(engine.teacher, engine, list(ks), tau, classes)
    results = {name: {"acc_mean": statistics.mean(a), "acc_std": statistics.stdev(a) if len(a) > 1 else 0.0,
                      "accs": [round(x, 4) for x in a], **(kl or {}).get(name, {})}
               for name, a in accuracies.items()}
    return {"device": _cpu_name(), "date": datetime.date.today().isoformat(),
            "config": {"classes": classes, "images": size, "teacher_epochs": teacher_epochs, "epochs": epochs,
                       "seeds": seeds, "tau": tau, "lambda": weight}, "teacher_acc": teacher_acc, "results": results}


def format_table(report: dict) -> str:
    c = report["config"]
    lines = [f"device: {report['device']}   {report['date']}",
             (f"{c['classes']} classes, {c['images']} synthetic images; teacher acc {report['teacher_acc']:.3f};"
              f" soft students (tau {c['tau']:g}, lambda {c['lambda']:g}), {c['epochs']} epochs, {c['seeds']} seeds"),
             f"{'logits':<8}{'acc (mean ± std)':>20}{'mass kept':>11}{'KL τ=1':>10}{'KL τ=' + format(c['tau'], 'g'):>10}"]
    for name, r in report["results"].items():
        kl1, klt = r.get("kl_tau1"), r.get(f"kl_tau{c['tau']:g}")
        lines.append(f"{name:<8}{r['acc_mean']:>13.4f} ± {r['acc_std']:.4f}"
                     f"{'' if 'mass_kept' not in r else format(r['mass_kept'], '.4f'):>11}"
                     f"{'' if kl1 is None else format(kl1, '.4f'):>10}{'' if klt is None else format(klt, '.4f'):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deitlab bench topk", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--k", default="5,10", help="comma-separated k values")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ks = tuple(int(k) for k in args.k.split(","))
    if args.classes < 3 or args.seeds < 1 or any(not 1 <= k < args.classes for k in ks):
        print("error: need --classes ≥ 3, --seeds ≥ 1 and each k between 1 and classes - 1", file=sys.stderr)
        return 2
    report = measure(args.classes, args.images, epochs=args.epochs, seeds=args.seeds, ks=ks)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
