"""The PEFT export of the global model, and the Fed-PLoRA module-similarity heatmap."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedray.export import BASE_SPEC_FILE, ExportInfo, export_adapter, load_adapter
from fedray.methods.lowrank import LowRank
from fedray.models import Base, ModelSpec, export_base, head_state, load_base
from fedray.worker.workbench import Workbench

SENTENCES = [
    "A gripping, beautifully acted drama that stays with you.",
    "Dull, overlong and badly written.",
    "The soundtrack is fine but the plot makes no sense at all, and the ending drags on forever.",
]
SCALE = 2.0
MAX_RANK = 4
#: Rank of the delta that the export has to truncate.
HIGH_RANK = 8
MINILM_TARGET_LAYERS = 12
#: Size of each entry of the random factors: large enough to move the logits well past ATOL.
FACTOR_STD = 0.05
#: float32 forward passes of W0 + delta and of W0 + s * B @ A differ in rounding only: a
#: few float32 ulps of the logits (seen: 1.0e-5 on a logit of 3.9, i.e. 2.6e-6 relative).
ATOL = 1e-5
RTOL = 1e-5
#: The random delta must change the logits by far more than ATOL, or the round trip proves nothing.
MIN_LOGIT_CHANGE = 1e-2
#: Fed-PLoRA heatmap inputs: clients, modules and vector length.


def spec() -> ModelSpec:
    return ModelSpec("minilm", "classification", num_labels=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # MiniLM-sized SVDs gain nothing from threads, and on a busy 2-core machine MKL's
    # threaded SVD stalls for seconds per call (12 layers: minutes instead of 0.5 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm() -> Base:
    return load_base(spec())


@pytest.fixture(scope="module")
def bench(minilm: Base) -> Workbench:
    return Workbench(export_base(minilm), device="cpu")


def random_factors(bench: Workbench, rank: int, seed: int) -> dict[str, LowRank]:
    """A random global delta ``s * B @ A`` of the given rank on every target layer, as factors."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for layer, (d, k) in bench.layers.items():
        B = torch.randn(d, rank, generator=generator) * FACTOR_STD
        A = torch.randn(rank, k, generator=generator) * FACTOR_STD
        factors[layer] = LowRank(SCALE * B, A)
    return factors


def random_delta(bench: Workbench, rank: int, seed: int) -> dict[str, torch.Tensor]:
    return {layer: factors.dense() for layer, factors in random_factors(bench, rank, seed).items()}


def random_head(bench: Workbench, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(value.shape, generator=generator) for name, value in head_state(bench.model).items()}


def encoded(base: Base) -> dict[str, torch.Tensor]:
    return dict(base.tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@torch.no_grad()
def fedray_logits(bench: Workbench, base: Base, delta, head) -> torch.Tensor:
    with bench.patched(delta, head):
        return bench.model(**encoded(base)).logits


@torch.no_grad()
def exported_logits(folder: Path, base: Base) -> torch.Tensor:
    # A fresh base: the export must carry everything, the head included.
    peft_model = PeftModel.from_pretrained(load_base(spec()).model, str(folder))
    peft_model.eval()
    logits = peft_model(**encoded(base)).logits
    if (folder / BASE_SPEC_FILE).exists():
        # load_adapter rebuilds the same base from the folder alone.
        torch.testing.assert_close(load_adapter(folder)(**encoded(base)).logits, logits)
    return logits


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).float()


def test_export_round_trip_loads_the_global_model(minilm: Base, bench: Workbench, tmp_path: Path) -> None:
    delta = random_delta(bench, MAX_RANK, seed=1)
    head = random_head(bench, seed=2)
    assert len(delta) == MINILM_TARGET_LAYERS
    weights_before = {key: value.clone() for key, value in minilm.model.state_dict().items()}
    modules_before = [(name, type(module)) for name, module in minilm.model.named_modules()]

    info = export_adapter(
        tmp_path,
        base_model=minilm.model,
        global_delta=delta,
        head=head,
        scale=SCALE,
        max_rank=MAX_RANK,
        source="minilm",
        model_spec=minilm.spec,
    )
    assert (tmp_path / BASE_SPEC_FILE).is_file()

    assert info.rank == MAX_RANK
    assert info.dropped_fraction == pytest.approx(0.0, abs=1e-6)
    assert set(info.per_layer_dropped) == set(delta)
    assert max(info.per_layer_dropped.values()) == pytest.approx(0.0, abs=1e-6)
    # The base model is untouched: same weights, same module tree.
    weights_after = minilm.model.state_dict()
    assert weights_after.keys() == weights_before.keys()
    assert all(torch.equal(weights_after[key], value) for key, value in weights_before.items())
    assert [(name, type(module)) for name, module in minilm.model.named_modules()] == modules_before

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == MAX_RANK
    assert config["lora_alpha"] / config["r"] == SCALE
    assert not config["use_rslora"]
    assert set(config["target_modules"]) == set(delta)
    assert "classifier" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == "minilm"
    assert config["task_type"] == "SEQ_CLS"

    expected = fedray_logits(bench, minilm, delta, head)
    base_logits = fedray_logits(bench, minilm, {}, None)
    assert (expected - base_logits).abs().max() > MIN_LOGIT_CHANGE
    torch.testing.assert_close(exported_logits(tmp_path, minilm), expected, atol=ATOL, rtol=RTOL)


