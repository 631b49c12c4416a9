"""The model registry: offline loading, LoRA targets, and the zero-copy shared base."""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedray import models
from fedray.models import (
    ModelSpec,
    SharedBase,
    build_model,
    default_cache_dir,
    export_base,
    load_base,
    target_layers,
)

SENTENCES = [
    "A gripping, beautifully acted drama that stays with you.",
    "Dull, overlong and badly written.",
    "The soundtrack is fine but the plot makes no sense at all, and the ending drags on forever.",
]
#: Rebuilding MiniLM from shared arrays takes ~0.02 s here; a copy of its 90 MB would show.
MAX_BUILD_S = 1.0
#: A cached SmolLM2 load takes ~0.5 s here; the GGUF conversion ~20 s.
MAX_CACHED_LOAD_S = 5.0
#: Pickle protocol 5 hands large buffers to a callback instead of copying them, as Ray does.
PICKLE_OUT_OF_BAND = 5
#: The pickled recipe (config, tokenizer, names) is ~1 MB; MiniLM's weights are 90 MB.
MAX_RECIPE_BYTES = 4_000_000
MINILM_NUM_LAYERS = 6
MINILM_HIDDEN = 384
MINILM_FFN = 1536
#: Sizes of the tiny random models built in tests.
TINY_VOCAB = 64
TINY_HIDDEN = 32
SMOLLM2_NUM_LAYERS = 30
SMOLLM2_HIDDEN = 576
SMOLLM2_KV_DIM = 192


def minilm_spec(**overrides: object) -> ModelSpec:
    return ModelSpec(**{"name": "minilm", "task": "classification", "num_labels": 3, **overrides})


@pytest.fixture(scope="session")
def minilm() -> models.Base:
    return load_base(minilm_spec())


def read_only_export(base: models.Base) -> SharedBase:
    """Export ``base`` with read-only arrays, as Ray's object store hands them to a task."""
    shared = export_base(base)
    for array in shared.arrays.values():
        array.setflags(write=False)
    return shared


def assert_shares_arrays(model: torch.nn.Module, shared: SharedBase) -> None:
    """Every weight of the rebuilt ``model`` is a view of the shared array, not a copy."""
    state = model.state_dict()
    for key, array in shared.arrays.items():
        assert state[key].data_ptr() == array.ctypes.data, f"{key} was copied"
    for alias, key in shared.tied.items():
        assert state[alias].data_ptr() == shared.arrays[key].ctypes.data, f"{alias} is not tied to {key}"


