"""cluster.yaml validates offline against Ray's own autoscaler schema (as Ray's tests do)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid(raw: dict) -> None:
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_head_takes_no_work_and_workers_autoscale(raw: dict) -> None:
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    cpu = [n for n, t in types.items() if n != raw["head_node_type"] and "GPU" not in t["resources"]]
    assert cpu and types[cpu[0]]["resources"]["CPU"] >= 1
    assert any("pip install -e ~/ddm-ray" in c for c in raw["setup_commands"])


def test_broken_config_is_rejected(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_spot"]["min_workers"] = "zero"
    with pytest.raises(Exception):  # noqa: B017 - jsonschema.ValidationError
        validate_config(prepare_config(bad))


def test_dashboard_is_reached_through_port_forwarding_only(raw: dict) -> None:
    """The head's dashboard / job server listens on loopback; `ray dashboard cluster.yaml` forwards it."""
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
