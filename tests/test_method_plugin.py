"""A seventh method is one class and one registry line: one defined here runs end to end
through the real Ray path (driver, worker tasks, aggregation actor, MLflow, checkpoint)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import pytest
import torch
from ray import cloudpickle

from fedray.config import load_spec
from fedray.driver.checkpoint import read_checkpoint
from fedray.driver.lifecycle import run
from fedray.methods import METHODS, ClientHook, ClientInit, ClientUpdate, method_from_state, register_method
from fedray.methods.adapter import AdapterMethod

#: The hook's L2 pull on B, and the value it reports per client.
PULL = 0.5


class ShrinkB(ClientHook):
    """Adds ``PULL * sum ||B||^2`` to the loss; reports that it ran, and its last value."""

    def __init__(self) -> None:
        self.last = 0.0

    def loss_term(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        term = PULL * sum((B * B).sum() for B, _ in factors.values())
        self.last = float(term.detach())
        return term

    def finish(self, update: ClientUpdate, init: ClientInit) -> tuple[ClientUpdate, dict[str, float]]:
        return update, {"test_hooked_clients": 1.0, "test_pull_seen": float(self.last > 0)}


class MeanOfFactors(AdapterMethod):
    """FedIT's averaging at each client's own leading components, with a client hook."""

    name = "test-mean-of-factors"

    def _make_init(self, client_id, rank, ranks):
        B = {layer: self._B[layer][:, :r].clone() for layer, r in ranks.items()}
        A = {layer: self._A[layer][:r].clone() for layer, r in ranks.items()}
        return ClientInit(client_id, rank, self.scale, B, A, hook=ShrinkB()), 0.0, None

    def _new_accumulator(self):
        return {
            layer: [torch.zeros_like(self._B[layer]), torch.zeros_like(self._A[layer]), 0.0] for layer in self.shapes
        }

    def _accumulate(self, sums, update, handout):
        for layer, r in handout.ranks.items():
            sums[layer][0][:, :r] += update.num_examples * update.B[layer]
            sums[layer][1][:r] += update.num_examples * update.A[layer]
            sums[layer][2] += update.num_examples

    def _commit(self, sums, total_examples):
        for layer, (B, A, weight) in sums.items():
            self._B[layer], self._A[layer] = B / weight, A / weight
        return 0.0


@pytest.fixture
def registered():
    # Ray pickles this module's classes by value, so the actor and the workers get them
    # without importing the test file.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register_method(MeanOfFactors)
    yield MeanOfFactors
    METHODS.pop(MeanOfFactors.name)
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_method_registered_in_the_test_runs_end_to_end(registered, ray_session, tracking_uri, tmp_path):
    overrides = [
        f"method={registered.name}",
        "rounds=2",
        "num_clients=4",
        "clients_per_round=2",
        "max_rank=4",
        "ranks=[2,4]",
        "partition=iid",
        "partition_options={}",
        "dataset_options.max_examples=200",
        "train.local_steps=2",
        "train.batch_size=8",
        "train.max_seq_len=16",
        "eval.max_examples=16",
        "resources.num_cpus=1",
        "name=plugin",
    ]
    summary = run(
        load_spec("jobs/quickstart.yaml", overrides),
        run_dir=tmp_path / "run",
        tracking_uri=tracking_uri,
        progress=False,
    )

    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    # The hook ran in the workers at both points, and the actor summed its reports.
    assert [r["test_hooked_clients"] for r in records] == [r["clients_ok"] for r in records] == [2.0, 2.0]
    assert [r["test_pull_seen"] for r in records] == [2.0, 2.0]
    assert "eval_accuracy" in records[-1]
    # The actor aggregated with the test's method, and its state checkpoints and reloads.
    state = read_checkpoint(summary.run_dir).method_state
    assert state["meta"]["method"] == registered.name
    delta = method_from_state(state).global_delta()
    assert any(bool(d.abs().sum() > 0) for d in delta.values())
    assert (summary.run_dir / "adapter" / "adapter_config.json").is_file()


def test_registering_needs_a_named_method_and_a_free_name():
    with pytest.raises(ValueError, match="not a Method subclass"):
        register_method(int)
    with pytest.raises(ValueError, match="'fedit' is already registered"):
        register_method(type("Other", (MeanOfFactors,), {"name": "fedit"}))
