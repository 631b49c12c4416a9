"""Options left at their defaults change nothing: every method's rounds and a client's local
training are bit-identical to what fedray computed before the non-IID options existed.

``tests/data/default_rounds.json`` holds fingerprints recorded by this file's
``fingerprints()`` at commit e02951a (before ``server`` and ``train.prox_mu``,
``logit_adjust`` and ``head_rounds``). Float results can differ in their last bits on
another CPU or torch build, so the comparison is exact where the recording platform
matches, and skipped (saying why) elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from fedray.config import load_spec
from fedray.data import load_dataset
from fedray.methods import ClientUpdate, create_method
from fedray.models import ModelSpec, export_base, head_state, load_base
from fedray.worker.workbench import Workbench
from tests.test_methods import perturbed

GOLDEN = Path(__file__).parent / "data" / "default_rounds.json"
BUILTIN = ["fedit", "flora", "flexlora", "hetlora", "hlora", "fedplora"]
SHAPES = {"q": (24, 20), "v": (24, 16)}


def platform_key() -> str:
    return f"{platform.machine()} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def _hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _method_rounds(name: str) -> str:
    method = create_method(name, SHAPES, 8, scale=2.0, seed=3)
    noise = torch.Generator().manual_seed(11)
    for _ in range(3):
        updates = []
        for client, rank in enumerate([8] * 3 if name == "fedit" else [2, 8, 5]):
            B, A = perturbed(method.client_init(client, rank), noise)
            updates.append(ClientUpdate(client, rank, 10 + client, B, A))
        method.aggregate(updates)
    return _hash(method.global_delta())


def _client_training() -> str:
    torch.set_num_threads(1)
    bench = Workbench(export_base(load_base(ModelSpec("minilm", "classification", num_labels=2, seed=0))))
    spec = load_spec(None, ["train.max_seq_len=32", "train.local_steps=2", "train.batch_size=8"])
    shard = load_dataset("rotten_tomatoes", split_seed=0).train.subset(np.arange(40))
    method = create_method("fedplora", bench.layers, 8, scale=2.0, seed=0)
    result = bench.train(method.client_init(0, 4), shard, spec.train, head=head_state(bench.model), seed=1)
    tensors = {f"B.{k}": v for k, v in result.update.B.items()} | {f"A.{k}": v for k, v in result.update.A.items()}
    return _hash(tensors | {f"head.{k}": v for k, v in result.head.items()})


def fingerprints() -> dict[str, str]:
    values = {f"method.{name}": _method_rounds(name) for name in BUILTIN}
    values["workbench.train"] = _client_training()
    return values


def test_defaults_compute_what_they_computed_before():
    golden = json.loads(GOLDEN.read_text())
    if golden["platform"] != platform_key():
        pytest.skip(f"fingerprints were recorded on {golden['platform']}, this is {platform_key()}")
    assert fingerprints() == golden["fingerprints"]


if __name__ == "__main__":  # record: python tests/test_defaults_unchanged.py > tests/data/default_rounds.json
    print(json.dumps({"platform": platform_key(), "fingerprints": fingerprints()}, indent=1))
