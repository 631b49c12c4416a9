"""Messages cross processes with their tensors as numpy arrays, and arrive unchanged."""

from __future__ import annotations

import pickle
import warnings

import torch

from fedray.methods import ClientUpdate, create_method
from fedray.methods.lowrank import LowRank
from fedray.worker.results import ClientResult

SHAPES = {"q": (6, 5), "v": (6, 7)}


def _same(left, right) -> None:
    """Equal values, dtypes and shapes in equal structures (tensors, LowRanks, dicts)."""
    if isinstance(left, torch.Tensor):
        assert left.dtype == right.dtype and torch.equal(left, right)
    elif isinstance(left, LowRank):
        _same(left.left, right.left)
        _same(left.right, right.right)
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            _same(left[key], right[key])
    else:
        assert left == right


def test_a_client_start_and_result_survive_pickling_bit_for_bit():
    method = create_method("fedplora", SHAPES, 4, scale=2.0, seed=0)
    init = method.client_init(0, 2)
    assert any(isinstance(fold, LowRank) for fold in init.fold.values())
    back = pickle.loads(pickle.dumps(init, protocol=5))
    for name in ("client_id", "rank", "scale", "B", "A", "fold"):
        _same(getattr(init, name), getattr(back, name))
    assert type(back.hook) is type(init.hook)

    update = ClientUpdate(3, {"q": 2, "v": 1}, 17, {"q": torch.randn(6, 2)}, {"q": torch.randn(2, 5)})
    head = {"weight": torch.randn(2, 6, dtype=torch.bfloat16), "bias": torch.zeros(2, dtype=torch.float16)}
    result = ClientResult(update, head, {"seconds": 0.5}, {"clients_pruned": 1.0})
    back = pickle.loads(pickle.dumps(result, protocol=5))
    for name in ("client_id", "rank", "num_examples", "B", "A"):
        _same(getattr(update, name), getattr(back.update, name))
    _same(result.head, back.head)
    assert back.metrics == result.metrics and back.method_metrics == result.method_metrics


def test_through_ray_the_tensors_own_writable_memory(ray_session):
    # Large enough for the object store, which hands numpy arrays over read-only.
    update = ClientUpdate(0, 64, 1, {"q": torch.randn(512, 64)}, {"q": torch.randn(64, 512)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over non-writable memory
        back = ray_session.get(ray_session.put(update))
        back.B["q"].add_(1.0)
    assert torch.equal(back.B["q"], update.B["q"] + 1.0)
