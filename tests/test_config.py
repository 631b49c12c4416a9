"""The run spec: loading, overrides, and one clear sentence for every bad field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedray.config import SpecError, load_spec

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_overrides_reach_nested_fields_with_yaml_types():
    spec = load_spec(JOBS / "quickstart.yaml", ["rounds=4", "method=hlora", "train.lr=1e-3", "ranks=[2,4]"])
    assert (spec.rounds, spec.method, spec.train.lr, spec.ranks) == (4, "hlora", 1e-3, [2, 4])
    assert load_spec(None, ["clients_per_round=0.25", "num_clients=20"]).sampled_clients == 5


def test_method_specs_extend_the_quickstart():
    quick = load_spec(JOBS / "quickstart.yaml")
    for method in ("fedit", "flora", "flexlora", "hetlora", "hlora"):
        spec = load_spec(JOBS / f"{method}.yaml")
        assert spec.method == method and spec.name == quick.name
        assert spec.train == quick.train and spec.partition_options == quick.partition_options
    assert load_spec(JOBS / "fedit.yaml").ranks == [16]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["roundz=3"], "unknown spec field 'roundz'; did you mean 'rounds'?"),
        (["train.lrr=1"], "unknown spec field 'train.lrr'; did you mean 'train.lr'?"),
        (["rounds=many"], "invalid spec field 'rounds' = 'many': Input should be a valid integer"),
        (["method=lora"], "method 'lora' is unknown; choose one of"),
        (["ranks=[2,32]"], "rank 32 in ranks=[2, 32] exceeds max_rank=16"),
        (["clients_per_round=1.5"], "a fraction must be in (0, 1]"),
        (["clients_per_round=40"], "exceeds num_clients=20"),
        (["method=fedit"], "fedit is the homogeneous baseline: every client must train at max_rank=16"),
        (["method_options.weighting=norm"], "method_options.weighting is not an option of fedplora"),
        (["method=hetlora", "method_options.weighting=size"], "weighting must be one of"),
        (["partition=iid"], "partition_options do not fit partition=iid"),
        (["train.local_epochs=1"], "set exactly one of train.local_steps and train.local_epochs"),
        (["rounds"], "override 'rounds' must look like key=value"),
    ],
)
def test_bad_specs_get_one_clear_sentence(overrides, message):
    with pytest.raises(SpecError) as error:
        load_spec(JOBS / "quickstart.yaml", overrides)
    assert message in str(error.value)


def test_missing_and_malformed_spec_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(SpecError, match="is it circular"):
        load_spec(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_job_spec_validates_and_its_partition_splits(path):
    from fedray import inputs
    from fedray.data import create_partitioner

    spec = load_spec(path)
    partitioner = create_partitioner(spec.partition, **({"seed": spec.seed} | spec.partition_options))
    partition = partitioner.partition(inputs.dataset_split(spec).train, spec.num_clients)
    assert partition.num_clients == spec.num_clients


def test_logit_adjustment_on_a_generation_task_is_refused_before_the_model_loads():
    from fedray.driver.prepare import prepare

    spec = load_spec(None, ["dataset=bbc_titles", "model=smollm2-135m", "train.logit_adjust=1.0"])
    with pytest.raises(ValueError, match=re.escape("train.logit_adjust=1.0 applies to classification")):
        prepare(spec)


def test_a_bad_model_dtype_is_one_clear_error():
    with pytest.raises(SpecError, match="invalid spec field 'model_dtype' = 'float64': Input should be 'auto'"):
        load_spec(None, ["model_dtype=float64"])
    assert load_spec(None, ["model_dtype=bfloat16", "train.gradient_checkpointing=true"]).model_dtype == "bfloat16"
