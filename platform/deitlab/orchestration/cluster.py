"""The Ray cluster: start or join it, and whether a run's workers can ever be placed on it (its nodes now, and
the nodes its autoscaler may add).
"""
from __future__ import annotations

import logging
import os

from deitlab.errors import SpecError
from deitlab.spec.schema import RunSpec


# --------------------------------------------------------------------------------------------------- Ray start
def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address`, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train's controller polls its workers every 2 s by default; short trials spend seconds just waiting on that.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune looks for per-trial result files that Train V2 trials do not write; MLflow holds the metrics.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # A local Ray is never preempted (spot reclaim); its watcher would be one more process per trial.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Token authentication stays on (Ray's default for a new local cluster, token generated once): saying so
        # explicitly spares every command Ray's "Token authentication is enabled…" warning before its own output.
        if "RAY_AUTH_MODE" not in os.environ:
            from ray._raylet import Config

            os.environ["RAY_AUTH_MODE"] = "token"
            Config.initialize("")  # what Ray does when it turns token mode on: this process reads it again
        # One logical CPU more than the cores: a worker waiting on MLflow or a checkpoint upload leaves its core to
        # another.
        # address="local": always a new local Ray, never one a stale /tmp/ray/ray_current_cluster points at.
        # The dashboard serves Ray's state API, which Train's placement-group cleaner needs: without it the workers'
        # placement group of a trial that ASHA stopped is never removed, and a long sweep runs out of CPUs. Its port
        # is chosen here and given to every worker: with two Rays on one machine the API cannot be auto-detected.
        port = _free_port()
        ray.init(address="local", num_cpus=num_cpus or (os.cpu_count() or 1) + 1, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------- driver side
def worker_resources(run: RunSpec) -> dict[str, float]:
    """One worker's Ray resource bundle: CPUs, GPUs and the spec's custom resources."""
    return {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if run.gpus_per_worker > 0 else {}),
            **run.resources}


def scaling_config(run: RunSpec):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.workers, use_gpu=run.gpus_per_worker > 0,
                         resources_per_worker=worker_resources(run), placement_strategy=run.placement.upper())


NodeShape = tuple[dict[str, float], float]  # one node's resources, and how many such nodes (inf: no limit)


def cluster_shapes() -> tuple[list[NodeShape], bool, bool]:
    """The nodes the Ray cluster has now, plus those its autoscaler may add (its node groups, up to their max count,
    where the autoscaler publishes them). Returns (shapes, autoscaling, whether nodes of unknown shapes may be
    added)."""
    import ray
    from ray._private.state import state

    shapes: list[NodeShape] = [(dict(n["Resources"]), 1.0) for n in ray.nodes() if n.get("Alive")]
    try:
        config = state.get_cluster_config()
    except Exception:
        config = None
    groups = [(dict(g.resources), float("inf") if g.max_count < 0 else float(g.max_count))
              for g in (config.node_group_configs if config is not None else []) if g.max_count != 0]
    unknown = not groups and _autoscaler_adds_nodes()
    return shapes + groups, bool(groups) or unknown, unknown


def _autoscaler_adds_nodes() -> bool:
    """Whether an autoscaler may add nodes of its own node types (the cluster launcher's, KubeRay's). Ray 2.60's
    autoscalers do not publish their node groups' shapes (state.get_cluster_config() stays empty): v1 names its node
    types in its status (a cluster without an autoscaler config shows only `node_<id>` types), and v2 runs only where
    KubeRay or the launcher enabled it."""
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:
        return False
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(not str(name).startswith("node_") for name in types.values())


def placement_problem(run: RunSpec, shapes: list[NodeShape], autoscaling: bool = False,
                      unknown_nodes: bool = False) -> str | None:
    """Why the workers can never be placed on nodes of these shapes, or None when they can.

    Each worker's bundle (CPUs, GPUs, custom resources) must fit on one node, `strict_spread` needs a node per worker,
    and all workers must fit the cluster at its largest.
    """
    need = worker_resources(run)
    need.setdefault("GPU", 0.0)  # the cluster's GPUs are shown even when a worker needs none
    if unknown_nodes:
        return None  # an autoscaler may add nodes of shapes not known here: nothing can be ruled out

    def fits(node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    fitting = sum(count for node, count in shapes if fits(node))
    total = {k: sum(node.get(k, 0.0) * count for node, count in shapes if node.get(k, 0.0) > 0) for k in need}
    request = f"{run.workers} worker(s) × " + " + ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
    cluster = ", ".join(f"{total[k]:g} {k}" for k in need) + (" at most, with autoscaling" if autoscaling else
                                                              f" on {len(shapes)} node(s)")
    if fitting == 0:
        return f"run: {request} can never start: no node of the Ray cluster ({cluster}) fits one worker"
    if run.placement == "strict_spread" and fitting < run.workers:
        return (f"run: {request} with placement strict_spread needs {run.workers} nodes that fit a worker; the Ray"
                f" cluster has {fitting:g}")
    if any(run.workers * v > total[k] + 1e-9 for k, v in need.items()):
        return (f"run: {request} can never start on the Ray cluster ({cluster}): lower run.workers or the resources"
                " per worker")
    return None


def check_fits(*runs: RunSpec) -> None:
    """Fail in one line, before anything starts, when the workers of any of `runs` can never be placed on this Ray
    cluster (counting the nodes its autoscaler may add). The cluster is asked once."""
    shapes = cluster_shapes()
    problem = next(filter(None, (placement_problem(run, *shapes) for run in runs)), None)
    if problem:
        raise SpecError(problem)
