"""A whole run through the real Ray path (driver lifecycle, worker tasks, the aggregation actor, MLflow, outputs)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel

from fedray.config import load_spec
from fedray.data import make_batches
from fedray.driver import lifecycle, rounds
from fedray.driver.checkpoint import read_checkpoint
from fedray.driver.lifecycle import run
from fedray.methods import METHODS, method_from_state
from fedray.models import ModelSpec, SharedBase, export_base, load_base
from fedray.worker.workbench import Workbench

ROUND_METRICS = [
    "eval_accuracy",
    "eval_loss",
    "train_loss",
    "init_noise",
    "init_noise_rel",
    "agg_noise",
    "agg_noise_rel",
    "bytes_up",
    "bytes_down",
    "round_s",
    "client_s_p50",
    "client_s_max",
    "clients_ok",
    "clients_failed",
]

TINY = [
    "rounds=2",
    "num_clients=4",
    "clients_per_round=2",
    "max_rank=4",
    "ranks=[1,2,4]",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=400",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.max_seq_len=24",
    "eval.every=1",
    "eval.max_examples=32",
    "eval.batch_size=16",  # two batches: the evaluation runs as two tasks, one per client slot
    "resources.num_cpus=0.5",
    "resources.num_gpus=0.5",
]


def tiny_spec(method: str, *extra: str):
    ranks = ["ranks=[4]"] if method == "fedit" else []
    return load_spec("jobs/quickstart.yaml", [*TINY, f"method={method}", f"name=test-{method}", *ranks, *extra])


def _digest(arrays) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_of_each_method(method, ray_session, tracking_uri, tmp_path, monkeypatch):
    ray = ray_session
    puts = []
    real_put = ray.put

    def counting_put(value, *args, **kwargs):
        ref = real_put(value, *args, **kwargs)
        if isinstance(value, SharedBase):
            puts.append(ref)
        return ref

    monkeypatch.setattr(ray, "put", counting_put)
    real = rounds.classification_metrics
    combined = []  # each evaluation: how many tasks scored a part of it
    monkeypatch.setattr(rounds, "classification_metrics", lambda parts: combined.append(len(parts)) or real(parts))
    # HETLoRA runs with its rank self-pruning on, so a real run exercises it too.
    pruning = ["method_options.prune_weight=50", "method_options.prune_gamma=0.5"] if method == "hetlora" else []
    spec = tiny_spec(method, *pruning)
    summary = run(spec, run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False)
    assert combined == [2] * spec.rounds  # two client slots, two eval batches

    # MLflow: params, tags and every metric for every round.
    client = MlflowClient(tracking_uri)
    mlflow_run = client.get_run(summary.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["method"] == method and mlflow_run.data.params["train.local_steps"] == "2"
    assert mlflow_run.data.tags["method"] == method
    assert mlflow_run.data.tags["label"] == method  # no label in the spec: the method names the run
    for name in ROUND_METRICS:
        steps = [m.step for m in client.get_metric_history(summary.run_id, name)]
        assert sorted(steps) == [0, 1], name
    history = {name: [m.value for m in client.get_metric_history(summary.run_id, name)] for name in ROUND_METRICS}
    assert history["clients_ok"] == [2.0, 2.0] and history["clients_failed"] == [0.0, 0.0]
    assert all(v > 0 for v in history["bytes_up"] + history["bytes_down"])
    if method == "fedplora":
        assert history["init_noise"] == [0.0, 0.0]
    if method in ("flora", "flexlora", "hlora"):
        assert history["agg_noise"] == [0.0, 0.0]
    if method == "hetlora":
        pruned = {m.step: m.value for m in client.get_metric_history(summary.run_id, "clients_pruned")}
        # Logged every round; round 0 starts from B = 0, a tail that cannot shrink (the
        # pruning itself is tested in test_workbench.py).
        assert sorted(pruned) == [0, 1] and pruned[0] == 0.0

    # The run directory a user takes away.
    run_dir = summary.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and "eval_accuracy" in records[-1]
    assert load_spec(run_dir / "spec.yaml") == spec
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"spec.yaml", "metrics.jsonl", "partition.json", "adapter"} <= artifacts

    # One put of the base, one build per worker process, and the shared copy unchanged.
    assert len(puts) == 1
    assert summary.worker_builds and all(w["builds"] == 1 for w in summary.worker_builds.values())
    fresh = export_base(load_base(ModelSpec("minilm", "classification", num_labels=2, seed=spec.seed)))
    assert _digest(ray.get(puts[0]).arrays) == _digest(fresh.arrays)

    # The exported PEFT adapter computes fedray's global model (its best rank-R form).
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint.info["round"] == 1 and checkpoint.info["run_id"] == summary.run_id
    method_state = method_from_state(checkpoint.method_state)
    truncated = {}
    for layer, delta in method_state.global_delta().items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        R = spec.max_rank
        truncated[layer] = ((U[:, :R] * S[:R]) @ Vh[:R]).float()
    bench = Workbench(fresh)
    batch = next(make_batches(bench.tokenizer, _test_texts(spec), np.arange(8), batch_size=8, max_seq_len=24))
    batch.pop("labels")
    with bench.patched(truncated, checkpoint.head):
        expected = bench.model(**batch).logits
    loaded = PeftModel.from_pretrained(
        load_base(ModelSpec("minilm", "classification", num_labels=2)).model, run_dir / "adapter"
    )
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def _test_texts(spec):
    from fedray import inputs

    return inputs.eval_set(spec, inputs.dataset_split(spec))


def test_fedplora_run_draws_the_module_similarity(ray_session, tracking_uri, tmp_path):
    summary = run(
        tiny_spec("fedplora", "rounds=1"), run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False
    )
    for stem in ("module_similarity", "module_change_similarity"):
        image = summary.run_dir / f"{stem}.png"
        assert image.stat().st_size > 1000
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_runs_actor_serves_the_next_run_identically(ray_session, tracking_uri, tmp_path, monkeypatch):
    """A driver's next run takes the idle aggregation actor of its last finished run (no new
    process and imports) and ends bit for bit as it does with a new actor."""
    for _, idle in lifecycle._IDLE_AGGREGATORS:
        ray_session.kill(idle)
    monkeypatch.setattr(lifecycle, "_IDLE_AGGREGATORS", [])
    started = []
    start_aggregator = lifecycle._start_aggregator

    def remember(*args):
        started.append(start_aggregator(*args))
        return started[-1]

    monkeypatch.setattr(lifecycle, "_start_aggregator", remember)
    # The first run's actor is new; it first serves another method, then the run compared.
    fresh = run(tiny_spec("hlora", "rounds=2"), run_dir=tmp_path / "fresh", tracking_uri=tracking_uri, progress=False)
    run(tiny_spec("fedplora", "rounds=1"), run_dir=tmp_path / "between", tracking_uri=tracking_uri, progress=False)
    again = run(tiny_spec("hlora", "rounds=2"), run_dir=tmp_path / "again", tracking_uri=tracking_uri, progress=False)
    assert started[0] == started[1] == started[2]
    assert [idle for _, idle in lifecycle._IDLE_AGGREGATORS] == [started[0]]

    (first, second) = (read_checkpoint(summary.run_dir) for summary in (fresh, again))
    delta, other = (method_from_state(c.method_state).global_delta() for c in (first, second))
    assert all(torch.equal(delta[layer], other[layer]) for layer in delta)
    assert all(torch.equal(first.head[name], second.head[name]) for name in first.head)
    for name in ("train_loss", "eval_accuracy", "init_noise", "agg_noise"):
        assert [record[name] for record in fresh.rounds] == [record[name] for record in again.rounds], name

    # A driver that starts Ray again takes no actor of the session before.
    monkeypatch.setattr(lifecycle, "_ray_session", lambda: ("another node", "01000000"))
    run(tiny_spec("fedit", "rounds=1"), run_dir=tmp_path / "elsewhere", tracking_uri=tracking_uri, progress=False)
    assert started[3] != started[0]
    ray_session.kill(started[0])  # idle, and no longer in the pool
