"""The workbench: local training and evaluation on the real MiniLM and real Rotten Tomatoes data."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedray.config import load_spec
from fedray.data import load_dataset
from fedray.methods import ClientUpdate, create_method
from fedray.models import ModelSpec, export_base, head_state, load_base
from fedray.worker.workbench import Workbench

SCALE = 2.0


@pytest.fixture(scope="module")
def shared():
    base = load_base(ModelSpec("minilm", "classification", num_labels=2, seed=0))
    shared = export_base(base)
    for array in shared.arrays.values():
        array.setflags(write=False)  # as Ray's object store hands them out
    return shared


@pytest.fixture(scope="module")
def bench(shared):
    torch.set_num_threads(2)
    return Workbench(shared)


@pytest.fixture(scope="module")
def split():
    return load_dataset("rotten_tomatoes", split_seed=0)


def _spec(**train):
    overrides = [f"train.{key}={value}" for key, value in train.items()]
    return load_spec(None, ["train.max_seq_len=32", "train.batch_size=16", "eval.batch_size=100", *overrides])


def _digest(shared) -> str:
    digest = hashlib.sha256()
    for key in sorted(shared.arrays):
        digest.update(shared.arrays[key].tobytes())
    return digest.hexdigest()


def test_training_lowers_the_loss_and_beats_chance_without_touching_the_base(bench, shared, split):
    before = _digest(shared)
    spec = _spec(local_steps=40, lr=2e-3)
    method = create_method("fedplora", bench.layers, 8, scale=SCALE, seed=0)
    shard = split.train.subset(np.arange(320))
    test = split.test.subset(np.arange(300))
    head = head_state(bench.model)
    start = bench.evaluate(method.global_delta(), shard, spec.eval, max_seq_len=spec.train.max_seq_len, head=head)

    result = bench.train(method.client_init(0, 4), shard, spec.train, head=head, seed=0)
    method.aggregate([result.update])
    trained = bench.evaluate(
        method.global_delta(), shard, spec.eval, max_seq_len=spec.train.max_seq_len, head=result.head
    )
    tested = bench.evaluate(
        method.global_delta(), test, spec.eval, max_seq_len=spec.train.max_seq_len, head=result.head
    )

    assert trained["eval_loss"] < start["eval_loss"] - 0.05
    assert tested["eval_accuracy"] > 0.6  # two balanced classes: chance is 0.5
    assert result.metrics["steps"] == 40 and result.metrics["examples"] == 320
    assert result.update.B[next(iter(bench.layers))].shape[1] == 4
    assert _digest(shared) == before
    # The workbench's model is the shared copy again, with no LoRA left behind.
    for name, array in shared.arrays.items():
        if name in dict(bench.model.named_parameters()):
            assert dict(bench.model.named_parameters())[name].data_ptr() == array.ctypes.data


def test_fedplora_client_starts_from_the_global_model(bench, split):
    method = create_method("fedplora", bench.layers, 8, scale=SCALE, seed=1)
    generator = torch.Generator().manual_seed(0)
    # A non-trivial global adapter: one round of made-up training.
    init = method.client_init(0, 8)
    B = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in init.B.items()}
    A = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in init.A.items()}
    method.aggregate([ClientUpdate(0, 8, 1, B, A)])
    batch = next(iter(_batches(bench, split)))
    with bench.patched(method.global_delta(), None):
        global_logits = bench.model(**batch).logits
    init = method.client_init(1, 3)
    assert init.fold  # three of eight modules train, five are folded
    with bench.client_model(init) as (model, _, _):
        client_logits = model(**batch).logits
    torch.testing.assert_close(client_logits, global_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(global_logits, bench.model(**batch).logits, atol=1e-3)


def _batches(bench, split):
    from fedray.data import make_batches

    for batch in make_batches(bench.tokenizer, split.test, np.arange(8), batch_size=8, max_seq_len=32):
        batch.pop("labels")
        yield batch


def test_same_seed_same_client(bench, split):
    spec = _spec(local_steps=3)
    shard = split.train.subset(np.arange(48))
    results = []
    for _ in range(2):
        method = create_method("hlora", bench.layers, 4, scale=SCALE, seed=0)
        results.append(bench.train(method.client_init(0, 2), shard, spec.train, head=head_state(bench.model), seed=5))
    for layer in bench.layers:
        assert torch.equal(results[0].update.B[layer], results[1].update.B[layer])
    assert results[0].metrics["train_loss"] == results[1].metrics["train_loss"]


def test_empty_shard_is_refused(bench, split):
    method = create_method("flora", bench.layers, 4)
    with pytest.raises(ValueError, match="client 0 has an empty shard"):
        bench.train(method.client_init(0, 2), split.train.subset([]), _spec(local_steps=1).train)


def test_smollm2_trains_and_scores_titles(smollm2):
    spec = load_spec(
        None,
        [
            "model=smollm2-135m",
            "dataset=bbc_titles",
            "train.local_steps=1",
            "train.batch_size=2",
            "train.max_seq_len=64",
            "eval.max_new_tokens=8",
            "eval.batch_size=4",
        ],
    )
    split = load_dataset("bbc_titles", split_seed=0)
    bench = Workbench(export_base(smollm2))
    assert len(bench.layers) == 60  # q_proj and v_proj of 30 layers
    method = create_method("hlora", bench.layers, 4, scale=SCALE)
    result = bench.train(method.client_init(0, 2), split.train.subset(np.arange(4)), spec.train)
    assert np.isfinite(result.metrics["train_loss"])
    method.aggregate([result.update])
    metrics = bench.evaluate(
        method.global_delta(), split.test.subset(np.arange(4)), spec.eval, max_seq_len=spec.train.max_seq_len
    )
    assert 0.0 <= metrics["eval_rougeL"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    assert metrics["eval_exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 examples


def test_hetlora_client_prunes_a_tail_the_regulariser_shrank(bench, split):
    spec = _spec(local_steps=4, lr=5e-3)
    shard = split.train.subset(np.arange(64))
    method = create_method("hetlora", bench.layers, 4, scale=SCALE, seed=0, prune_weight=50.0, prune_gamma=0.5)
    # Round 0 starts from B = 0: the tail cannot shrink below zero, so nobody prunes.
    fresh = bench.train(method.client_init(0, 4), shard, spec.train, seed=0)
    assert fresh.method_metrics == {"clients_pruned": 0.0} and fresh.update.rank == 4
    method.aggregate([fresh.update])
    # Now the global tail is not zero; a strong regulariser shrinks it and the client prunes.
    init = method.client_init(1, 4)
    result = bench.train(init, shard, spec.train, seed=0)
    assert result.method_metrics == {"clients_pruned": 1.0}
    assert result.update.rank == dict.fromkeys(bench.layers, 2)
    assert all(B.shape[1] == 2 for B in result.update.B.values())
    method.aggregate([result.update])
    assert method.pruned_ranks == {1: dict.fromkeys(bench.layers, 2)}


def _trained(bench, split, steps: int, **train):
    """Factors and head after ``steps`` plain-SGD steps on a fixed shard, from the same start."""
    spec = _spec(local_steps=steps, optimizer="sgd", lr=0.5, max_grad_norm="null", **train)
    method = create_method("fedit", bench.layers, 2, scale=SCALE, seed=0)
    result = bench.train(
        method.client_init(0, 2), split.train.subset(np.arange(32)), spec.train, seed=3, head=head_state(bench.model)
    )
    init = method.client_init(1, 2)
    values = {f"B.{k}": v for k, v in result.update.B.items()} | {f"head.{k}": v for k, v in result.head.items()}
    starts = {f"B.{k}": v for k, v in init.B.items()} | {f"head.{k}": v for k, v in head_state(bench.model).items()}
    return values, starts


def test_fedprox_adds_mu_times_the_distance_from_the_start_to_the_gradient(bench, split):
    mu, lr = 0.3, 0.5
    one, start = _trained(bench, split, 1)
    two, _ = _trained(bench, split, 2)
    prox, _ = _trained(bench, split, 2, prox_mu=mu)
    # Step 1 starts at theta_start (no pull); step 2's gradient gains mu * (theta_1 - theta_start),
    # so SGD lands lr * mu * (theta_1 - theta_start) short of plain SGD's second step.
    for name in one:
        expected = two[name] - lr * mu * (one[name] - start[name])
        assert torch.allclose(prox[name], expected, atol=1e-6), name
    assert any(not torch.equal(prox[name], two[name]) for name in one)


def test_logit_adjustment_trains_on_logits_shifted_by_the_client_label_shares():
    from fedray.worker import training

    shares = training.label_log_shares([1, 1, 1, 0], 3)
    assert torch.allclose(shares.exp(), torch.tensor([2 / 7, 4 / 7, 1 / 7]))
    logits = torch.tensor([[0.2, -0.1, 0.4], [1.0, 0.0, -1.0]])
    labels = torch.tensor([1, 0])
    loss = training.adjusted_loss(logits, labels, shares, tau=1.0)
    by_hand = -sum(torch.log_softmax(logits[row] + shares, dim=0)[labels[row]] for row in range(2)) / 2
    assert torch.allclose(loss, by_hand)
    assert torch.allclose(
        training.adjusted_loss(logits, labels, shares, tau=0.0), torch.nn.functional.cross_entropy(logits, labels)
    )


def test_logit_adjusted_client_leaves_its_majority_class_bias_alone(bench, split):
    """On a one-class shard, plain training pulls the head's bias toward that class; logit
    adjustment explains the skew by the shares, so its gradient pulls much less. (Plain SGD:
    AdamW's first steps move every value by about lr whatever the gradient's size.)"""
    only_positive = [i for i, label in enumerate(split.train.labels) if label == 1][:48]
    shard = split.train.subset(np.array(only_positive))
    head = head_state(bench.model)
    bias = next(name for name in head if name.endswith("bias"))
    pulls = {}
    for tau in (0.0, 1.0):
        spec = _spec(local_steps=4, lr=0.05, optimizer="sgd", logit_adjust=tau)
        method = create_method("fedit", bench.layers, 2, scale=SCALE, seed=0)
        result = bench.train(method.client_init(0, 2), shard, spec.train, head=head, seed=0)
        change = result.head[bias] - head[bias]
        pulls[tau] = float(change[1] - change[0])
    assert pulls[0.0] > 0 and pulls[1.0] < pulls[0.0] / 2, pulls


def test_head_stays_put_in_a_round_that_does_not_train_it(bench, split):
    spec = _spec(local_steps=2, head_rounds=1)
    assert spec.train.trains_head(0) and not spec.train.trains_head(1)
    method = create_method("fedit", bench.layers, 2, scale=SCALE, seed=0)
    result = bench.train(
        method.client_init(0, 2),
        split.train.subset(np.arange(16)),
        spec.train,
        head=head_state(bench.model),
        train_head=False,
    )
    assert result.head is None


def test_gradient_checkpointing_trains_the_same_client_without_writing_the_base(bench, shared, split):
    before = _digest(shared)
    shard = split.train.subset(np.arange(32))
    results = []
    for checkpointing in (False, True):
        spec = _spec(local_steps=2, gradient_checkpointing=checkpointing)
        method = create_method("fedplora", bench.layers, 4, scale=SCALE, seed=0)
        results.append(bench.train(method.client_init(0, 2), shard, spec.train, head=head_state(bench.model), seed=4))
    plain, checkpointed = results
    assert abs(plain.metrics["train_loss"] - checkpointed.metrics["train_loss"]) <= 1e-5
    for layer in bench.layers:
        assert torch.allclose(plain.update.B[layer], checkpointed.update.B[layer], atol=1e-5)
    on = getattr(bench.model, "is_activation_checkpointing", None)
    assert not (bench.model.is_gradient_checkpointing if on is None else on)  # off again for the next client
    assert _digest(shared) == before


def test_a_bfloat16_base_trains_float32_factors():
    base = load_base(ModelSpec("minilm", "classification", num_labels=2, seed=0, dtype="bfloat16"))
    assert next(base.model.bert.parameters()).dtype == torch.bfloat16
    bench = Workbench(export_base(base))
    spec = _spec(local_steps=1)
    method = create_method("fedit", bench.layers, 2, scale=SCALE, seed=0)
    shard = load_dataset("rotten_tomatoes", split_seed=0).train.subset(np.arange(8))
    result = bench.train(method.client_init(0, 2), shard, spec.train, seed=0)
    assert all(B.dtype == torch.float32 for B in result.update.B.values())
    assert np.isfinite(result.metrics["train_loss"])
    with pytest.raises(ValueError, match="dtype 'float64' is unknown"):
        ModelSpec("minilm", "classification", num_labels=2, dtype="float64")