def test_minilm_loads_offline_frozen_with_seeded_head(minilm: models.Base) -> None:
    again = load_base(minilm_spec())
    other_seed = load_base(minilm_spec(seed=1))

    assert minilm.model_type == "bert"
    assert minilm.model.config.num_labels == 3
    assert torch.equal(minilm.model.classifier.weight, again.model.classifier.weight)
    assert not torch.equal(minilm.model.classifier.weight, other_seed.model.classifier.weight)
    # The pretrained encoder is the same whatever the seed.
    assert torch.equal(
        minilm.model.bert.encoder.layer[0].attention.self.query.weight,
        other_seed.model.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_loads_from_concurrent_threads_get_the_heads_of_their_own_seeds(minilm: models.Base) -> None:
    from concurrent.futures import ThreadPoolExecutor

    alone = {seed: load_base(minilm_spec(seed=seed)).model.classifier.weight for seed in (0, 1)}
    seeds = [0, 1, 0, 1, 0, 1]
    with ThreadPoolExecutor(len(seeds)) as pool:
        heads = list(pool.map(lambda seed: load_base(minilm_spec(seed=seed)).model.classifier.weight, seeds))
    for seed, head in zip(seeds, heads):
        assert torch.equal(head, alone[seed]), f"a concurrent load of seed {seed} drew another head"


def test_minilm_head_reads_the_masked_mean_of_its_tokens(minilm: models.Base) -> None:
    # all-MiniLM-L6-v2 ships a sentence-transformers config that says it pools by mean.
    assert isinstance(minilm.model, models.MeanPoolingBertForSequenceClassification)
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = minilm.model(**batch).logits
        hidden = minilm.model.bert(**batch).last_hidden_state
        for i, sentence in enumerate(SENTENCES):
            length = int(batch["attention_mask"][i].sum())
            expected = minilm.model.classifier(hidden[i, :length].mean(dim=0))
            torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=1e-5)
            # Padding does not change a sentence's logits.
            alone = minilm.model(**minilm.tokenizer([sentence], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)


def test_cls_pooling_keeps_the_architectures_own_head() -> None:
    base = load_base(minilm_spec(pooling="cls"))
    assert type(base.model).__name__ == "BertForSequenceClassification"


def test_auto_pooling_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert models.resolve_pooling("auto", str(tmp_path)) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert models.resolve_pooling("auto", str(tmp_path)) == "mean"
    assert models.resolve_pooling("cls", str(tmp_path)) == "cls"


def test_mean_pooling_on_a_non_bert_model_names_the_fix(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="set pooling to cls"):
        load_base(ModelSpec(name=str(tmp_path), task="classification", num_labels=2, pooling="mean"))
    with pytest.raises(ValueError, match="pooling 'max' is unknown"):
        minilm_spec(pooling="max")


def test_loading_is_quiet_about_the_new_head_and_warns_of_real_gaps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import GPT2ForSequenceClassification

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new "score" head and the unused LM head are expected
        models.registry._from_pretrained(GPT2ForSequenceClassification, tmp_path, num_labels=2)
    assert "LOAD REPORT" not in caplog.text

    weights = load_file(tmp_path / "model.safetensors")
    del weights["transformer.h.0.mlp.c_fc.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 weights .* not in the checkpoint .*h\.0\.mlp\.c_fc\.weight"):
        models.registry._from_pretrained(GPT2ForSequenceClassification, tmp_path, num_labels=2)


def test_minilm_default_targets_are_query_and_value(minilm: models.Base) -> None:
    layers = target_layers(minilm.model, minilm.target_modules)

    assert minilm.target_modules == ("query", "value")
    assert len(layers) == 2 * MINILM_NUM_LAYERS
    assert {name.rpartition(".")[2] for name in layers} == {"query", "value"}
    assert set(layers.values()) == {(MINILM_HIDDEN, MINILM_HIDDEN)}
    assert {name: module.weight.shape for name, module in minilm.model.named_modules() if name in layers} == {
        name: torch.Size(shape) for name, shape in layers.items()
    }


def test_ffn_targets_report_out_by_in_shapes() -> None:
    base = load_base(minilm_spec(target_modules=["intermediate.dense"]))

    layers = target_layers(base.model, base.target_modules)

    assert base.target_modules == ("intermediate.dense",)
    assert len(layers) == MINILM_NUM_LAYERS
    assert set(layers.values()) == {(MINILM_FFN, MINILM_HIDDEN)}


def test_unknown_target_module_names_the_available_layers() -> None:
    with pytest.raises(ValueError, match=r"'q_proj' matches no Linear layer.*query.*value"):
        load_base(minilm_spec(target_modules=("q_proj",)))


def test_rebuilt_minilm_computes_the_same_logits_without_copying(minilm: models.Base) -> None:
    shared = read_only_export(minilm)
    start = time.perf_counter()
    rebuilt = build_model(shared)
    build_s = time.perf_counter() - start

    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = minilm.model(**batch).logits
        actual = rebuilt(**batch).logits

    assert torch.equal(actual, expected)
    assert build_s < MAX_BUILD_S
    assert_shares_arrays(rebuilt, shared)
    assert not rebuilt.training
    assert not any(p.requires_grad for p in rebuilt.parameters())
    # The buffers the state dict leaves out were restored, not left on the meta device.
    assert torch.equal(rebuilt.bert.embeddings.position_ids, minilm.model.bert.embeddings.position_ids)


def test_shared_base_pickles_out_of_band_like_ray(minilm: models.Base) -> None:
    shared = export_base(minilm)
    out_of_band: list[pickle.PickleBuffer] = []

    recipe = pickle.dumps(shared, protocol=PICKLE_OUT_OF_BAND, buffer_callback=out_of_band.append)
    received = pickle.loads(recipe, buffers=out_of_band)
    rebuilt = build_model(received)

    # Only the recipe and tokenizer travel in-band; every weight rides as a buffer, as in Ray's object store.
    assert len(recipe) < MAX_RECIPE_BYTES < shared.nbytes()
    for key, array in received.arrays.items():
        assert np.shares_memory(array, shared.arrays[key])
    assert_shares_arrays(rebuilt, received)


def test_lora_training_on_the_rebuilt_model_leaves_the_shared_arrays_untouched(minilm: models.Base) -> None:
    shared = read_only_export(minilm)
    before = {key: array.copy() for key, array in shared.arrays.items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(shared.target_modules), modules_to_save=["classifier"])
    rebuilt = build_model(shared)
    model = get_peft_model(rebuilt, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    batch = shared.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        logits_before = model(**batch).logits

    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        logits_after = model(**batch).logits
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert not torch.allclose(logits_before, logits_after)
    for key, array in shared.arrays.items():
        assert np.array_equal(array, before[key]), f"{key} changed"
    # peft wraps the shared weights in place: they still back the model that trained.
    addresses = {p.data_ptr() for p in model.parameters()}
    assert {array.ctypes.data for array in shared.arrays.values()} <= addresses


def test_bfloat16_weights_rebuild_without_copying(minilm: models.Base) -> None:
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    spec = ModelSpec(name="tiny-llama", task="generation")
    base = models.Base(spec=spec, model=model, tokenizer=minilm.tokenizer, target_modules=("q_proj",), source="")
    shared = read_only_export(base)
    tokens = torch.arange(TINY_VOCAB).reshape(2, -1)

    rebuilt = build_model(shared)

    assert shared.dtypes["model.embed_tokens.weight"] == "bfloat16"
    assert rebuilt.model.embed_tokens.weight.dtype == torch.bfloat16
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)
    assert_shares_arrays(rebuilt, shared)


def test_gpt2_conv1d_targets_report_out_by_in_shapes() -> None:
    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=2, n_head=2)

    layers = target_layers(GPT2LMHeadModel(config), ("c_attn",))

    assert layers == {f"transformer.h.{i}.attn.c_attn": (3 * TINY_HIDDEN, TINY_HIDDEN) for i in range(2)}


