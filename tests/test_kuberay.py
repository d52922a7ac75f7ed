"""deploy/kuberay/rayservice.yaml: a KubeRay RayService whose serveConfigV2 is a valid Serve
config (Ray's ServeDeploySchema) for serve_app:build, whose Ray containers carry the code's
Ray env, and whose resources, volumes and TURN server match what the code and settings use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


@pytest.fixture(scope="module")
def service(documents) -> dict:
    service = documents["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return service["spec"]


@pytest.fixture(scope="module")
def cluster(service) -> dict:
    return service["rayClusterConfig"]


def ray_pods(cluster) -> dict[str, dict]:
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_serve_config_validates_with_rays_schema(service):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["serveConfigV2"]))
    [app] = schema.applications
    assert app.import_path == "serve_app:build"
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000


def test_app_args_name_real_settings_and_mounted_paths(service, cluster):
    from ray_lipsync.config import Settings

    [app] = yaml.safe_load(service["serveConfigV2"])["applications"]
    args = dict(app["args"])
    settings_file = Path(args.pop("settings_file"))
    overrides = {key: value for key, value in args.items() if key != "settings"}
    settings = Settings.model_validate(overrides)  # every override is a real, valid setting
    assert settings.backend == "musetalk"
    for pod in ray_pods(cluster).values():  # the builder and every replica see the same files
        [container] = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts[str(settings.models_dir)] == "models"
        assert mounts[settings.avatar_uri] == "avatars"
        secret = volumes[mounts[str(settings_file.parent)]]["secret"]
        assert {"key": "settings.json", "path": settings_file.name} in secret["items"]


def test_every_ray_container_has_the_pipeline_env_and_one_auth_mode(cluster):
    from actors.runtime import PIPELINE_RAY_ENV

    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay sets RAY_AUTH_MODE everywhere
    for name, pod in ray_pods(cluster).items():
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in PIPELINE_RAY_ENV} == PIPELINE_RAY_ENV, name
        assert "RAY_AUTH_MODE" not in env, name  # never set differently per group


def test_groups_and_resources_match_the_code(cluster):
    from serve.deployment import GATEWAY_CPUS

    assert cluster["enableInTreeAutoscaling"] is True
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["rayVersion"] == ray_pin
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # an inference replica takes num_gpus=1, num_cpus=1 (actors/directory.py)
    assert gpu["nvidia.com/gpu"] == 1 and float(gpu["cpu"]) >= 1
    assert groups["gpu"]["maxReplicas"] > groups["gpu"]["minReplicas"]
    cpu = groups["gateways"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu and float(cpu["cpu"]) >= GATEWAY_CPUS


def test_image_matches_the_cluster_image_and_torch_pin():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert f"FROM {cluster['docker']['image']}\n" in dockerfile
    [torch] = [c for c in cluster["setup_commands"] if "torch==" in c]
    assert torch.replace("--quiet", "--no-cache-dir") in dockerfile


def test_turn_server_uses_the_shared_secret_and_a_fixed_relay_range(documents):
    from ray_lipsync.config import Settings

    turn = documents["Deployment"]["spec"]["template"]["spec"]
    assert turn["hostNetwork"] is True
    [container] = turn["containers"]
    args = container["args"]
    assert "--use-auth-secret" in args and "--static-auth-secret=$(TURN_SECRET)" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["TURN_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "ray-lipsync", "key": "turn-secret"}
    assert {"--min-port=49152", "--max-port=49663", "--listening-port=3478"} <= set(args)
    # the settings.json the header shows is valid Settings with per-session TURN credentials
    header = MANIFEST.read_text().split("cat > settings.json <<EOF\n", 1)[1].split("#        EOF", 1)[0]
    text = "\n".join(line.removeprefix("#        ") for line in header.splitlines())
    text = text.replace("$TURN", "turn.example.com").replace("$SECRET", "0" * 64)
    assert Settings.model_validate_json(text).webrtc.ice_servers[1].is_turn


def test_image_copies_every_package_the_project_installs():
    import tomllib

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*").split(".")[0] for p in include}
    for package in packages:
        assert f" {package} /home/ray/ray-lipsync/{package}\n" in dockerfile, package
    for module in project["tool"]["setuptools"]["py-modules"]:
        assert f"{module}.py" in dockerfile, module
