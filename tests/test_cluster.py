"""cluster.yaml passes Ray's own autoscaler validation and keeps the cluster's promises.

No AWS credentials or network: Ray's `prepare_config` only merges its shipped AWS
defaults, and `validate_config` checks the result against the JSON schema Ray ships
(`ray/autoscaler/ray-schema.json`), exactly as `ray up` does before it talks to EC2.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict) -> dict:
    """What `ray up` validates: the config merged with Ray's defaults for its provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _gpu_node_types(config: dict) -> dict[str, dict]:
    return {name: node for name, node in config["available_node_types"].items() if node["resources"].get("GPU", 0)}


def test_cluster_yaml_passes_rays_autoscaler_validation(config):
    prepared = _validated(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _set(config: dict, dotted_key: str, value) -> None:
    *sections, key = dotted_key.split(".")
    for section in sections:
        config = config[section]
    config[key] = value


@pytest.mark.parametrize(
    ("dotted_key", "value"),
    [
        ("available_node_types.gpu_a10g_1x.min_worker", 0),
        ("idle_timeout_minute", 5),
        ("available_node_types.gpu_a100_8x.resources.GPU", 0.5),
    ],
    ids=["node-type-field", "top-level-field", "fractional-resource"],
)
def test_a_typo_in_cluster_yaml_fails_validation(config, dotted_key, value):
    _set(config, dotted_key, value)
    with pytest.raises(jsonschema.ValidationError):
        _validated(config)


def test_head_binds_the_dashboard_to_localhost_and_exports_metrics(config):
    head_start = " ".join(config["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts == ["127.0.0.1"], head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert re.search(r"--metrics-export-port[= ]\d+", " ".join(commands)), commands


def test_every_gpu_node_type_sets_resources_and_worker_bounds(config):
    gpu_types = _gpu_node_types(config)
    assert {node["node_config"]["InstanceType"].split(".")[0] for node in gpu_types.values()} >= {"g5", "p4d"}
    for name, node in gpu_types.items():
        resources = node["resources"]
        assert isinstance(resources["GPU"], int) and resources["GPU"] >= 1, name
        assert isinstance(resources.get("CPU"), int) and resources["CPU"] >= 1, name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    head = config["available_node_types"][config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    assert config["idle_timeout_minutes"] > 0


def test_nodes_get_the_checkout_and_install_fedray(config):
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    synced = {Path(local).name for local in config["file_mounts"].values()}
    assert {"fedray", "jobs", "constraints", "pyproject.toml"} <= synced
    setup = config["setup_commands"]
    assert any(re.search(r"pip install .*-e ~/fedray\b", command) for command in setup), setup
    assert any("--no-deps -r ~/fedray/constraints/data.txt" in command for command in setup), setup
    assert not config.get("docker"), "setup is docker-free"
