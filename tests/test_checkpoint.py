"""Atomic per-round checkpoints: what a resume reads back, what a kill mid-write leaves."""

from __future__ import annotations

import json

import pytest
import torch

from fedray.driver.checkpoint import CHECKPOINT_DIR, KEEP_ROUNDS, LATEST, read_checkpoint, write_checkpoint
from fedray.methods import create_method, method_from_state

SHAPES = {"q": (6, 4), "v": (5, 5)}


def _method(seed: int):
    return create_method("hetlora", SHAPES, 4, scale=2.0, seed=seed, prune_weight=0.1)


def test_a_checkpoint_reads_back_exactly(tmp_path):
    method = _method(seed=3)
    head = {"classifier.weight": torch.randn(2, 3), "classifier.bias": torch.randn(2)}
    info = {"run_id": "r1", "spec_digest": "abc", "metrics": {"round": 4, "train_loss": 0.5}}
    write_checkpoint(tmp_path, 4, method.state_dict(), head, info)

    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.info["round"] == 4 and checkpoint.info["run_id"] == "r1"
    assert checkpoint.info["metrics"] == info["metrics"]
    assert checkpoint.head.keys() == head.keys()
    assert all(torch.equal(checkpoint.head[name], value) for name, value in head.items())
    restored = method_from_state(checkpoint.method_state)
    assert restored.options == method.options
    for layer, delta in method.global_delta().items():
        assert torch.equal(restored.global_delta()[layer], delta)
    # The restored generator continues the same stream: the next client starts agree.
    assert torch.equal(restored.client_init(0, 4).A["q"], method.client_init(0, 4).A["q"])


def test_a_run_without_a_head_and_the_rounds_kept(tmp_path):
    for round_index in range(5):
        write_checkpoint(tmp_path, round_index, _method(seed=round_index).state_dict(), None, {"metrics": {}})
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.info["round"] == 4 and checkpoint.head is None
    kept = sorted(path.name for path in (tmp_path / CHECKPOINT_DIR).glob("round-*"))
    assert kept == [f"round-{r:06d}.method.safetensors" for r in range(5 - KEEP_ROUNDS, 5)]
    assert torch.equal(method_from_state(checkpoint.method_state).global_delta()["q"], _method(4).global_delta()["q"])


def test_a_write_killed_before_latest_leaves_the_previous_round(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 0, _method(seed=0).state_dict(), None, {"metrics": {}})

    def killed(path):
        path.write_text('{"round": 1, "meth')  # half a file, as a kill leaves it
        raise KeyboardInterrupt

    from fedray.driver import checkpoint as module

    original = module.atomic_write

    def atomic(path, write):
        original(path, killed if path.name == LATEST else write)

    monkeypatch.setattr(module, "atomic_write", atomic)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 1, _method(seed=1).state_dict(), None, {"metrics": {}})
    assert read_checkpoint(tmp_path).info["round"] == 0
    assert json.loads((tmp_path / CHECKPOINT_DIR / LATEST).read_text())["round"] == 0


def test_no_checkpoint_names_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint .* start it again without --resume"):
        read_checkpoint(tmp_path)
