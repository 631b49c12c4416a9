"""The aggregation actor: a round's result does not depend on the order its clients finish in."""

from __future__ import annotations

import subprocess
import sys

import ray
import torch
from mlflow.tracking import MlflowClient

from fedray.config import load_spec
from fedray.driver.aggregator import Aggregator
from fedray.methods import METHODS as REGISTRY
from fedray.methods import ClientUpdate
from fedray.worker.results import ClientResult

SHAPES = {"layer.0": (6, 5), "layer.1": (4, 7)}
CLIENTS = [3, 0, 4, 1, 2]  # the round's sample, in the order begin_round is given (the driver's: by id)
RANKS = {0: 1, 1: 2, 2: 4, 3: 2, 4: 4}
FAILED = 4  # its task fails: the driver reports it instead of adding a result
#: A sum of factor products, and a sum per module.
METHODS = ("flexlora", "fedplora")


def _result(client: int, generator: torch.Generator) -> ClientResult:
    r = RANKS[client]
    update = ClientUpdate(
        client,
        r,
        10 + client,
        {layer: torch.randn(d, r, generator=generator) for layer, (d, _) in SHAPES.items()},
        {layer: torch.randn(r, k, generator=generator) for layer, (_, k) in SHAPES.items()},
    )
    head = {"classifier.weight": torch.randn(2, 3, generator=generator)}
    worker = {"node_id": "n", "pid": client}
    metrics = {"seconds": 1.0 + client, "train_loss": float(torch.rand(1, generator=generator)), "worker": worker}
    # A method hook's report, as HETLoRA's clients_pruned: the actor sums it over the round.
    return ClientResult(update, head, metrics, {"hooked": float(client % 2)})


def _round(aggregator, start: tuple, arrival: list[int]) -> tuple[dict, dict, dict]:
    """From state ``start``, one round of ``CLIENTS`` whose results reach the actor in ``arrival`` order."""
    ray.get(aggregator.load_state.remote(*start))
    for client in CLIENTS:
        ray.get(aggregator.client_init.remote(client, RANKS[client]))
    ray.get(aggregator.begin_round.remote(CLIENTS))
    generator = torch.Generator().manual_seed(0)
    results = {client: _result(client, generator) for client in sorted(CLIENTS)}
    for client in arrival:
        if client == FAILED:
            aggregator.report_failure.remote(client, "worker died")
        else:
            aggregator.add.remote([ray.put(results[client])])
    metrics = ray.get(aggregator.end_round.remote())
    delta, head = ray.get(aggregator.global_state.remote())
    return delta, head, metrics


def test_a_round_aggregates_in_sample_order_whatever_order_clients_finish_in(ray_session, tracking_uri):
    first_head = {"classifier.weight": torch.zeros(2, 3)}
    MlflowClient(tracking_uri).search_experiments()  # a new store's tables, before two actors race to make them
    specs = {m: load_spec("jobs/quickstart.yaml", [f"method={m}", "max_rank=4", "ranks=[1,2,4]"]) for m in METHODS}
    aggregators = {
        m: Aggregator.remote(spec, REGISTRY[m], SHAPES, first_head, tracking_uri, "no-run") for m, spec in specs.items()
    }
    for method, aggregator in aggregators.items():
        start = ray.get(aggregator.state.remote())
        delta, head, metrics = _round(aggregator, start, CLIENTS)
        assert metrics["clients_ok"] == 4.0 and metrics["failures"] == {str(FAILED): "worker died"}
        assert metrics["hooked"] == 2.0  # clients 1 and 3 of the survivors 0-3
        for arrival in ([2, 1, 4, 0, 3], [0, 4, 2, 3, 1]):
            other_delta, other_head, other_metrics = _round(aggregator, start, arrival)
            # Bit for bit: float sums in another order would differ in their last bits.
            assert all(torch.equal(delta[layer], other_delta[layer]) for layer in SHAPES), (method, arrival)
            assert torch.equal(head["classifier.weight"], other_head["classifier.weight"]), (method, arrival)
            assert other_metrics["train_loss"] == metrics["train_loss"]
        ray.kill(aggregator)


def test_the_actor_starts_without_the_model_stack():
    # Every run starts a fresh actor process: transformers, peft and scikit-learn are seconds of it.
    check = (
        "import sys, fedray.driver.aggregator; print(sorted({'transformers', 'peft', 'sklearn'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
