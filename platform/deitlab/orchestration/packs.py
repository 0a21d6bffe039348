"""Packed sweep trials: the plan, and ASHA's rule per member. Trials that share a teacher, data and batch schedule
train as one Ray Train run (ray_train.TrainUnit, the adapter every run goes through).

With `pack: K` in a sweep spec the planner groups trials by engine.pack_key into packs of up to K. A pack is one Tune
trial and one TorchTrainer: every batch is loaded, augmented and passed through the teacher once, and feeds each
member's own step (step.Student). Each member keeps everything a trial alone has: its MLflow child run (same name,
params and tags, plus deitlab.pack), per-epoch and step metrics, system metrics, curves, confusion matrix and best
model. A member whose loss stops being finite fails alone; the rest of its pack goes on.

Early stopping inside packs: Tune's ASHA can only stop whole Tune trials, so packed sweeps apply ASHA's rule per
member. One `Rungs` actor per sweep holds every member's value at each rung (grace × factor^k epochs); rank 0 of each
pack asks it at rung epochs and stops members outside the top 1/factor so far, recorded as a trial stopped by ASHA.
"""
from __future__ import annotations

from deitlab.spec.schema import ExperimentSpec


def plan_packs(specs: dict[str, ExperimentSpec], size: int) -> dict[str, list[str]]:
    """Tune trials → member trial names: trials with equal pack keys, in plan order, in groups of up to `size`.
    A group of one keeps its trial's name; a pack is named after its first member and its size."""
    from deitlab.core.engine import pack_key

    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(pack_key(spec), []).append(name)
    units: dict[str, list[str]] = {}
    for names in groups.values():
        for i in range(0, len(names), size):
            chunk = names[i:i + size]
            units[chunk[0] if len(chunk) == 1 else f"pack-{chunk[0]}+{len(chunk) - 1}"] = chunk
    return units


# ------------------------------------------------------------------------------------------------ ASHA per member
class Rungs:
    """ASHA's rule for members of packs (a Ray actor, one per sweep): at epoch grace × factor^k, a member continues
    when its value is within the best 1/factor of the values recorded at that rung so far."""

    def __init__(self, grace_period: int, reduction_factor: float, max_t: int, mode: str):
        self.milestones, epoch = [], grace_period
        while epoch < max_t:
            self.milestones.append(round(epoch))
            epoch *= reduction_factor
        self.factor, self.mode = reduction_factor, mode
        self.recorded: dict[int, list[float]] = {m: [] for m in self.milestones}

    def keep(self, epoch: int, value: float) -> bool:
        import numpy as np

        if epoch not in self.recorded:
            return True
        signed = value if self.mode == "max" else -value
        self.recorded[epoch].append(signed)
        return signed >= np.nanpercentile(self.recorded[epoch], (1 - 1 / self.factor) * 100)  # as Tune's ASHA


def rungs_actor(name: str, grace_period: int, reduction_factor: float, max_t: int, mode: str):
    import ray

    return ray.remote(num_cpus=0)(Rungs).options(name=name, get_if_exists=True).remote(
        grace_period, reduction_factor, max_t, mode)
