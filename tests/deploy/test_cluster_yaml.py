"""cluster.yaml passes Ray's own cluster-config validation and says what the design asks for."""

import re
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
    assert re.search(r"-cu\d+$", config["docker"]["image"])  # a CUDA image, its version named
    assert any("pip install" in c and "flextok-at-scale" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_an_invalid_config_is_rejected(config):
    import jsonschema

    bad = dict(config, available_node_types={"head": {"resources": "lots", "node_config": {}}})
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_every_node_type_has_an_instance_profile_and_a_valid_launch_config(config):
    """Ray's AWS bootstrap gives a profile to the head only: the workers (all the reading and writing)
    need their own. Each node_config is checked against EC2 RunInstances' own parameter model."""
    import boto3
    from botocore.validate import ParamValidator

    shape = boto3.session.Session().client("ec2", region_name=config["provider"]["region"]) \
        .meta.service_model.operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["IamInstanceProfile"].get("Name"), name
        assert node_config["ImageId"].startswith(("ami-", "resolve:ssm:")), name
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
        assert not report.has_errors(), report.generate_report()
    worker, head = (config["available_node_types"][k]["node_config"]["IamInstanceProfile"]["Name"]
                    for k in ("gpu_worker", config["head_node_type"]))
    assert worker != head  # the head's role launches instances; the workers' need not


def test_cuda_and_torch_are_pinned_together(config):
    import re

    import torch

    cuda = re.fullmatch(r"rayproject/ray:[\d.]+-py\d+-(cu\d+)", config["docker"]["image"]).group(1)
    install = next(c for c in config["setup_commands"] if "torch==" in c)
    version = re.search(r"torch==([\d.]+)", install).group(1)
    assert install.rstrip().endswith(f"download.pytorch.org/whl/{cuda}")  # torch built for the image's CUDA
    assert version == torch.__version__.split("+")[0]  # the torch the tests here ran against
    assert config["setup_commands"].index(install) < next(
        i for i, c in enumerate(config["setup_commands"]) if "flextok-at-scale[" in c)


def test_nodes_install_the_paper_extras_and_sync_no_local_state(config):
    setup = " ".join(config["setup_commands"])
    assert "flextok-at-scale[vae,text]" in setup
    assert {".venv", ".git", "runs", "flextok-quickstart"} <= set(config["rsync_exclude"])
    ignored = (ROOT / ".rayignore").read_text().split()
    assert {".venv", ".git", "runs/", "/tests/"} <= set(ignored)
