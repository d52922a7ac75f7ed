"""cluster.yaml validates against Ray's own autoscaler schema (offline) and deploys serve_app:app."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_ray_schema(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"] >= 0


def test_cluster_starts_the_serve_app(config):
    commands = "\n".join(config["head_start_ray_commands"])
    serve_config = yaml.safe_load(commands.split("<<SERVE\n", 1)[1].split("\nSERVE", 1)[0])
    [application] = serve_config["applications"]
    assert application["import_path"] == "serve_app:build"
    # the cluster requires an API key for new sessions (generated once on the head)
    args = application["args"]
    assert args["serve.api_keys"] == '["$(cat /home/ray/lipsync_api_key)"]'
    assert "lipsync_api_key" in commands.split("<<SERVE", 1)[0]
    assert "serve deploy" in commands
    assert any("pip install" in c for c in config["setup_commands"])


def test_every_node_starts_ray_with_the_pipeline_settings(config):
    """The cluster's nodes get the same Ray settings as a local `ray-lipsync serve`."""
    from actors.runtime import PIPELINE_RAY_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in config[key] if "ray start" in c]
        exports = dict(a.split("=", 1) for a in start.split("export ", 1)[1].split(";", 1)[0].split())
        assert exports == PIPELINE_RAY_ENV, key


def test_schema_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"] = "lots"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))
