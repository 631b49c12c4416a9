"""The worker's Ray tasks: what a client task yields, its injected faults, evaluation, and
the per-process workbench cache."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest
import ray
import torch

from fedray import inputs
from fedray.config import load_spec
from fedray.driver.prepare import prepare
from fedray.methods import create_method
from fedray.models import export_base, head_state, target_layers
from fedray.worker import evaluation, tasks
from fedray.worker.faults import InjectedFault
from fedray.worker.results import ClientResult

SMALL = [
    "num_clients=4",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=200",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.max_seq_len=16",
    "eval.max_examples=16",
    "resources.num_cpus=1",
]


@pytest.fixture(scope="module")
def setup(ray_session):
    spec = load_spec("jobs/quickstart.yaml", SMALL)
    prepared = prepare(spec)
    method = create_method("fedplora", target_layers(prepared.base.model, prepared.base.target_modules), 16, seed=0)
    return spec, prepared, ray.put(export_base(prepared.base)), method


def _launch(setup, client: int, *overrides: str):
    spec, prepared, shared_ref, method = setup
    spec = load_spec("jobs/quickstart.yaml", [*SMALL, *overrides])
    init = method.client_init(client, prepared.client_ranks[client])
    head = head_state(prepared.base.model)
    shard = prepared.partition.shards[client]
    return init, tasks.train_task.options(num_cpus=1).remote("test-tasks", [shared_ref], init, shard, spec, head, 7)


def test_a_client_task_yields_started_then_its_status_then_its_result(setup):
    init, task = _launch(setup, 0)
    started, status, result = ray.get(list(task))
    assert started == tasks.STARTED
    assert status["client_id"] == 0 and status["seconds"] > 0 and status["builds"] == 1
    assert isinstance(result, ClientResult) and result.update.client_id == 0
    assert result.update.rank == init.rank and result.metrics["worker"]["pid"] == status["pid"]
    assert all(torch.isfinite(B).all() for B in result.update.B.values())
    setup[3].abandon_round()


def test_injected_faults_act_in_the_task(setup):
    _, corrupt = _launch(setup, 1, "faults.corrupt_prob=1")
    result = ray.get(list(corrupt)[-1])
    assert all(torch.isnan(B).all() for B in result.update.B.values())
    _, failing = _launch(setup, 2, "faults.raise_prob=1")
    refs = list(failing)
    assert ray.get(refs[0]) == tasks.STARTED
    with pytest.raises(ray.exceptions.RayTaskError) as error:
        ray.get(refs[1])
    assert isinstance(error.value.cause, InjectedFault)
    setup[3].abandon_round()


def test_the_eval_task_scores_the_global_model_on_the_eval_set(setup):
    spec, prepared, shared_ref, method = setup
    state = (method.global_delta(), head_state(prepared.base.model))
    metrics = ray.get(tasks.eval_task.options(num_cpus=1).remote("test-tasks", [shared_ref], state, spec))
    assert set(metrics) == {"eval_accuracy", "eval_f1_macro", "eval_loss"}
    # Independently: 16 examples, so accuracy is a multiple of 1/16.
    assert len(inputs.eval_set(spec, inputs.dataset_split(spec))) == 16
    assert (metrics["eval_accuracy"] * 16).is_integer()


def test_an_evaluation_split_into_parts_scores_what_the_whole_does(setup):
    spec, prepared, shared_ref, method = setup
    spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"batch_size": 4})})  # 4 batches of 16
    torch.manual_seed(0)
    delta = {layer: 0.05 * torch.randn_like(value) for layer, value in method.global_delta().items()}
    state = (delta, head_state(prepared.base.model))
    whole = ray.get(tasks.eval_task.options(num_cpus=1).remote("test-tasks", [shared_ref], state, spec))
    for count in (2, 3, 5):  # 5: one part has no batch at all
        parts = [
            tasks.eval_task.options(num_cpus=1).remote("test-tasks", [shared_ref], state, spec, (index, count))
            for index in range(count)
        ]
        split = evaluation.classification_metrics(ray.get(parts))
        assert split["eval_accuracy"] == whole["eval_accuracy"] and split["eval_f1_macro"] == whole["eval_f1_macro"]
        assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-12)


def test_a_worker_keeps_the_workbenches_of_its_recent_runs(monkeypatch):
    built = []
    monkeypatch.setattr(tasks, "Workbench", lambda shared: built.append(shared) or object())
    monkeypatch.setattr(tasks.ray, "get", lambda ref: ref)
    monkeypatch.setattr(tasks, "_BENCHES", OrderedDict())
    monkeypatch.setattr(tasks, "_BUILDS", {})
    # Eight runs a CPU worker, two a GPU one (a device copy of its base each); two here.
    assert tasks.WORKBENCHES_PER_PROCESS == {"cpu": 8, "cuda": 2}
    monkeypatch.setattr(tasks, "WORKBENCHES_PER_PROCESS", {"cpu": 2, "cuda": 2})
    first, second = tasks.workbench("a", ["base a"]), tasks.workbench("b", ["base b"])
    # Two runs that share the worker take turns without rebuilding their base.
    for _ in range(3):
        assert tasks.workbench("a", ["base a"]) is first and tasks.workbench("b", ["base b"]) is second
    assert built == ["base a", "base b"] and tasks._BUILDS == {"a": 1, "b": 1}
    # A third run drops the least recently used one.
    tasks.workbench("c", ["base c"])
    assert list(tasks._BENCHES) == ["b", "c"]
    assert tasks.workbench("b", ["base b"]) is second
    tasks.workbench("a", ["base a"])
    assert tasks._BUILDS == {"a": 2, "b": 1, "c": 1} and list(tasks._BENCHES) == ["b", "a"]


def test_the_worker_side_imports_neither_ray_nor_mlflow():
    # Building the base and training or evaluating one client must run wherever torch,
    # transformers and peft do (a GPU box for checks, a notebook).
    modules = "fedray.worker.workbench, fedray.worker.faults, fedray.inputs"
    check = f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'ray', 'mlflow'}}))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