def test_smollm2_converts_once_into_the_cache(
    smollm2: models.Base, smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted = list((smollm2_cache / "converted").iterdir())

    def convert_again(*_: object) -> None:
        raise AssertionError("converted the GGUF file a second time")

    monkeypatch.setattr(models.gguf, "_convert_gguf", convert_again)
    start = time.perf_counter()
    again = load_base(ModelSpec(name="smollm2-135m", task="generation"), cache_dir=smollm2_cache)
    cached_load_s = time.perf_counter() - start

    assert [path.name for path in converted] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert (converted[0] / "model.safetensors").is_file()
    assert again.source == smollm2.source == str(converted[0])
    assert cached_load_s < MAX_CACHED_LOAD_S


def test_smollm2_generates_and_targets_q_and_v(smollm2: models.Base) -> None:
    layers = target_layers(smollm2.model, smollm2.target_modules)
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    output = smollm2.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = smollm2.tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)

    assert smollm2.model_type == "llama"
    assert "Paris" in answer
    assert smollm2.target_modules == ("q_proj", "v_proj")
    assert len(layers) == 2 * SMOLLM2_NUM_LAYERS
    assert {shape for name, shape in layers.items() if name.endswith("q_proj")} == {(SMOLLM2_HIDDEN, SMOLLM2_HIDDEN)}
    assert {shape for name, shape in layers.items() if name.endswith("v_proj")} == {(SMOLLM2_KV_DIM, SMOLLM2_HIDDEN)}


def test_rebuilt_smollm2_keeps_tied_weights_and_logits(smollm2: models.Base) -> None:
    shared = read_only_export(smollm2)
    rebuilt = build_model(shared)
    batch = smollm2.tokenizer(SENTENCES, padding=True, return_tensors="pt")

    with torch.no_grad():
        expected = smollm2.model(**batch).logits
        actual = rebuilt(**batch).logits

    assert shared.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert torch.equal(actual, expected)
    assert_shares_arrays(rebuilt, shared)


def test_failed_conversion_leaves_no_cache_and_a_done_one_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "tiny.Q4.gguf"
    cache = tmp_path / "cache"

    def interrupted(_: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{")
        raise KeyboardInterrupt

    def completes(_: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models.gguf, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.gguf._converted_gguf(gguf, cache)
    assert list((cache / "converted").iterdir()) == []

    monkeypatch.setattr(models.gguf, "_convert_gguf", completes)
    folder = models.gguf._converted_gguf(gguf, cache)
    monkeypatch.setattr(models.gguf, "_convert_gguf", interrupted)

    assert models.gguf._converted_gguf(gguf, cache) == folder
    assert [path.name for path in (cache / "converted").iterdir()] == ["tiny.Q4"]
    assert (folder / "config.json").read_text() == "{}"


def test_hub_id_offline_fails_with_the_offline_models() -> None:
    with pytest.raises(ValueError, match=r"'some-org/some-model'.*\(minilm, smollm2-135m\) or a local model folder"):
        load_base(ModelSpec(name="some-org/some-model", task="generation"))


def test_missing_local_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=f"model folder {missing} does not exist"):
        load_base(ModelSpec(name=str(missing), task="generation"))


def test_local_folder_loads_like_the_builtin(minilm: models.Base) -> None:
    folder = Path(minilm.source)

    base = load_base(ModelSpec(name=str(folder), task="classification", num_labels=3))

    assert base.target_modules == ("query", "value")
    assert torch.equal(base.model.classifier.weight, minilm.model.classifier.weight)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "minilm", "task": "classification"}, "num_labels=None is invalid for classification"),
        ({"name": "minilm", "task": "generation", "num_labels": 2}, "applies only to classification"),
        ({"name": "minilm", "task": "regression"}, "task 'regression' is unknown"),
        ({"name": "minilm", "task": "classification", "num_labels": 2, "target_modules": "query"}, "non-empty list"),
    ],
)
def test_bad_spec_fields_are_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(**fields)


def test_minilm_cannot_generate() -> None:
    with pytest.raises(ValueError, match="minilm cannot do task generation; use task classification"):
        load_base(ModelSpec(name="minilm", task="generation"))


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(models.CACHE_ENV_VAR)
    assert default_cache_dir() == Path.home() / ".cache" / "fedray"