def test_export_of_a_high_rank_delta_is_its_rank_r_truncation(minilm: Base, bench: Workbench, tmp_path: Path) -> None:
    factors = random_factors(bench, HIGH_RANK, seed=3)
    delta = {layer: matrix.dense() for layer, matrix in factors.items()}
    head = random_head(bench, seed=4)

    info = export_adapter(
        tmp_path, base_model=minilm.model, global_delta=delta, head=head, scale=SCALE, max_rank=MAX_RANK, source="m"
    )
    with pytest.raises(ValueError, match=f"no {BASE_SPEC_FILE}; load the base model yourself"):
        load_adapter(tmp_path)

    tail_sq, total_sq = 0.0, 0.0
    for layer, matrix in delta.items():
        singular_values = torch.linalg.svdvals(matrix.double())
        layer_tail_sq = float(singular_values[MAX_RANK:].square().sum())
        layer_total_sq = float(singular_values.square().sum())
        assert info.per_layer_dropped[layer] == pytest.approx(np.sqrt(layer_tail_sq / layer_total_sq), rel=1e-6)
        tail_sq += layer_tail_sq
        total_sq += layer_total_sq
    assert info.dropped_fraction == pytest.approx(np.sqrt(tail_sq / total_sq), rel=1e-6)
    assert info.dropped_fraction > 0.1

    # The saved factors are the truncation, at the run's scale.
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for layer, matrix in delta.items():
        B = saved[f"base_model.model.{layer}.lora_B.weight"]
        A = saved[f"base_model.model.{layer}.lora_A.weight"]
        assert B.shape[1] == A.shape[0] == MAX_RANK
        torch.testing.assert_close(SCALE * B @ A, truncated(matrix, MAX_RANK), atol=1e-6, rtol=1e-4)

    expected = fedray_logits(bench, minilm, {layer: truncated(m, MAX_RANK) for layer, m in delta.items()}, head)
    untruncated = fedray_logits(bench, minilm, delta, head)
    assert (expected - untruncated).abs().max() > MIN_LOGIT_CHANGE
    torch.testing.assert_close(exported_logits(tmp_path, minilm), expected, atol=ATOL, rtol=RTOL)


def test_export_of_factors_equals_export_of_their_product(minilm: Base, bench: Workbench, tmp_path: Path) -> None:
    factors = random_factors(bench, HIGH_RANK, seed=6)
    delta = {layer: matrix.dense() for layer, matrix in factors.items()}
    kwargs = {"base_model": minilm.model, "head": None, "scale": SCALE, "max_rank": MAX_RANK, "source": "m"}

    from_dense = export_adapter(tmp_path / "dense", global_delta=delta, **kwargs)
    from_factors = export_adapter(tmp_path / "factors", global_delta=factors, **kwargs)

    assert from_factors.dropped_fraction == pytest.approx(from_dense.dropped_fraction, rel=1e-6)
    for layer, fraction in from_dense.per_layer_dropped.items():
        assert from_factors.per_layer_dropped[layer] == pytest.approx(fraction, rel=1e-6)
    dense_saved = load_file(tmp_path / "dense" / "adapter_model.safetensors")
    factors_saved = load_file(tmp_path / "factors" / "adapter_model.safetensors")
    for layer in delta:
        key_B, key_A = (f"base_model.model.{layer}.lora_{name}.weight" for name in "BA")
        torch.testing.assert_close(
            factors_saved[key_B] @ factors_saved[key_A], dense_saved[key_B] @ dense_saved[key_A], atol=1e-6, rtol=1e-4
        )


def test_export_of_a_zero_delta_drops_nothing(minilm: Base, bench: Workbench, tmp_path: Path) -> None:
    delta = {layer: torch.zeros(shape) for layer, shape in bench.layers.items()}
    info = export_adapter(
        tmp_path, base_model=minilm.model, global_delta=delta, head=None, scale=SCALE, max_rank=MAX_RANK, source="m"
    )
    assert info == ExportInfo(0.0, dict.fromkeys(delta, 0.0), MAX_RANK)
    torch.testing.assert_close(
        exported_logits(tmp_path, minilm), fedray_logits(bench, minilm, {}, None), atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        ("bert.encoder.layer.0.attention.self.nope", (384, 384), "does not have"),
        ("query", (384, 384), "does not have"),
        ("bert.encoder.layer.0.attention.self", (384, 384), "not a Linear layer"),
        ("bert.encoder.layer.0.attention.self.query", (384, 383), "has shape"),
    ],
)
def test_export_rejects_a_delta_that_does_not_fit_the_model(
    minilm: Base, tmp_path: Path, layer: str, shape: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_adapter(
            tmp_path,
            base_model=minilm.model,
            global_delta={layer: torch.zeros(shape)},
            head=None,
            scale=SCALE,
            max_rank=MAX_RANK,
            source="m",
        )
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("wrong", ["shape", "name"])
def test_export_rejects_a_head_that_does_not_fit_the_model(
    minilm: Base, bench: Workbench, tmp_path: Path, wrong: str
) -> None:
    head = head_state(bench.model)
    if wrong == "shape":
        head = {name: torch.zeros(value.shape[0] + 1, *value.shape[1:]) for name, value in head.items()}
    else:
        head["classifier.scale"] = torch.ones(1)
    with pytest.raises(ValueError, match="head"):
        export_adapter(
            tmp_path,
            base_model=minilm.model,
            global_delta=random_delta(bench, MAX_RANK, seed=5),
            head=head,
            scale=SCALE,
            max_rank=MAX_RANK,
            source="m",
        )
    assert not (tmp_path / "adapter_config.json").exists()
