"""cluster.yaml: Ray's own autoscaler schema (offline), the Serve config its head renders
(Ray's ServeDeploySchema, ray-lipsync's Settings), and the facts a working cluster needs:
the same RAY_AUTH_MODE on every node, PIPELINE_RAY_ENV, weights and token on every node,
the CUDA torch build of the image, ports open for HTTP and TURN."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
START_COTURN = ROOT / "deploy" / "ray-up" / "start-coturn.sh"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def serve_config(config, tmp_path_factory) -> dict:
    """The Serve config the head writes, rendered by bash as on the head (fake TURN host/secret)."""
    home = tmp_path_factory.mktemp("head_home")
    (home / "turn_host").write_text("203.0.113.7\n")
    (home / "turn_secret").write_text("0123abcd" * 8 + "\n")
    (home / "lipsync_api_key").write_text("k" * 43 + "\n")
    [render] = [c for c in config["head_start_ray_commands"] if "serve_config.yaml <<" in c]
    subprocess.run(["bash", "-euc", render], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                   check=True, timeout=30)
    assert (home / "serve_config.yaml").stat().st_mode & 0o077 == 0  # holds the TURN secret
    return yaml.safe_load((home / "serve_config.yaml").read_text())


def test_cluster_yaml_passes_ray_schema(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"] >= 0


def test_schema_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"] = "lots"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_serve_config_validates_and_carries_the_settings(config, serve_config):
    from ray.serve.schema import ServeDeploySchema

    from ray_lipsync.config import Settings

    schema = ServeDeploySchema.model_validate(serve_config)
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    [app] = schema.applications
    assert app.import_path == "serve_app:build" and app.runtime_env in (None, {})  # no upload
    settings = Settings.model_validate(app.args["settings"])
    assert settings.backend == "musetalk"
    project = next(dst for dst, src in config["file_mounts"].items() if src == ".")
    assert settings.models_dir == Path(project) / "models"  # ./models travels with the project
    assert settings.avatar_uri.startswith(project)
    turn = [s for s in settings.webrtc.ice_servers if s.is_turn]
    assert turn and all("203.0.113.7:3478" in url for s in turn for url in s.urls)
    assert settings.webrtc.turn_secret.get_secret_value() == "0123abcd" * 8
    assert list(settings.serve.api_keys) == ["k" * 43], "new sessions need the head's API key"
    commands = "\n".join(config["head_start_ray_commands"])
    assert "lipsync_api_key" in commands.split("serve_config.yaml <<", 1)[0]  # generated first
    assert "serve deploy ~/serve_config.yaml" in "\n".join(config["head_start_ray_commands"])


def test_the_application_builder_accepts_the_args(serve_config):
    from ray import serve

    import serve_app  # the import path the Serve config names

    [app] = serve_config["applications"]
    assert isinstance(serve_app.build(app["args"]), serve.Application)


def test_every_node_starts_ray_with_the_pipeline_settings(config):
    """The cluster's nodes get the same Ray settings as a local `ray-lipsync serve`."""
    from actors.runtime import PIPELINE_RAY_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in config[key] if "ray start" in c]
        exports = dict(a.split("=", 1) for a in start.split("export ", 1)[1].split(";", 1)[0].split())
        assert exports == PIPELINE_RAY_ENV, key


def test_every_node_and_driver_has_the_same_auth_mode_and_token(config):
    docker = config["docker"]
    modes = [o for o in docker["run_options"] if "RAY_AUTH_MODE" in o]
    assert modes == ["--env RAY_AUTH_MODE=token"]  # one place: head, workers, drivers alike
    assert not docker.get("head_run_options") and not docker.get("worker_run_options")
    commands = yaml.safe_dump({k: v for k, v in config.items() if k.endswith("commands")})
    assert "RAY_AUTH_MODE" not in commands  # never set differently per node
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_weights_reach_every_node_without_venv_or_git(config):
    assert config["file_mounts"]["/home/ray/ray-lipsync"] == "."
    excluded = set(config["rsync_exclude"])
    assert {".venv", ".git"} <= excluded and not any("models" in e for e in excluded)
    assert not config.get("rsync_filter")  # a .gitignore filter would drop models/


def test_torch_is_the_pinned_release_built_for_the_images_cuda(config):
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    cuda = re.search(r"-cu(\d+)$", config["docker"]["image"]).group(1)
    [install] = [c for c in config["setup_commands"] if "torch==" in c]
    assert f"torch=={pin} " in install and install.endswith(f"/whl/cu{cuda}")
    assert config["setup_commands"].index(install) == 0  # before the project pulls torch
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-")


def test_security_group_opens_http_and_turn(config):
    rules = {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in config["provider"]["security_group"]["IpPermissions"]}
    script = START_COTURN.read_text()
    low = int(re.search(r"RELAY_MIN=\$\{RELAY_MIN:-(\d+)\}", script).group(1))
    high = int(re.search(r"RELAY_MAX=\$\{RELAY_MAX:-(\d+)\}", script).group(1))
    assert {("tcp", 8000, 8000), ("udp", 3478, 3478), ("udp", low, high)} <= rules
    assert any("start-coturn.sh" in c for c in config["head_setup_commands"])
