"""ray_cluster.yaml is checked offline against Ray's own autoscaler schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load()))


def test_cluster_config_has_the_node_roles_panoray_needs():
    config = _load()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must take no work"
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in nodes.values())
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60") and "gpu" in image and "ray-ml" not in image
    setup = " ".join(config["setup_commands"])
    assert "PANORAY_CUDA=1" in setup and "--no-build-isolation" in setup


def test_schema_rejects_a_broken_config():
    """Guards the test above: the schema check really runs and can fail."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(_load())
    broken["available_node_types"]["gpu"]["not_a_field"] = 1
    with pytest.raises(Exception, match="not_a_field"):
        validate_config(prepare_config(broken))
