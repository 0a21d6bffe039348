"""Where workers can be placed: the check that fails a run before it starts, and how many trials run at once —
counting the nodes an autoscaling cluster may add, and custom resources (run.resources)."""
import pytest
from deitlab.orchestration.cluster import placement_problem, worker_resources
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec

INF = float("inf")
CPU_HEAD = ({"CPU": 0.0, "memory": 8e9}, 1.0)  # the cluster configs' head: no CPU for workers


def _run(**fields):
    return validate(ExperimentSpec, {"distillation": {"mode": "none"}, "run": fields}).run


def test_a_worker_bundle_holds_cpus_gpus_and_custom_resources():
    assert worker_resources(_run()) == {"CPU": 1.0}
    assert worker_resources(_run(cpus_per_worker=4, gpus_per_worker=1, resources={"accelerator_type:H100": 0.001})) \
        == {"CPU": 4.0, "GPU": 1.0, "accelerator_type:H100": 0.001}


def test_gpu_workers_fit_an_autoscaling_group_that_has_no_node_yet():
    gpu_workers = _run(workers=4, cpus_per_worker=8, gpus_per_worker=1)
    # Without the autoscaler's node groups, a CPU-only head can never run them ...
    assert "no node of the Ray cluster (8 CPU, 0 GPU on 1 node(s)) fits one worker" in placement_problem(
        gpu_workers, [({"CPU": 8.0}, 1.0)])
    # ... with a GPU group of up to 2 nodes of 1 GPU, 4 workers never fit; with no limit, or up to 4 nodes, they do.
    group = {"CPU": 8.0, "GPU": 1.0}
    assert "(16 CPU, 2 GPU at most, with autoscaling): lower run.workers" in placement_problem(
        gpu_workers, [CPU_HEAD, (group, 2.0)], autoscaling=True)
    assert placement_problem(gpu_workers, [CPU_HEAD, (group, 4.0)], autoscaling=True) is None
    assert placement_problem(gpu_workers, [CPU_HEAD, (group, INF)], autoscaling=True) is None


def test_custom_resources_and_strict_spread_count_nodes_that_fit():
    spread = _run(workers=2, placement="strict_spread", resources={"slot": 1})
    with_slot, without = ({"CPU": 2.0, "slot": 1.0}, 1.0), ({"CPU": 2.0}, 1.0)
    assert placement_problem(spread, [with_slot, with_slot]) is None
    assert placement_problem(spread, [with_slot, without]).endswith(
        "× 1 CPU + 1 slot with placement strict_spread needs 2 nodes that fit a worker; the Ray cluster has 1")
    assert "no node" in placement_problem(_run(resources={"slot": 2}), [with_slot, with_slot])


@pytest.mark.parametrize("resources, message", [({"GPU": 1}, "'GPU' is set by cpus_per_worker / gpus_per_worker"),
                                                ({"slot": 0}, "'slot': expected an amount > 0, got 0")])
def test_run_resources_reject_builtin_names_and_empty_amounts(resources, message):
    from deitlab.errors import SpecError

    with pytest.raises(SpecError, match=message):
        _run(resources=resources)


def test_nothing_is_ruled_out_when_an_autoscaler_may_add_nodes_of_unknown_shapes():
    """Ray 2.60's autoscalers do not publish their node groups: a CPU-only head then says nothing about GPU nodes."""
    gpu_workers = _run(workers=4, gpus_per_worker=1)
    assert placement_problem(gpu_workers, [CPU_HEAD], autoscaling=True, unknown_nodes=True) is None
    assert placement_problem(gpu_workers, [CPU_HEAD]) is not None
