"""Layering and the gateway's one remote interface, checked on the source itself."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("ray", "serve_app", "serve", "actors")  # the core may use none of them at import time


def test_the_core_package_imports_neither_ray_nor_the_app_layers() -> None:
    offenders = []
    for path in sorted((ROOT / "ray_lipsync").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_every_gateway_api_method_has_one_signature_everywhere() -> None:
    pytest.importorskip("ray")
    from serve.clients import HomeClient, ServeClient
    from serve.deployment import GatewayDeployment

    from ray_lipsync.api.client import GatewayAPI
    from ray_lipsync.api.gateway import Gateway

    methods = [n for n, v in vars(GatewayAPI).items() if callable(v) and not n.startswith("_")]
    assert {"create_session", "offer", "push_audio", "events", "health"} <= set(methods)
    deployment = GatewayDeployment.func_or_class
    assert issubclass(deployment, Gateway)  # its remote methods are the Gateway's own
    for name in methods:
        want = inspect.signature(getattr(GatewayAPI, name))
        for impl in (Gateway, HomeClient, ServeClient):
            got = inspect.signature(getattr(impl, name))
            assert list(got.parameters) == list(want.parameters), (impl.__name__, name)
            assert [p.kind for p in got.parameters.values()] == [p.kind for p in want.parameters.values()]
            assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()]
