"""cluster.yaml passes Ray's own cluster-config validation and says what the design asks for."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_prepared_config(config):
    prepared = prepare_config(dict(config))  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)  # raises on any schema violation
    assert prepared["provider"]["type"] == "aws"


def test_head_runs_no_work_and_gpu_workers_autoscale_from_zero(config):
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["min_workers"] == 0 and n["max_workers"] >= 1 for n in workers)
    assert all(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers)


def test_image_matches_installed_ray_and_setup_installs_the_project(config):
    import ray

    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["docker"]["image"].endswith("-gpu")
    assert any("pip install" in c and "flextok-at-scale" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_an_invalid_config_is_rejected(config):
    import jsonschema

    bad = dict(config, available_node_types={"head": {"resources": "lots", "node_config": {}}})
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
